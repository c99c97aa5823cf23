#!/usr/bin/env bash
# Checks the Prometheus alert rules (ops/prometheus/alerts.yml) and runs their unit tests
# (ops/prometheus/alerts.test.yml: each alert fires on its outage and stays quiet without one).
# promtool comes from Debian's `prometheus` package, downloaded and unpacked into the tools
# cache, never installed: the package's install scripts would start a Prometheus server.
#
#   bash ops/check-alerts.sh
#
# Environment: AEGIS_TOOLS_DIR (default ~/.cache/aegis-audit/tools), as ops/stack.sh.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=${AEGIS_TOOLS_DIR:-$HOME/.cache/aegis-audit/tools}
PROMTOOL=$TOOLS_DIR/promtool/promtool

die() { echo "check-alerts: $*" >&2; exit 1; }
# shellcheck source=ops/as-root.sh
source "$REPO/ops/as-root.sh"

# A cached promtool counts only if it runs (a half-written copy does not).
promtool_ok() { [[ -x $PROMTOOL ]] && "$PROMTOOL" --version >/dev/null 2>&1; }

fetch_promtool() {
    local tmp
    tmp=$(mktemp -d "$TOOLS_DIR/promtool/.fetch.XXXXXX")
    # shellcheck disable=SC2064  # this $tmp, now
    trap "rm -rf '$tmp'" EXIT
    # The download needs apt's package lists, which a fresh image may not have yet.
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        as_root apt-get update -qq || die "apt-get update failed (needed for Debian's prometheus package)"
        (cd "$tmp" && apt-get download prometheus >/dev/null) || die "apt-get download prometheus failed"
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/unpacked"
    install -m 0755 "$tmp/unpacked/usr/bin/promtool" "$tmp/promtool"
    mv -f "$tmp/promtool" "$PROMTOOL"  # the same file system: the swap is atomic
    rm -rf "$tmp"
}

mkdir -p "$TOOLS_DIR/promtool"
if ! promtool_ok; then
    # One fetch at a time (two CI runs on one machine); the second finds it done.
    exec 9>"$TOOLS_DIR/promtool/.lock"
    flock -w 600 9 || die "another ops/check-alerts.sh holds $TOOLS_DIR/promtool/.lock"
    promtool_ok || fetch_promtool
    promtool_ok || die "$PROMTOOL does not run"
fi
"$PROMTOOL" --version 2>&1 | head -1
cd "$REPO/ops/prometheus"
"$PROMTOOL" check rules alerts.yml
"$PROMTOOL" test rules alerts.test.yml
