#!/usr/bin/env python3
"""Baseline for ops/bench/e2e.sh: the same job as aegis-audit, written the straightforward way.

    "$AEGIS_PYTHON" ops/bench/baseline.py --topic T --group G --bucket B [--dynamodb --table TBL]

What a competent engineer would write in an afternoon, in one process:
- a confluent-kafka consumer (manual commits, `consume()` in batches across all assigned
  partitions, auto.offset.reset=earliest);
- a light validation per record (JSON object, the required fields of
  schemas/decision-event.schema.json are strings, event_type is known, occurred_at parses,
  environment is a safe token, confidence_score in [0, 1]); a record that fails is kept as a
  row with status `rejected` (no dead-letter topic);
- per-partition SHA-256 hash chain exactly per schemas/CHAIN.md (`--self-test` checks the test
  vectors there);
- a buffer per partition, flushed at `--max-records` records or when its oldest record is
  `--max-age-ms` old (the same thresholds e2e.sh gives aegis-audit);
- per flush of a partition: ONE Parquet object (pyarrow, ZSTD level 3, statistics, the column set
  of schemas/parquet-columns.md) put to S3 with boto3 under
  `<prefix>/year=/month=/day=/environment=/<topic>-p<PPPP>-<first>-<last>.parquet`, where the Hive
  directory comes from the flush's FIRST record (aegis-audit splits a flush by each record's own
  date and environment; this baseline does not, and keeps rejected rows in the same object);
- with `--dynamodb`: the index items (same PK/SK/GSI1/GSI2 layout as schemas/dynamodb-layout.md,
  but plain last-writer-wins puts through boto3's `batch_writer`: no winner rule, no
  conditional writes, no DUPLICATE items) into a table it creates with the same key schema;
- the chain head as a small JSON object `<prefix>/_heads/<topic>/p<PPPP>.json` (read back on
  assignment, so a restart continues the chain);
- then a synchronous offset commit of `last + 1`.

It does not do what aegis-audit adds on top: fencing of zombie writers (intent/head conditional
writes), crash-consistent re-flush of an interrupted range, Object Lock retention, SSE, S3
checksums, Merkle roots, signed digests, dead-lettering, backpressure, retries, metrics.

It stops after `--idle` seconds without a record (after flushing and committing everything)
and prints one JSON line on stdout:
    {"events", "seconds", "events_per_s", "peak_rss_mib", ...}
`seconds` runs from the first record received to the return of the last offset commit, the same
window e2e.sh uses for aegis-audit (startup, group join and the idle tail are excluded).
"""
from __future__ import annotations

import argparse
import decimal
import hashlib
import json
import os
import re
import resource
import struct
import sys
import time
from datetime import datetime, timezone

GENESIS_TAG = b"aegis-audit/genesis/v1\0"
ENTRY_TAG = b"aegis-audit/entry/v1\0"
REQUIRED = ["decision_id", "event_type", "occurred_at", "environment", "user_id", "session_id", "action",
            "policy_version", "model_version", "request_id"]
EVENT_TYPES = {"decision", "override", "safety_flag"}
ENV_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
STR_FIELDS = ["decision_id", "event_type", "user_id", "session_id", "action", "policy_version", "model_version",
              "request_id", "reviewer_id", "override_reason", "original_action", "safety_category", "severity"]


