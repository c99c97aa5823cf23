#!/usr/bin/env bash
# System packages needed to build aegis-audit (bundled librdkafka via cmake) and the
# local stack's tools. Installs only what is missing; runs `apt-get update` first when
# something has to be installed. Safe to call repeatedly (CI, ops/stack.sh).
#
#   bash ops/install-deps.sh          # install what is missing
#   bash ops/install-deps.sh --check  # only report; exit 1 if something is missing
set -euo pipefail

# build-essential: librdkafka's CMake project needs a C++ compiler; python3-venv: the test venv.
PKGS=(cmake build-essential libcurl4-openssl-dev pkg-config libssl-dev zlib1g-dev python3-venv)

installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all present (${PKGS[*]})"
    exit 0
fi

if [[ "${1:-}" == "--check" ]]; then
    echo "install-deps: missing: ${missing[*]}" >&2
    exit 1
fi

# shellcheck source=ops/as-root.sh
source "$(dirname "${BASH_SOURCE[0]}")/as-root.sh"

echo "install-deps: installing: ${missing[*]}"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"

for p in "${missing[@]}"; do
    installed "$p" || { echo "install-deps: $p still not installed" >&2; exit 1; }
done
echo "install-deps: done"
