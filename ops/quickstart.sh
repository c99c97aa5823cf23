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

step "digest signing key (Ed25519, .stack/digest-signing-key.pem)"
mkdir -p .stack
if [ ! -f .stack/digest-signing-key.pem ] || [ ! -f .stack/digest-public-key.pem ]; then
    rm -f .stack/digest-signing-key.pem .stack/digest-public-key.pem
    "$BIN" keygen --out .stack/digest-signing-key.pem --public-out .stack/digest-public-key.pem
else
    echo "  exists"
fi

step "aegis-audit config check"
"$BIN" config check | sed -n '1,12p'; echo "  ..."

step "aegis-audit init (topic, bucket with Object Lock, DynamoDB tables)"
"$BIN" init

step "aegis-audit produce --count $EVENTS"
"$BIN" produce --count "$EVENTS"

step "aegis-audit run (until caught up: exits after 5 s without new records)"
RUN_LOG=.stack/quickstart-run.log
if ! "$BIN" run --exit-when-idle 5 >"$RUN_LOG" 2>&1; then
    tail -n 30 "$RUN_LOG" >&2
    echo "quickstart: aegis-audit run failed; its whole log is $RUN_LOG" >&2
    exit 1
fi
grep -iE "assigned|flushed|left the consumer group|error|warn" "$RUN_LOG" | tail -n 20 || true

step "where the audit trail landed"
"$AEGIS_PYTHON" ops/show_trail.py

step "aegis-audit verify (every hash, link, Merkle root, checksum and signed digest, from S3)"
"$BIN" verify --public-key .stack/digest-public-key.pem

step "aegis-audit prove <decision_id> | verify-proof (offline, public key only)"
DECISION=$("$AEGIS_PYTHON" - <<'PY'
import os, tomllib, boto3
config = tomllib.load(open(os.environ.get("AEGIS_CONFIG", "config/local.toml"), "rb"))
table = os.environ.get("AEGIS_DYNAMODB__TABLE", config["dynamodb"]["table"])
ddb = boto3.client("dynamodb", endpoint_url=os.environ["AEGIS_DYNAMODB__ENDPOINT_URL"],
                   region_name=config.get("aws", {}).get("region", "us-east-1"),
                   aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                   aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
item = ddb.scan(TableName=table, FilterExpression="SK = :d",
                ExpressionAttributeValues={":d": {"S": "DECISION"}}, Limit=200)["Items"][0]
print(item["decision_id"]["S"])
PY
)
"$BIN" prove "$DECISION" --out .stack/proof.json
"$BIN" verify-proof .stack/proof.json --public-key .stack/digest-public-key.pem
