"""Bad input never crashes the consumer and is never lost: each rejected record is in the
dead-letter topic (original bytes, reason headers) and in S3 quarantine, the chain accounts for
every offset, and no record text can become a path. Checked with confluent-kafka, boto3,
pyarrow and hashlib."""
import json
import os
import random
import signal
from datetime import datetime, timedelta, timezone

import jsonschema
from confluent_kafka import Consumer, TopicPartition

import trail
from conftest import BROKERS, REPO, committed_offsets, http, make_event, wait_for

MAX_BYTES = 4096


def bad_records(rng):
    """(payload, expected reject_code) for every kind of bad input."""
    good = make_event(0, rng, kind="decision")

    def variant(**changes):
        e = dict(good)
        for k, v in changes.items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        return json.dumps(e).encode()

    long_ago = (datetime.now(timezone.utc) - timedelta(days=4000)).isoformat()
    return [
        (b"this is not json", "not_json"),
        (b"\xff\xfe\xfd{}", "not_utf8"),
        (variant(confidence_score="very"), "schema"),
        (variant(user_id=None), "schema"),
        (variant(event_type="vote"), "unknown_event_type"),
        (variant(metadata={"pad": "x" * MAX_BYTES}), "oversize"),
        (variant(occurred_at="last tuesday"), "bad_timestamp"),
        (variant(occurred_at=long_ago), "timestamp_out_of_range"),
        (variant(environment="../../escape"), "bad_environment"),
        (variant(environment="a/b"), "bad_environment"),
        (variant(environment=""), "bad_environment"),
        (variant(environment="prød"), "bad_environment"),
        (variant(environment="x" * 40), "bad_environment"),
        # The optional fields' rules hold on every event type; an array is not an event.
        (variant(severity="extreme"), "invalid_field"),
        (variant(reviewer_id=""), "invalid_field"),
        (variant(original_action="a\u0007b"), "invalid_field"),
        (json.dumps(list(good.values())).encode(), "schema"),
        (None, "null_payload"),
    ]


# Reject codes whose verdict the JSON schema alone decides (the others need the byte size, the
# Kafka timestamp or a parse that fails before any schema applies).
SCHEMA_CODES = {"schema", "unknown_event_type", "invalid_field", "bad_environment"}


def test_bad_records_go_to_dead_letters_and_quarantine_and_chain_has_no_gap(aegis, tmp_path):
    aegis.init()
    rng = random.Random(5)
    bad = bad_records(rng)
    # Interleave good and bad records on one partition so ordering is deterministic.
    stream = []
    for i, (payload, code) in enumerate(bad):
        stream.append((json.dumps(make_event(100 + i, rng)).encode(), None))
        stream.append((payload, code))
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": BROKERS, "acks": "all"})
    offsets, stamps = [], {}

    def delivered(err, msg, code, payload):
        assert err is None, err
        offsets.append((msg.offset(), code, payload))
        stamps[msg.offset()] = msg.timestamp()[1]  # the broker's record timestamp, independently

    for payload, code in stream:
        producer.produce(aegis.topic, value=payload, partition=1,
                         on_delivery=lambda err, msg, code=code, payload=payload: delivered(err, msg, code, payload))
    producer.flush(30)
    assert len(offsets) == len(stream) and all(stamps.values())

    aegis.consume_until_idle(AEGIS_VALIDATION__MAX_RECORD_BYTES=str(MAX_BYTES))

    # S3: accepted rows in the trail, rejected rows in quarantine with the right reason.
    rows = trail.read_rows(aegis.bucket, "trail/")
    by_offset = {r["kafka_offset"]: r for r in rows if r["kafka_partition"] == 1}
    for offset, code, payload in offsets:
        row = by_offset[offset]
        assert round(row["kafka_timestamp"].timestamp() * 1000) == stamps[offset], offset
        if code is None:
            assert row["status"] == "accepted" and "/quarantine/" not in row["_key"]
        else:
            assert row["status"] == "rejected", (offset, code)
            assert row["reject_code"] == code, (offset, row["reject_reason"])
            assert row["_key"].startswith("trail/quarantine/year=")
            assert row["payload"] == (payload or b"")
    # schemas/decision-event.schema.json, read by an independent validator, gives every record
    # the verdict the consumer gave it.
    validator = jsonschema.Draft202012Validator(json.load(open(os.path.join(REPO, "schemas", "decision-event.schema.json"))))
    judged = [(code, json.loads(payload)) for _, code, payload in offsets if code is None or code in SCHEMA_CODES]
    assert len(judged) > len(bad) + 3
    for code, event in judged:
        assert validator.is_valid(event) == (code is None), (code, event)
    # The chain covers every offset, accepted or rejected: no gap for a verifier.
    counts = trail.verify_chains(rows)
    assert counts[(aegis.topic, 1)] == len(stream)
    # No record text became a path: only validated environments, nothing outside the prefix.
    keys = trail.list_keys(aegis.bucket)
    assert all(k.startswith("trail/") and ".." not in k for k in keys), keys
    envs = {k.split("environment=")[1].split("/")[0] for k in keys if "environment=" in k}
    assert envs <= {"prod", "staging", "dev"}, envs

    # Dead-letter topic: original bytes and reason headers for each bad offset.
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": aegis.group + "-dlq-reader", "auto.offset.reset": "earliest"})
    consumer.subscribe([aegis.dlq])
    letters = {}
    deadline = 60
    import time
    end = time.time() + deadline
    expected = {o for o, code, _ in offsets if code}
    while time.time() < end and set(letters) != expected:
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        headers = {k: v.decode() for k, v in (msg.headers() or [])}
        letters[int(headers["aegis.source_offset"])] = (headers, msg.value())
    consumer.close()
    assert set(letters) == expected
    for offset, code, payload in offsets:
        if code:
            headers, value = letters[offset]
            assert headers["aegis.reason_code"] == code
            assert headers["aegis.source_topic"] == aegis.topic and headers["aegis.source_partition"] == "1"
            assert headers["aegis.reason"]
            assert value == payload, "the original bytes; no value for a record without one"
            assert int(headers["aegis.source_timestamp"]) == stamps[offset]

    # The consumer kept going and committed past everything.
    assert committed_offsets(aegis.group, aegis.topic, 4)[1] == offsets[-1][0] + 1


