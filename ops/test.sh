#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what is missing, builds, lints, checks the
# alert rules (promtool), runs the Rust unit tests, starts the local stack, runs the integration
# tests (pytest, against the real stack, checked with confluent-kafka, boto3, pyarrow and
# DuckDB), then stops the stack it started.
#
#   bash ops/test.sh              # everything
#   bash ops/test.sh -k restart   # extra arguments go to pytest
#
# AEGIS_KEEP_STACK=1 leaves the stack running afterwards.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

log() { printf '\n== %s\n' "$*"; }

log "system packages"
bash ops/install-deps.sh

log "build (cargo, target dir ${CARGO_TARGET_DIR:-target})"
cargo build --locked --bins --tests
export AEGIS_BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/aegis-audit"

log "lint (rustfmt, clippy)"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

log "alert rules (promtool)"
bash ops/check-alerts.sh

# A hung test must fail the run with a message, not use up CI's time: the unit tests take
# seconds (built above), the integration tests ~12 minutes on 2 cores; the limits leave room
# for a cold cache (tansu's build) inside CI's 90 minutes.
bounded() {
    local limit=$1; shift
    local rc=0 foreground=()
    # At a terminal, Ctrl-C must still reach the tests (timeout otherwise runs them in a
    # process group of their own), at the price that a hung test's children outlive the limit
    # there; in CI the whole group is killed at the limit.
    [[ -t 0 ]] && foreground=(--foreground)
    timeout "${foreground[@]}" "$limit" "$@" || rc=$?
    if [[ $rc == 124 ]]; then
        echo "ops/test.sh: '$*' did not finish within $limit s (a hung test?)" >&2
    fi
    return $rc
}

log "unit tests"
bounded 900 cargo test --locked --lib --bins

log "local stack"
started_here=0
if ! bash ops/stack.sh status >/dev/null 2>&1; then
    started_here=1
fi
# Before `up`: a start that fails halfway must not leave services behind either.
if [[ $started_here == 1 && "${AEGIS_KEEP_STACK:-0}" != 1 ]]; then
    trap 'bash ops/stack.sh down >/dev/null 2>&1 || true' EXIT
fi
bash ops/stack.sh up
eval "$(bash ops/stack.sh env)"

log "integration tests (pytest, real stack)"
bounded 2400 "$AEGIS_PYTHON" -m pytest -q -p no:cacheprovider tests/py "$@"
