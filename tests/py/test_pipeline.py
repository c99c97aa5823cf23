"""The main job end to end on the local stack, checked with independent readers:
confluent-kafka (producer, committed offsets), boto3 + pyarrow (objects, rows), DuckDB over the
Hive layout (what Athena sees), hashlib (the chain, per schemas/CHAIN.md)."""
import datetime
import json
import random
import signal

import duckdb
from boto3.dynamodb.conditions import Key  # noqa: F401  (boto3 is the independent DynamoDB client)

import trail
from conftest import committed_offsets, make_event, produce, wait_for


def produce_events(aegis, n, seed=1, start=0, extra=(), **kw):
    rng = random.Random(seed)
    events = [make_event(start + i, rng) for i in range(n)] + list(extra)
    payloads = [json.dumps(e).encode() for e in events]
    delivered = produce(aegis.topic, payloads, partitions=aegis.partitions, **kw)
    return events, delivered


def duckdb_rows(tmp_path, bucket):
    dest = tmp_path / "mirror"
    trail.download(bucket, str(dest), "trail/")
    con = duckdb.connect()
    glob = str(dest / "trail" / "year=*" / "month=*" / "day=*" / "environment=*" / "*.parquet")
    return con, glob


def check_trail(aegis, tmp_path, delivered):
    """Every produced offset exactly once, right columns and partitions, every chain links."""
    con, glob = duckdb_rows(tmp_path, aegis.bucket)
    total, distinct = con.execute(
        f"select count(*), count(distinct (kafka_partition, kafka_offset)) from read_parquet('{glob}', hive_partitioning=1)"
    ).fetchone()
    assert total == len(delivered), f"{total} rows for {len(delivered)} produced records"
    assert distinct == total, f"{total - distinct} duplicate rows"
    want = {(p, o) for p, o, _ in delivered}
    got = set(con.execute(f"select kafka_partition, kafka_offset from read_parquet('{glob}', hive_partitioning=1)").fetchall())
    assert got == want, f"missing {sorted(want - got)[:5]} extra {sorted(got - want)[:5]}"
    # Partition values in the key agree with the event's own fields (UTC date, environment).
    mismatched = con.execute(f"""
        select count(*) from read_parquet('{glob}', hive_partitioning=1)
        where cast(year as int) is distinct from year(occurred_at at time zone 'UTC')
           or cast(month as int) is distinct from month(occurred_at at time zone 'UTC')
           or cast(day as int) is distinct from day(occurred_at at time zone 'UTC')
           or environment is distinct from json_extract_string(decode(payload), '$.environment')
           or decision_id is distinct from json_extract_string(decode(payload), '$.decision_id')
    """).fetchone()[0]
    assert mismatched == 0
    # The payload column is the exact bytes produced.
    produced = {(p, o): v for p, o, v in delivered}
    rows = trail.read_rows(aegis.bucket, "trail/")
    for r in rows:
        assert r["payload"] == produced[(r["kafka_partition"], r["kafka_offset"])]
        assert r["status"] == "accepted" and r["kafka_topic"] == aegis.topic
    counts = trail.verify_chains(rows)
    assert sum(counts.values()) == len(delivered)
    assert len(counts) == aegis.partitions
    # The chain table's heads (read with boto3) are the last entries in S3: no writer moved a
    # head back, or past what it wrote.
    for p in range(aegis.partitions):
        last = max((r for r in rows if r["kafka_partition"] == p), key=lambda r: r["kafka_offset"])
        head = trail.chain_head(aegis.chain_table, aegis.topic, p)
        assert (int(head["last_offset"]["N"]), head["last_hash"]["S"]) == (last["kafka_offset"], last["entry_hash"]), p
    # And aegis-audit's own verifier agrees, signed digests included (the consumer signs at
    # AEGIS_DIGEST__INTERVAL_MS and on shutdown, so everything is covered after a clean stop).
    report = aegis.verify()
    assert report["ok"], report["problems"][:5]
    assert report["records"] == len(delivered) and report["digests"] >= aegis.partitions
    return rows


def check_commits(aegis, delivered):
    end = {}
    for p, o, _ in delivered:
        end[p] = max(end.get(p, -1), o + 1)
    committed = committed_offsets(aegis.group, aegis.topic, aegis.partitions)
    assert committed == end, f"committed {committed} != end offsets {end}"


