#!/usr/bin/env bash
# The main job end to end on the local stack, as a new user would run it:
# start the stack, build, init, produce sample events, consume until caught up, then show
# where the Parquet landed, a DuckDB query over the Hive layout and a DynamoDB lookup.
#
#   bash ops/quickstart.sh [EVENTS]      # default 5000 events
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
EVENTS=${1:-5000}
export AEGIS_CONFIG=${AEGIS_CONFIG:-$REPO/config/local.toml}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "system packages and build"
bash ops/install-deps.sh
cargo build --locked --bin aegis-audit
BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/aegis-audit"

step "local stack (tansu Kafka broker + moto S3/DynamoDB on 127.0.0.1)"
bash ops/stack.sh up
eval "$(bash ops/stack.sh env)"

step "aegis-audit config check"
"$BIN" config check | sed -n '1,12p'; echo "  ..."

step "aegis-audit init (topic, bucket with Object Lock, DynamoDB tables)"
"$BIN" init

step "aegis-audit produce --count $EVENTS"
"$BIN" produce --count "$EVENTS"

step "aegis-audit run (until caught up: exits after 5 s without new records)"
"$BIN" run --exit-when-idle 5 2>&1 | grep -E "assigned|flushed|left the consumer group|ERROR|WARN" | tail -n 20

step "where the audit trail landed"
"$AEGIS_PYTHON" ops/show_trail.py
