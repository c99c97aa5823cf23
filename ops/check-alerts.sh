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

as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

fetch_promtool() {
    local tmp
    tmp=$(mktemp -d)
    # An unpacked package only: the download needs apt's package lists, which a fresh image
    # may not have yet.
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        as_root apt-get update -qq
        (cd "$tmp" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/unpacked"
    mkdir -p "$TOOLS_DIR/promtool"
    install -m 0755 "$tmp/unpacked/usr/bin/promtool" "$PROMTOOL.partial"
    mv "$PROMTOOL.partial" "$PROMTOOL"
    rm -rf "$tmp"
}

[[ -x $PROMTOOL ]] || fetch_promtool
"$PROMTOOL" --version 2>&1 | head -1
cd "$REPO/ops/prometheus"
"$PROMTOOL" check rules alerts.yml
"$PROMTOOL" test rules alerts.test.yml