def test_end_to_end_four_partitions(aegis, tmp_path):
    aegis.init()
    # Three overrides of one decision, sent out of time order (round robin: on three partitions),
    # for the documented current-state lookup below.
    rng = random.Random(5)
    reviews = []
    for n, (minutes, action) in enumerate([(2, "approve"), (0, "deny"), (1, "escalate")]):
        review = make_event(900_000 + n, rng, kind="override", decision_id="dec-000000")
        at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=10 - minutes)
        review.update(occurred_at=at.isoformat().replace("+00:00", "Z"), action=action)
        reviews.append(review)
    events, delivered = produce_events(aegis, 1200, extra=reviews)
    aegis.consume_until_idle(AEGIS_S3__SSE="AES256")
    assert json.loads(aegis.run("status", "--json").stdout)["members"] == [], "a clean exit leaves the group"
    rows = check_trail(aegis, tmp_path, delivered)
    check_commits(aegis, delivered)

    # Parquet is ZSTD with statistics, per schemas/parquet-columns.md.
    import pyarrow.parquet as pq, io
    key = rows[0]["_key"]
    meta = pq.ParquetFile(io.BytesIO(trail.s3().get_object(Bucket=aegis.bucket, Key=key)["Body"].read())).metadata
    col = meta.row_group(0).column(2)
    assert col.path_in_schema == "kafka_offset" and col.compression == "ZSTD" and col.statistics.has_min_max
    kv = {k.decode(): v.decode() for k, v in meta.metadata.items()}
    assert kv["aegis.topic"] == aegis.topic
    head = trail.s3().head_object(Bucket=aegis.bucket, Key=key, ChecksumMode="ENABLED")
    assert head.get("ObjectLockMode") == "COMPLIANCE"
    assert head.get("ServerSideEncryption") == "AES256"
    body = trail.s3().get_object(Bucket=aegis.bucket, Key=key)["Body"].read()
    import base64, hashlib
    assert head.get("ChecksumSHA256") == base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert int(head["Metadata"]["aegis-rows"]) == meta.num_rows
    assert head["Metadata"]["aegis-sha256"] == hashlib.sha256(body).hexdigest()
    # config/local.toml: one day of compliance retention from the write.
    until = head["ObjectLockRetainUntilDate"] - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(hours=23) < until <= datetime.timedelta(days=1, minutes=5), until

    # DynamoDB index, read with boto3: every decision, override and flag; GSI1 and GSI2.
    ddb = trail.dynamodb()
    by_key = {}
    for page in ddb.get_paginator("scan").paginate(TableName=aegis.table):
        for item in page["Items"]:
            by_key[(item["PK"]["S"], item["SK"]["S"])] = item
    offsets_by_event = {}
    for (p, o, v) in delivered:
        offsets_by_event[json.loads(v)["request_id"]] = (p, o)
    decisions = [e for e in events if e["event_type"] == "decision"]
    overrides = [e for e in events if e["event_type"] == "override"]
    flags = [e for e in events if e["event_type"] == "safety_flag"]
    assert len(by_key) == len(events), f"{len(by_key)} items for {len(events)} events"
    for e in decisions[:50]:
        items = ddb.query(TableName=aegis.table, KeyConditionExpression="PK = :pk",
                          ExpressionAttributeValues={":pk": {"S": f"DECISION#{e['decision_id']}"}})["Items"]
        decision_items = [i for i in items if i["SK"]["S"] == "DECISION"]
        assert len(decision_items) == 1 and decision_items[0]["action"]["S"] == e["action"]
        assert "conflict" not in decision_items[0] and not any(i["SK"]["S"].startswith("DUPLICATE#") for i in items)
        assert decision_items[0]["segment_key"]["S"].startswith("trail/year=")
    for e in overrides[:20]:
        items = ddb.query(TableName=aegis.table, KeyConditionExpression="PK = :pk AND begins_with(SK, :o)",
                          ExpressionAttributeValues={":pk": {"S": f"DECISION#{e['decision_id']}"}, ":o": {"S": "OVERRIDE#"}})["Items"]
        assert any(i["reviewer_id"]["S"] == e["reviewer_id"] for i in items)
    # The documented current state (schemas/dynamodb-layout.md): the newest override's action.
    overridden, checked = {}, 0
    for e in overrides:
        overridden.setdefault(e["decision_id"], []).append(e)
    for decision_id, its in [("dec-000000", overridden["dec-000000"])] + list(overridden.items())[:20]:
        newest = ddb.query(TableName=aegis.table, KeyConditionExpression="PK = :pk AND begins_with(SK, :o)",
                           ExpressionAttributeValues={":pk": {"S": f"DECISION#{decision_id}"}, ":o": {"S": "OVERRIDE#"}},
                           ScanIndexForward=False, Limit=1)["Items"]
        at = lambda e: datetime.datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00"))  # noqa: E731
        latest = [e for e in its if at(e) == max(map(at, its))]
        if len(latest) == 1:  # (a tie in time: some order of the coordinates)
            assert [i["action"]["S"] for i in newest] == [latest[0]["action"]], (decision_id, newest, its)
            checked += 1
    assert len(overridden["dec-000000"]) >= 3 and checked, "no decision with several overrides to look up"
    user = events[0]["user_id"]
    gsi1 = []
    for page in ddb.get_paginator("query").paginate(TableName=aegis.table, IndexName="GSI1", KeyConditionExpression="GSI1PK = :u",
                                                    ExpressionAttributeValues={":u": {"S": f"USER#{user}"}}):
        gsi1 += page["Items"]
    assert sorted(i["request_id"]["S"] for i in gsi1) == sorted(e["request_id"] for e in events if e["user_id"] == user)
    session = events[0]["session_id"]
    gsi2 = ddb.query(TableName=aegis.table, IndexName="GSI2", KeyConditionExpression="GSI2PK = :s",
                     ExpressionAttributeValues={":s": {"S": f"SESSION#{session}"}})["Items"]
    assert sorted(i["request_id"]["S"] for i in gsi2) == sorted(e["request_id"] for e in events if e["session_id"] == session)
    assert flags, "the generator made no safety flags"
    for e in flags[:20]:
        items = ddb.query(TableName=aegis.table, KeyConditionExpression="PK = :pk AND begins_with(SK, :f)",
                          ExpressionAttributeValues={":pk": {"S": f"DECISION#{e['decision_id']}"},
                                                     ":f": {"S": "SAFETY_FLAG#"}})["Items"]
        mine = [i for i in items if i["request_id"]["S"] == e["request_id"]]
        assert len(mine) == 1, items
        assert (mine[0]["safety_category"]["S"], mine[0]["severity"]["S"]) == (e["safety_category"], e["severity"])


