#!/usr/bin/env bash
# End-to-end benchmark of aegis-audit against a straightforward Python baseline (ops/bench/baseline.py)
# on the local stack. See ops/bench/README.md.
#
#   bash ops/bench/e2e.sh [--events N (default 1000000)] [--partitions P (default 8)] [--skip-baseline]
#                         [--marker-rate R (10)] [--marker-seconds S (30; 0 skips latency)]
#                         [--modes s3-only,s3+dynamodb] [--keep]
#
# Builds and runs the release binary (this tree's code). Prints a summary table and writes the
# full report to ops/bench/results/e2e-<date>.json.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ARGS=()
while (($#)); do
    case $1 in
        --events | --partitions | --marker-rate | --marker-seconds | --modes | --timeout)
            (($# >= 2)) || { echo "e2e.sh: $1 needs a value" >&2; exit 2; }
            ARGS+=("$1" "$2"); shift 2 ;;
        --skip-baseline | --keep) ARGS+=("$1"); shift ;;
        -h | --help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "e2e.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# Built here, so the figures are always this tree's code (a stale binary measures nothing).
(cd "$REPO_ROOT" && cargo build --release --locked --bin aegis-audit)
BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/aegis-audit BUILD=release
echo "[e2e] binary: $BIN ($BUILD build)"

# The broker's storage decides whose ceiling the s3-only row shows (ops/bench/README.md): tansu
# with memory storage serves ~115k records/s here, with SQLite ~10k. Memory is the default for
# this script only; the tests keep SQLite (memory storage mis-serves fetches from mid-batch).
export AEGIS_KAFKA_STORAGE=${AEGIS_KAFKA_STORAGE:-memory}
bash "$REPO_ROOT/ops/stack.sh" up
eval "$(bash "$REPO_ROOT/ops/stack.sh" env)"
read -r broker_pid _ <"$AEGIS_STACK_DIR/run/broker.pid"
BROKER_STORAGE=$(tr '\0' ' ' <"/proc/$broker_pid/cmdline" | grep -o 'storage-engine [a-z]*' | cut -d' ' -f2)
if [[ $BROKER_STORAGE != "$AEGIS_KAFKA_STORAGE" ]]; then
    echo "[e2e] WARNING: the running broker uses $BROKER_STORAGE storage, not $AEGIS_KAFKA_STORAGE" \
        "(restart it: bash ops/stack.sh down; AEGIS_KAFKA_STORAGE=$AEGIS_KAFKA_STORAGE bash ops/stack.sh up)"
fi
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1

exec "$AEGIS_PYTHON" "$REPO_ROOT/ops/bench/e2e.py" --bin "$BIN" --build "$BUILD" --broker-storage "$BROKER_STORAGE" "${ARGS[@]}"