def log(msg: str) -> None:
    print(f"[baseline] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ chain

def genesis(topic: str, partition: int) -> bytes:
    t = topic.encode()
    return hashlib.sha256(GENESIS_TAG + struct.pack(">H", len(t)) + t + struct.pack(">i", partition)).digest()


def entry_hash(prev: bytes, topic_part: bytes, offset: int, status: int, payload: bytes) -> bytes:
    """topic_part = u16(len(topic)) || topic || i32(partition), precomputed per partition."""
    return hashlib.sha256(ENTRY_TAG + prev + topic_part + struct.pack(">qBI", offset, status, len(payload))
                          + payload).digest()


def topic_part_bytes(topic: str, partition: int) -> bytes:
    t = topic.encode()
    return struct.pack(">H", len(t)) + t + struct.pack(">i", partition)


def self_test() -> None:
    """The test vectors of schemas/CHAIN.md."""
    g0 = genesis("ai-decisions", 0)
    assert g0.hex() == "9c3f787772d9e568588361733a67cde94159483ec76fd3c82d7eb1d3b181d7cd"
    assert genesis("ai-decisions", 7).hex() == "aaa640bb4a298c8433f431e18a51e90ce40028904a383aec87dfc5853496016b"
    tp = topic_part_bytes("ai-decisions", 0)
    e1 = entry_hash(g0, tp, 0, 0, b'{"decision_id":"d-1","event_type":"decision"}')
    assert e1.hex() == "94ddd7fb090d327d570688f7c77dcdf99ef8fe863ecdce451758369beb7342ce"
    e2 = entry_hash(e1, tp, 1, 1, b"not json")
    assert e2.hex() == "e74ad988c7a070b8a26a20c58667d29dee34de61dcc0fb8c545d5e5a06255ce3"
    e3 = entry_hash(e2, tp, 5, 0, b"")
    assert e3.hex() == "e0a1cda54dad9aa1399d3862ba0d436f12c29985d6e4522b00e960d846c85806"
    print("chain test vectors: ok")


# ------------------------------------------------------------------------------- validation

def parse_event(payload: bytes | None):
    """(event dict with occurred_at as datetime, None) or (None, reason)."""
    if payload is None:
        return None, "null payload"
    try:
        event = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not json: {e}"
    if not isinstance(event, dict):
        return None, "not a JSON object"
    for field in REQUIRED:
        if not isinstance(event.get(field), str) or not event[field]:
            return None, f"missing or empty {field}"
    if event["event_type"] not in EVENT_TYPES:
        return None, "unknown event_type"
    if not ENV_TOKEN.match(event["environment"]):
        return None, "bad environment"
    try:
        when = datetime.fromisoformat(event["occurred_at"])
    except ValueError:
        return None, "bad occurred_at"
    if when.tzinfo is None:
        return None, "occurred_at without a time zone"
    event["occurred_at"] = when.astimezone(timezone.utc)
    score = event.get("confidence_score")
    if score is not None and not (isinstance(score, (int, float)) and 0 <= score <= 1):
        return None, "confidence_score outside [0, 1]"
    return event, None


# ------------------------------------------------------------------------------------ output

def arrow_schema(pa):
    s = lambda name, nullable=True: pa.field(name, pa.string(), nullable=nullable)  # noqa: E731
    return pa.schema([
        s("kafka_topic", False), pa.field("kafka_partition", pa.int32(), False),
        pa.field("kafka_offset", pa.int64(), False), pa.field("kafka_timestamp", pa.timestamp("ms", tz="UTC")),
        s("status", False), s("reject_code"), s("reject_reason"), s("decision_id"), s("event_type"),
        pa.field("occurred_at", pa.timestamp("us", tz="UTC")), s("user_id"), s("session_id"), s("action"),
        pa.field("confidence_score", pa.float64()), s("policy_version"), s("model_version"), s("request_id"),
        s("reviewer_id"), s("override_reason"), s("original_action"), s("safety_category"), s("severity"),
        s("metadata"), pa.field("payload", pa.binary(), False), s("prev_hash", False), s("entry_hash", False),
    ])


class PartitionState:
    def __init__(self, topic: str, partition: int, head_offset: int, head_hash: bytes):
        self.partition = partition
        self.topic_part = topic_part_bytes(topic, partition)
        self.head_offset = head_offset  # last chained offset (-1: none)
        self.head_hash = head_hash
        self.rows: list[tuple] = []       # (offset, ts_ms, status, reason, event, payload, prev, entry)
        self.oldest = 0.0


class Baseline:
    def __init__(self, args):
        import boto3
        import pyarrow as pa
        import pyarrow.parquet as pq
        from confluent_kafka import Consumer

        self.args = args
        self.pa, self.pq = pa, pq
        self.schema = arrow_schema(pa)
        session = boto3.session.Session(
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            region_name=args.region)
        self.s3 = session.client("s3", endpoint_url=args.endpoint_url)
        self.table = None
        if args.dynamodb:
            self.table = self.ensure_table(session.resource("dynamodb", endpoint_url=args.endpoint_url))
        self.ensure_bucket()
        self.consumer = Consumer({
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10000,
            "log_level": 3,
        })
        self.parts: dict[int, PartitionState] = {}
        self.events = 0
        self.flushes = 0
        self.objects = 0
        self.parquet_bytes = 0
        self.index_items = 0
        self.rejected = 0
        self.t_first: float | None = None
        self.t_last_commit: float | None = None
        self.assigned_at: float | None = None

    # -- setup
    def ensure_bucket(self):
        try:
            self.s3.head_bucket(Bucket=self.args.bucket)
        except Exception:  # noqa: BLE001  (404 or 403: try to create it)
            self.s3.create_bucket(Bucket=self.args.bucket)

    def ensure_table(self, ddb):
        name = self.args.table
        existing = [t.name for t in ddb.tables.all()]
        if name not in existing:
            defs = [{"AttributeName": n, "AttributeType": "S"} for n in ("PK", "SK", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK")]
            gsi = [{"IndexName": f"GSI{i}",
                    "KeySchema": [{"AttributeName": f"GSI{i}PK", "KeyType": "HASH"},
                                  {"AttributeName": f"GSI{i}SK", "KeyType": "RANGE"}],
                    "Projection": {"ProjectionType": "ALL"}} for i in (1, 2)]
            ddb.create_table(TableName=name, BillingMode="PAY_PER_REQUEST", AttributeDefinitions=defs,
                             KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"},
                                        {"AttributeName": "SK", "KeyType": "RANGE"}],
                             GlobalSecondaryIndexes=gsi)
        table = ddb.Table(name)
        table.wait_until_exists()
        return table

    def head_key(self, partition: int) -> str:
        return f"{self.args.prefix}/_heads/{self.args.topic}/p{partition:04d}.json"

    # -- rebalance
    def on_assign(self, consumer, tps):
        self.assigned_at = self.assigned_at or time.time()
        for tp in tps:
            try:
                head = json.loads(self.s3.get_object(Bucket=self.args.bucket, Key=self.head_key(tp.partition))["Body"].read())
                state = PartitionState(self.args.topic, tp.partition, head["last_offset"], bytes.fromhex(head["last_hash"]))
            except self.s3.exceptions.NoSuchKey:
                state = PartitionState(self.args.topic, tp.partition, -1, genesis(self.args.topic, tp.partition))
            self.parts[tp.partition] = state
        log(f"assigned {sorted(tp.partition for tp in tps)}")

    def on_revoke(self, consumer, tps):
        self.flush([tp.partition for tp in tps if tp.partition in self.parts])
        for tp in tps:
            self.parts.pop(tp.partition, None)

    # -- per record
    def admit(self, msg):
        state = self.parts.get(msg.partition())
        offset = msg.offset()
        if state is None or offset <= state.head_offset:
            return  # revoked, or already chained before a restart
        payload = msg.value() or b""
        event, reason = parse_event(msg.value())
        status = 0 if event is not None else 1
        prev = state.rows[-1][7] if state.rows else state.head_hash
        entry = entry_hash(prev, state.topic_part, offset, status, payload)
        ts_type, ts = msg.timestamp()
        if not state.rows:
            state.oldest = time.time()
        state.rows.append((offset, ts if ts_type else None, status, reason, event, payload, prev, entry))
        self.events += 1
        self.rejected += status

    # -- flush
    def due(self, now: float) -> list[int]:
        return [p for p, s in self.parts.items()
                if s.rows and (len(s.rows) >= self.args.max_records or now - s.oldest >= self.args.max_age_ms / 1000)]

    def flush(self, partitions: list[int]):
        from confluent_kafka import TopicPartition
        commits = []
        for p in partitions:
            state = self.parts[p]
            if not state.rows:
                continue
            rows, state.rows = state.rows, []
            key = self.write_segment(p, rows)
            if self.table is not None:
                self.write_index(p, rows, key)
            last_offset, last_hash = rows[-1][0], rows[-1][7]
            self.s3.put_object(Bucket=self.args.bucket, Key=self.head_key(p),
                               Body=json.dumps({"last_offset": last_offset, "last_hash": last_hash.hex()}).encode())
            state.head_offset, state.head_hash = last_offset, last_hash
            commits.append(TopicPartition(self.args.topic, p, last_offset + 1))
            self.flushes += 1
        if commits:
            self.consumer.commit(offsets=commits, asynchronous=False)
            self.t_last_commit = time.time()

    def write_segment(self, partition: int, rows: list[tuple]) -> str:
        pa = self.pa
        first_offset, last_offset = rows[0][0], rows[-1][0]
        first = rows[0]
        if first[4] is not None:
            when = first[4]["occurred_at"]
            directory = f"year={when.year:04d}/month={when.month:02d}/day={when.day:02d}/environment={first[4]['environment']}"
        else:
            when = datetime.fromtimestamp((first[1] or 0) / 1000, tz=timezone.utc)
            directory = f"quarantine/year={when.year:04d}/month={when.month:02d}/day={when.day:02d}"
        key = f"{self.args.prefix}/{directory}/{self.args.topic}-p{partition:04d}-{first_offset:020d}-{last_offset:020d}.parquet"

        n = len(rows)
        events = [r[4] or {} for r in rows]
        col = lambda name: [e.get(name) for e in events]  # noqa: E731
        columns = {
            "kafka_topic": [self.args.topic] * n,
            "kafka_partition": [partition] * n,
            "kafka_offset": [r[0] for r in rows],
            "kafka_timestamp": [r[1] for r in rows],
            "status": ["accepted" if r[2] == 0 else "rejected" for r in rows],
            "reject_code": [None if r[2] == 0 else "invalid" for r in rows],
            "reject_reason": [r[3] for r in rows],
            "occurred_at": col("occurred_at"),
            "confidence_score": [float(s) if s is not None else None for s in col("confidence_score")],
            "metadata": [json.dumps(m, separators=(",", ":")) if m is not None else None for m in col("metadata")],
            "payload": [r[5] for r in rows],
            "prev_hash": [r[6].hex() for r in rows],
            "entry_hash": [r[7].hex() for r in rows],
        }
        for name in STR_FIELDS:
            values = col(name)
            columns[name] = [v if isinstance(v, str) else None for v in values]
        table = pa.Table.from_pydict({f.name: columns[f.name] for f in self.schema}, schema=self.schema)
        sink = pa.BufferOutputStream()
        self.pq.write_table(table, sink, compression="zstd", compression_level=3, row_group_size=131072,
                            write_statistics=True)
        body = sink.getvalue().to_pybytes()
        self.s3.put_object(Bucket=self.args.bucket, Key=key, Body=body)
        self.objects += 1
        self.parquet_bytes += len(body)
        return key

    def write_index(self, partition: int, rows: list[tuple], segment_key: str):
        topic = self.args.topic
        with self.table.batch_writer(overwrite_by_pkeys=["PK", "SK"]) as batch:
            for offset, _ts, status, _reason, event, payload, _prev, entry in rows:
                if status != 0:
                    continue  # rejected records are not indexed
                at = event["occurred_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                kind = event["event_type"]
                if kind == "decision":
                    sk = "DECISION"
                else:
                    sk = f"{kind.upper()}#{at}#{topic}#{partition}#{offset}"
                item = {
                    "PK": f"DECISION#{event['decision_id']}", "SK": sk,
                    "GSI1PK": f"USER#{event['user_id']}", "GSI1SK": f"{at}#{kind}#{event['decision_id']}",
                    "GSI2PK": f"SESSION#{event['session_id']}", "GSI2SK": f"{at}#{kind}#{event['decision_id']}",
                    "occurred_at": at, "kafka_topic": topic, "kafka_partition": partition, "kafka_offset": offset,
                    "entry_hash": entry.hex(), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                    "segment_key": segment_key,
                }
                for name in STR_FIELDS + ["environment"]:
                    if isinstance(event.get(name), str):
                        item[name] = event[name]
                if event.get("confidence_score") is not None:
                    item["confidence_score"] = decimal.Decimal(str(event["confidence_score"]))
                if event.get("metadata") is not None:
                    item["metadata"] = json.dumps(event["metadata"], separators=(",", ":"))
                batch.put_item(Item=item)
                self.index_items += 1

    # -- main loop
    def run(self) -> dict:
        from confluent_kafka import KafkaError
        started = time.time()
        self.consumer.subscribe([self.args.topic], on_assign=self.on_assign, on_revoke=self.on_revoke)
        last_record = None
        try:
            while True:
                msgs = self.consumer.consume(num_messages=self.args.batch, timeout=0.2)
                now = time.time()
                got = False
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log(f"consumer error: {err}")
                        continue
                    if self.t_first is None:
                        self.t_first = now
                    self.admit(msg)
                    got = True
                if got:
                    last_record = now
                due = self.due(time.time())
                if due:
                    self.flush(due)
                idle_since = last_record or self.assigned_at
                if idle_since is not None and time.time() - idle_since >= self.args.idle:
                    self.flush(list(self.parts))
                    log(f"no records for {self.args.idle:g} s; stopping")
                    break
                if self.assigned_at is None and time.time() - started > self.args.assign_timeout:
                    raise SystemExit(f"no partitions assigned after {self.args.assign_timeout} s")
        finally:
            self.consumer.close()
        seconds = (self.t_last_commit - self.t_first) if self.t_first and self.t_last_commit else 0.0
        return {
            "events": self.events,
            "seconds": round(seconds, 3),
            "events_per_s": round(self.events / seconds, 1) if seconds > 0 else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mode": "s3+dynamodb" if self.table is not None else "s3-only",
            "rejected": self.rejected,
            "flushes": self.flushes,
            "objects": self.objects,
            "parquet_bytes": self.parquet_bytes,
            "index_items": self.index_items,
            "wall_seconds": round(time.time() - started, 3),
            "t_first_record": self.t_first,
            "t_last_commit": self.t_last_commit,
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default=os.environ.get("AEGIS_KAFKA__BROKERS", "127.0.0.1:9092"))
    ap.add_argument("--topic")
    ap.add_argument("--group")
    ap.add_argument("--bucket")
    ap.add_argument("--prefix", default="trail")
    ap.add_argument("--endpoint-url", default=os.environ.get("AEGIS_S3__ENDPOINT_URL", "http://127.0.0.1:5000"))
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--dynamodb", action="store_true", help="also write the DynamoDB index (batch_writer)")
    ap.add_argument("--table", help="DynamoDB index table (created if missing); default <bucket>-index")
    ap.add_argument("--max-records", type=int, default=100_000)
    ap.add_argument("--max-age-ms", type=int, default=5_000)
    ap.add_argument("--idle", type=float, default=5.0, help="stop after this many seconds without a record")
    ap.add_argument("--batch", type=int, default=5_000, help="max messages per consume() call")
    ap.add_argument("--assign-timeout", type=float, default=60.0)
    ap.add_argument("--self-test", action="store_true", help="check the CHAIN.md test vectors and exit")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return
    if not (args.topic and args.group and args.bucket):
        ap.error("--topic, --group and --bucket are required")
    args.table = args.table or f"{args.bucket}-index"
    result = Baseline(args).run()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