def test_bad_configuration_stops_startup_with_one_line_naming_the_key(aegis):
    aegis.init()
    unlocked = aegis.bucket + "-nolock"
    trail.s3().create_bucket(Bucket=unlocked)
    cases = [
        ({"AEGIS_S3__BUCKET": aegis.bucket + "-missing"}, "s3.bucket", "does not exist"),
        ({"AEGIS_DYNAMODB__TABLE": aegis.table + "-missing"}, "dynamodb.table", "does not exist"),
        ({"AEGIS_DYNAMODB__CHAIN_TABLE": aegis.chain_table + "-missing"}, "dynamodb.chain_table", "does not exist"),
        ({"AEGIS_S3__BUCKET": unlocked}, "s3.object_lock_retention_days", "no Object Lock"),
        ({"AEGIS_KAFKA__TOPIC": aegis.topic + "-missing"}, "kafka.topic", "does not exist"),
        ({"AEGIS_SEGMENT__MAX_RECORDS": "0"}, "segment.max_records", "at least 1"),
        ({"AEGIS_SEGMENT__MAX_RECRODS": "5"}, "max_recrods", "unknown field"),
    ]
    for env, key, words in cases:
        out = aegis.run("run", check=False, timeout=90, **env)
        assert out.returncode == 2, (env, out.returncode, out.stderr[-2000:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and key in last.lower() and words in last, (env, last)

    # A backend that does not answer may be an outage: the process waits (alive, not ready,
    # /readyz naming the key) instead of exiting into a crash loop, and a SIGTERM ends the wait.
    unreachable = [
        ({"AEGIS_S3__ENDPOINT_URL": "http://127.0.0.1:1"}, "s3.endpoint_url", "cannot connect"),
        ({"AEGIS_KAFKA__BROKERS": "127.0.0.1:1"}, "kafka.brokers", "cannot reach"),
    ]
    for env, key, words in unreachable:
        proc = aegis.start("run", **env)
        try:
            def readyz():
                return http(aegis, "/readyz")
            wait_for(lambda: key in readyz()[1], timeout=60, what=f"/readyz to name {key}")
            status, body = readyz()
            assert status == 503 and "start-up check waiting" in body and words in body, (env, status, body)
            assert proc.poll() is None, f"{env}: exited instead of waiting"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        assert code == 0, (env, code, open(aegis.logs[-1]).read()[-2000:])


def test_duplicate_decision_id_keeps_earliest_winner_and_marks_conflict(aegis, tmp_path):
    """Same decision_id with different content on several partitions: every record stays in the
    trail; the index holds the earliest (ties: lowest partition, then offset) as the decision,
    marked `conflict`, and every other record as a DUPLICATE# item (schemas/dynamodb-layout.md)."""
    import hashlib
    from test_pipeline import check_trail

    aegis.init()
    rng = random.Random(11)
    now = datetime.now(timezone.utc).replace(microsecond=0)

    def decision(i, decision_id, minutes_ago, action):
        e = make_event(i, rng, kind="decision", decision_id=decision_id)
        e.update(occurred_at=(now - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z"), action=action)
        return json.dumps(e).encode()

    late = decision(1, "dup-1", 5, "approve")
    early = decision(2, "dup-1", 9, "deny")  # the winner: earliest occurred_at
    tie_p0 = decision(3, "dup-2", 7, "approve")
    tie_p2 = decision(4, "dup-2", 7, "deny")  # same occurred_at: partition 0 outranks partition 2
    same_a = decision(5, "dup-3", 3, "approve")
    # (payload, partition): the later version first, a byte-identical redelivery, a clean id.
    stream = [(late, 0), (tie_p2, 2), (same_a, 1), (early, 1), (late, 3), (tie_p0, 0), (same_a, 3),
              (decision(6, "solo", 1, "deny"), 2)]
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": BROKERS, "acks": "all"})
    delivered = []
    for payload, partition in stream:
        producer.produce(aegis.topic, payload, partition=partition,
                         on_delivery=lambda err, m: delivered.append((m.partition(), m.offset(), m.value())))
        producer.flush(10)
    assert len(delivered) == len(stream)
    aegis.consume_until_idle()
    check_trail(aegis, tmp_path, delivered)  # every record, conflicting or not, is in the trail

    ddb = trail.dynamodb()

    def items(decision_id):
        out = ddb.query(TableName=aegis.table, KeyConditionExpression="PK = :pk",
                        ExpressionAttributeValues={":pk": {"S": f"DECISION#{decision_id}"}}, ConsistentRead=True)["Items"]
        return {i["SK"]["S"]: i for i in out}

    def sha(payload):
        return hashlib.sha256(payload).hexdigest()

    dup1 = items("dup-1")
    winner = dup1["DECISION"]
    assert winner["action"]["S"] == "deny" and winner["payload_sha256"]["S"] == sha(early)
    assert winner["conflict"]["BOOL"] is True
    duplicates = sorted((i["kafka_partition"]["N"], i["payload_sha256"]["S"]) for sk, i in dup1.items() if sk.startswith("DUPLICATE#"))
    assert duplicates == [("0", sha(late)), ("3", sha(late))], duplicates
    assert not any("GSI1PK" in i for sk, i in dup1.items() if sk != "DECISION"), "losers stay out of the user index"

    dup2 = items("dup-2")
    assert dup2["DECISION"]["kafka_partition"]["N"] == "0" and dup2["DECISION"]["conflict"]["BOOL"] is True
    assert [i["action"]["S"] for sk, i in dup2.items() if sk.startswith("DUPLICATE#")] == ["deny"]

    dup3 = items("dup-3")  # identical bytes twice: a redelivery, kept but not a conflict
    assert "conflict" not in dup3["DECISION"] and dup3["DECISION"]["kafka_partition"]["N"] == "1"
    assert [i["payload_sha256"]["S"] for sk, i in dup3.items() if sk.startswith("DUPLICATE#")] == [sha(same_a)]

    solo = items("solo")
    assert list(solo) == ["DECISION"] and "conflict" not in solo["DECISION"]

    # rebuild-index applies the same winner rule: from S3 alone, the same items.
    def scan():
        found = []
        for page in ddb.get_paginator("scan").paginate(TableName=aegis.table, ConsistentRead=True):
            found += page["Items"]
        return sorted(found, key=lambda i: (i["PK"]["S"], i["SK"]["S"]))

    consumer_items = scan()
    ddb.delete_table(TableName=aegis.table)
    ddb.get_waiter("table_not_exists").wait(TableName=aegis.table, WaiterConfig={"Delay": 1})
    aegis.init()
    assert scan() == []
    aegis.run("rebuild-index", "--checkpoint", str(tmp_path / "rebuild.checkpoint"))
    assert scan() == consumer_items