def test_sse_kms_encrypts_every_object_with_the_configured_key(aegis, tmp_path):
    aegis.init()
    key = trail.kms().create_key(Description="aegis-audit test")["KeyMetadata"]["Arn"]
    _, delivered = produce_events(aegis, 200, seed=7)
    aegis.consume_until_idle(AEGIS_S3__SSE="aws:kms", AEGIS_S3__SSE_KMS_KEY_ID=key)
    check_trail(aegis, tmp_path, delivered)
    objects = trail.list_keys(aegis.bucket)
    assert any(k.endswith(".parquet") for k in objects) and any(k.endswith(".digest") for k in objects), objects
    for name in objects:
        head = trail.s3().head_object(Bucket=aegis.bucket, Key=name)
        assert (head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")) == ("aws:kms", key), name


def test_restart_mid_stream_continues_chain_without_gap_or_duplicate(aegis, tmp_path):
    aegis.init()
    _, first = produce_events(aegis, 900, seed=2)
    # Small flushes (about 22 per partition), so the kill lands with most of them still to come.
    consumer = aegis.start("run", AEGIS_SEGMENT__MAX_RECORDS="10")
    # Kill it hard once some, but not all, segments are durable.
    wait_for(lambda: len([k for k in trail.list_keys(aegis.bucket, "trail/") if k.endswith(".parquet")]) >= 2,
             timeout=90, interval=0.05, what="first segments")
    consumer.send_signal(signal.SIGKILL)
    consumer.wait(timeout=30)
    assert len(trail.read_rows(aegis.bucket, "trail/")) < 900, "the kill came after everything was durable"
    # A killed member holds its partitions until its session times out (config/local.toml: 10 s).
    # tansu 0.6.0 never reassigns them if another member joins and leaves meanwhile, so wait
    # until `status` no longer lists it (on tansu: its last heartbeat in the chain table is 20 s
    # old, which is past the session).
    wait_for(lambda: not json.loads(aegis.run("status", "--json").stdout)["members"], timeout=60,
             what="the killed member's session to expire")
    _, second = produce_events(aegis, 600, seed=3, start=900)
    # Restart, stop gracefully (SIGTERM) mid-stream once it holds partitions, then run to the end.
    consumer = aegis.start("run")
    log = aegis.logs[-1]
    wait_for(lambda: "flushed" in open(log).read(), timeout=90, what="a flush after restart")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0
    assert json.loads(aegis.run("status", "--json").stdout)["members"] == [], "SIGTERM leaves the group"
    aegis.consume_until_idle()
    delivered = first + second
    check_trail(aegis, tmp_path, delivered)
    check_commits(aegis, delivered)
