"""Operating it on the local stack: status, replay (idempotent), rebuild-index (equal items,
resumable), prune (whole expired flushes, Object Lock respected, verify still holds), lifecycle,
athena-ddl, and the metrics endpoint's counters against what was produced."""
import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.request
from datetime import datetime, timezone

from confluent_kafka.admin import AdminClient, NewTopic

import trail
from conftest import BIN, REPO, committed_offsets, make_event, private_broker, produce, wait_for


def produce_mix(aegis, n, seed, start=0, day_offset=0, bad=0):
    rng = random.Random(seed)
    payloads = [json.dumps(make_event(start + i, rng, day_offset=day_offset)).encode() for i in range(n)]
    payloads += [b"not json %d" % i for i in range(bad)]
    return produce(aegis.topic, payloads, partitions=aegis.partitions)


def end_offsets(delivered):
    end = {}
    for p, o, _ in delivered:
        end[p] = max(end.get(p, -1), o + 1)
    return end


def snapshot_objects(bucket):
    """Every version and delete marker of every key: a rewrite with the same bytes still adds one."""
    seen = set()
    for page in trail.s3().get_paginator("list_object_versions").paginate(Bucket=bucket):
        seen |= {(v["Key"], v["VersionId"], v["ETag"]) for v in page.get("Versions", [])}
        seen |= {(m["Key"], m["VersionId"], "delete marker") for m in page.get("DeleteMarkers", [])}
    return seen


def snapshot_index(table):
    items = []
    for page in trail.dynamodb().get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        items += page["Items"]
    return sorted(items, key=lambda i: (i["PK"]["S"], i["SK"]["S"]))


def test_status_replay_and_rebuild_index(aegis, tmp_path):
    aegis.init()
    delivered = produce_mix(aegis, 800, seed=31)
    aegis.consume_until_idle(AEGIS_SEGMENT__MAX_RECORDS="50")
    end = end_offsets(delivered)

    status = json.loads(aegis.run("status", "--json").stdout)
    assert status["members"] == [] and status["total_lag"] == 0
    for p in status["partitions"]:
        assert p["committed"] == p["end_offset"] == end[p["partition"]]
        assert p["chain_head_offset"] == end[p["partition"]] - 1 and p["digest_seq"] is not None
    assert "total lag 0" in aegis.run("status").stdout

    objects, index = snapshot_objects(aegis.bucket), snapshot_index(aegis.table)

    # Replay: a dry run changes nothing; a live group is refused; then rewind to the start.
    plan = json.loads(aegis.run("replay", "--to-earliest", "--dry-run", "--json").stdout)
    assert not plan["applied"] and {s["partition"]: s["to_reprocess"] for s in plan["steps"]} == end
    assert committed_offsets(aegis.group, aegis.topic, aegis.partitions) == end
    live = aegis.start("run")
    try:
        wait_for(lambda: json.loads(aegis.run("status", "--json").stdout)["members"], timeout=60, what="live member")
        refused = aegis.run("replay", "--to-earliest", check=False)
        assert refused.returncode == 2 and "live member" in refused.stderr, refused.stderr
        # The dry run an operator reads first says so too.
        assert json.loads(aegis.run("replay", "--to-earliest", "--dry-run", "--json").stdout)["members"]
        assert "live member" in aegis.run("replay", "--to-earliest", "--dry-run").stdout
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=60)
    wait_for(lambda: not json.loads(aegis.run("status", "--json").stdout)["members"], timeout=60, what="group empty")
    aegis.run("replay", "--to-earliest")
    assert committed_offsets(aegis.group, aegis.topic, aegis.partitions) == {p: 0 for p in end}
    log = aegis.consume_until_idle()
    assert committed_offsets(aegis.group, aegis.topic, aegis.partitions) == end
    assert "flushed" not in log, "replayed records must not be written again"
    assert snapshot_objects(aegis.bucket) == objects, "S3 unchanged by the replay"
    assert snapshot_index(aegis.table) == index, "index unchanged by the replay"
    assert aegis.verify()["ok"]

    # Verify one partition's flushes between two offsets: exactly the rows of the flushes that
    # reach --from and start by --to, anchored on the first one's link.
    flushes = {}
    for row in trail.read_rows(aegis.bucket, aegis.prefix):
        name = re.search(r"-p(\d{4,})-(\d{20})-(\d{20})\.parquet$", row["_key"])
        if int(name[1]) == 0:
            flushes.setdefault((int(name[2]), int(name[3])), []).append(row)
    ranges = sorted(flushes)
    assert len(ranges) >= 3, ranges
    start, stop = ranges[1][0] + 1, ranges[-2][0]
    partial = aegis.verify("--partition", "0", "--from", str(start), "--to", str(stop))
    assert partial["ok"] and partial["partitions"] == 1, partial
    assert partial["records"] == sum(len(flushes[r]) for r in ranges[1:-1]), (partial, ranges)
    assert partial["records"] < sum(map(len, flushes.values()))

    # Rebuild: drop the index table, recreate it, restore it from S3; interrupt once midway.
    trail.dynamodb().delete_table(TableName=aegis.table)
    wait_for(lambda: aegis.table not in trail.dynamodb().list_tables()["TableNames"], what="table deleted")
    aegis.init()
    assert snapshot_index(aegis.table) == []
    # One environment alone first: the items of its events, nothing else.
    aegis.run("rebuild-index", "--environment", "staging", "--checkpoint", str(tmp_path / "staging.checkpoint"))
    staging = [i for i in index if i["environment"]["S"] == "staging"]
    assert 0 < len(staging) < len(index)
    assert snapshot_index(aegis.table) == staging
    checkpoint = tmp_path / "rebuild.checkpoint"
    first = subprocess.Popen([BIN, "rebuild-index", "--concurrency", "1", "--checkpoint", str(checkpoint)],
                             env=aegis.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The checkpoint: a header naming bucket, prefix, topic and table, then one finished key a line.
    wait_for(lambda: checkpoint.exists() and len(checkpoint.read_text().splitlines()) >= 4, timeout=120,
             interval=0.02, what="rebuild progress")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    header, *done = checkpoint.read_text().splitlines()
    assert header == (f"# aegis-audit rebuild-index: bucket={aegis.bucket} prefix={aegis.prefix} "
                      f"topic={aegis.topic} table={aegis.table}"), header
    done_before = len(done)
    report = json.loads(aegis.run("rebuild-index", "--checkpoint", str(checkpoint)).stdout)
    assert report["resumed_past"] == done_before >= 3
    assert not checkpoint.exists(), "a finished rebuild removes its checkpoint"
    # A checkpoint left by a rebuild into another table is refused, not resumed.
    checkpoint.write_text(f"{header.replace('table=', 'table=old-')}\n{done[0]}\n")
    refused = aegis.run("rebuild-index", "--checkpoint", str(checkpoint), check=False)
    assert refused.returncode != 0 and "belongs to another rebuild" in refused.stderr, refused.stderr[-2000:]
    checkpoint.unlink()
    rebuilt = snapshot_index(aegis.table)
    assert len(rebuilt) == len(index) and rebuilt == index, "every item equal to what the consumer wrote"

    # Replay by time: per partition, the first offset produced at or after it (dry run). The
    # boundary falls between two batches neither of which is consumed yet, so the target is
    # neither the committed offset, nor the earliest, nor the end.
    later = produce_mix(aegis, 40, seed=32, start=800)
    time.sleep(1.1)
    boundary = datetime.now(timezone.utc)
    time.sleep(1.1)
    last = produce_mix(aegis, 24, seed=33, start=840)
    after_later = {p: o + sum(1 for q, _, _ in later if q == p) for p, o in end.items()}
    assert after_later != end
    plan = json.loads(aegis.run("replay", "--to-time", boundary.isoformat(), "--dry-run", "--json").stdout)
    assert not plan["applied"] and {s["partition"]: s["target"] for s in plan["steps"]} == after_later, plan
    # Not consumed yet: status shows both batches as lag, per partition.
    status = json.loads(aegis.run("status", "--json").stdout)
    new = {p: sum(1 for q, _, _ in later + last if q == p) for p in end}
    assert {p["partition"]: p["lag"] for p in status["partitions"]} == new and status["total_lag"] == 64, status
    assert {p["partition"]: p["chain_head_offset"] for p in status["partitions"]} == {p: o - 1 for p, o in end.items()}
    # Explicit offsets: only the partitions named; an unknown one is refused by number.
    plan = json.loads(aegis.run("replay", "--to-offsets", "0:5", "--dry-run", "--json").stdout)
    assert [(s["partition"], s["target"]) for s in plan["steps"]] == [(0, 5)]
    unknown = aegis.run("replay", "--to-offsets", "0:5,99:1", "--dry-run", check=False)
    assert unknown.returncode != 0 and "99" in unknown.stderr, unknown.stderr
    past = aegis.run("replay", "--to-offsets", "0:999999", "--dry-run", check=False)
    assert past.returncode == 2 and "past the end of partition 0" in past.stderr, past.stderr
    assert committed_offsets(aegis.group, aegis.topic, aegis.partitions) == end, "dry runs change nothing"


def test_a_damaged_chain_item_stops_its_partition_and_shows_in_status(aegis):
    """A chain item whose list of segments awaiting a digest holds an entry no writer made: the
    partition's worker refuses it (its segment would never be signed), `status` shows it as that
    partition's warning and still reports the others."""
    aegis.init()
    produce_mix(aegis, 40, seed=77)
    aegis.consume_until_idle()
    ddb = trail.dynamodb()
    key = {"PK": {"S": f"CHAIN#{aegis.topic}#1"}}
    ddb.update_item(TableName=aegis.chain_table, Key=key, UpdateExpression="SET undigested = :l",
                    ExpressionAttributeValues={":l": {"L": [{"S": "not json"}]}})
    status = json.loads(aegis.run("status", "--json").stdout)
    warnings = {p["partition"]: p.get("warning") for p in status["partitions"]}
    assert "damaged chain item: undigested[0] does not read" in (warnings[1] or ""), warnings
    assert all(w is None for p, w in warnings.items() if p != 1), warnings
    # verify reports it as that partition's problem and checks the rest against the table.
    report = aegis.verify("--against-chain-table")
    assert [(p["code"], p["partition"]) for p in report["problems"]] == [("chain_head", 1)], report["problems"]
    assert report["partitions"] == aegis.partitions
    produce_mix(aegis, 40, seed=78, start=1000)
    proc = aegis.start("run", "--exit-when-idle", "3")
    assert proc.wait(timeout=120) == 3, "a backfill with a stopped partition is no success"
    log = open(aegis.logs[-1]).read()
    assert "damaged chain item" in log and "partition stopped" in log, log[-3000:]


def test_a_log_behind_its_chain_head_stops_the_partition_instead_of_skipping(aegis):
    """A topic deleted and recreated under the same name (or truncated by an unclean leader
    election) restarts its offsets below the chain head: each new record up to the head would
    pass for one already chained. The worker checks the log's end against its head and stops the
    partition instead (exit 3 for a backfill); the others go on. tansu 0.6 deletes every topic
    on DeleteTopics (README), so the head is moved past the log instead of recreating the topic:
    the worker sees the same thing."""
    aegis.init()
    produce_mix(aegis, 80, seed=81)
    aegis.consume_until_idle()
    rows_before = len(trail.read_rows(aegis.bucket, aegis.prefix))
    committed_before = committed_offsets(aegis.group, aegis.topic, aegis.partitions)
    ddb = trail.dynamodb()
    for p in (2, 3):
        key = {"PK": {"S": f"CHAIN#{aegis.topic}#{p}"}}
        head = trail.chain_head(aegis.chain_table, aegis.topic, p)
        assert int(head["last_offset"]["N"]) < 30
        ddb.update_item(TableName=aegis.chain_table, Key=key, UpdateExpression="SET last_offset = :o",
                        ExpressionAttributeValues={":o": {"N": "500"}})

    # Partition 3 gets no new record: the check at the worker's start finds it all the same.
    rng = random.Random(82)
    later = produce(aegis.topic, [json.dumps(make_event(1000 + i, rng)).encode() for i in range(30)], partitions=3)
    proc = aegis.start("run", "--exit-when-idle", "3")
    assert proc.wait(timeout=120) == 3, "a partition whose log is behind its chain is no success"
    log = open(aegis.logs[-1]).read()
    for p in (2, 3):
        assert re.search(rf"{aegis.topic}/{p}: the chain head \(500\) is at or past the partition's end \(\d+\): "
                         r"the topic was recreated or truncated.*stopping instead of skipping them", log), log[-3000:]
    assert "partition stopped" in log
    rows = trail.read_rows(aegis.bucket, aegis.prefix)
    assert len(rows) == rows_before + len([d for d in later if d[0] != 2]), "partitions 0 and 1 went on"
    assert committed_offsets(aegis.group, aegis.topic, aegis.partitions)[2] == committed_before[2], \
        "partition 2's new records are not committed"
    status = json.loads(aegis.run("status", "--json").stdout)
    warnings = {p["partition"]: p.get("warning") for p in status["partitions"]}
    assert "the topic was recreated or truncated" in (warnings[2] or "") and warnings[0] is None, warnings
    # The switch for a broker whose high watermark is wrong (tansu's in-memory storage) turns it off.
    unchecked = aegis.consume_until_idle(idle=3, AEGIS_KAFKA__CHECK_LOG_END="false")
    assert "stopping instead of skipping them" not in unchecked


def test_a_topic_deleted_and_recreated_stops_its_partitions(aegis, tmp_path):
    """The case the log-end check is for, for real: the topic is deleted and recreated under the
    consumer, and the new log, shorter than the chains, restarts at offset 0. On a broker of the
    test's own, because tansu deletes every topic on DeleteTopics (README). librdkafka 2.12
    crashes (SIGSEGV) on tansu's answer to a fetch from a deleted topic (README, known broker
    quirks), so the consumer may die there; restarted, it must stop both partitions, not take
    the new records for ones it already chained."""
    aegis.partitions = 2
    with private_broker(tmp_path) as brokers:
        on = {"AEGIS_KAFKA__BROKERS": brokers}
        aegis.run("init", **on)
        rng = random.Random(91)
        first = produce(aegis.topic, [json.dumps(make_event(i, rng)).encode() for i in range(60)],
                        partitions=2, brokers=brokers)
        assert end_offsets(first) == {0: 30, 1: 30}
        proc = aegis.start("run", **on)
        try:
            wait_for(lambda: committed_offsets(aegis.group, aegis.topic, 2, brokers=brokers) == {0: 30, 1: 30},
                     timeout=90, what="the first 60 records committed")
            admin = AdminClient({"bootstrap.servers": brokers})
            admin.delete_topics([aegis.topic])[aegis.topic].result(30)
            wait_for(lambda: aegis.topic not in admin.list_topics(timeout=5).topics, what="the topic gone")
            # tansu took the dead-letter topic with it.
            for topic, done in admin.create_topics([NewTopic(aegis.topic, 2), NewTopic(aegis.dlq, 2)]).items():
                done.result(30)
            later = produce(aegis.topic, [json.dumps(make_event(100 + i, rng)).encode() for i in range(20)],
                            partitions=2, brokers=brokers)
            assert end_offsets(later) == {0: 10, 1: 10}, "the new log starts again at offset 0"
            time.sleep(3)
        finally:
            proc.terminate()
            code = proc.wait(timeout=30)
        # 3: it stopped the partitions itself (as it would on Kafka, whose out-of-range answer
        # sends it back to offset 0, below the heads).
        assert code in (0, 3, -signal.SIGSEGV), f"the first run ended with {code}"
        # A crashed member holds its partitions until its session is over (as in test_faults).
        wait_for(lambda: not json.loads(aegis.run("status", "--json", **on).stdout)["members"], timeout=60,
                 what="the first run's session to expire")
        again = aegis.start("run", "--exit-when-idle", "3", **on)
        assert again.wait(timeout=120) == 3, "a partition whose log is behind its chain is no success"
    log = open(aegis.logs[-1]).read()
    for p in (0, 1):
        assert re.search(rf"{aegis.topic}/{p}: the chain head \(29\) is at or past the partition's end \(10\): "
                         r"the topic was recreated or truncated.*stopping instead of skipping them", log), log[-3000:]
    rows = trail.read_rows(aegis.bucket, aegis.prefix)
    assert sorted((r["kafka_partition"], r["kafka_offset"], r["payload"]) for r in rows) == sorted(first), \
        "nothing of the new log was taken for records already chained, nor written over them"


def test_replay_never_skips_a_partition_without_a_chain(aegis):
    """On a partition no consumer has chained yet, the first record read starts the chain: a
    group offset past the log start there would leave the records before it out for good."""
    aegis.init()
    delivered = produce(aegis.topic, [json.dumps(make_event(i, random.Random(i))).encode() for i in range(20)], partitions=1)
    assert {p for p, _, _ in delivered} == {0}
    plan = json.loads(aegis.run("replay", "--to-offsets", "0:10", "--dry-run", "--json").stdout)
    [step] = plan["steps"]
    assert (step["target"], step["to_reprocess"]) == (0, 20) and "no chain yet" in step["note"], step
    aegis.run("replay", "--to-offsets", "0:10")
    assert committed_offsets(aegis.group, aegis.topic, aegis.partitions)[0] == 0
    aegis.consume_until_idle()
    rows = [r for r in trail.read_rows(aegis.bucket, aegis.prefix) if r["kafka_partition"] == 0]
    assert sorted(r["kafka_offset"] for r in rows) == list(range(20))


def test_prune_lifecycle_and_athena_ddl(aegis, tmp_path):
    # A bucket without Object Lock (the local config locks for a day): prune can delete there.
    unlocked_config = tmp_path / "unlocked.toml"
    text = open(os.path.join(REPO, "config", "local.toml")).read()
    unlocked_config.write_text("\n".join(l for l in text.splitlines() if not l.startswith("object_lock_retention_days")))
    unlocked = {"AEGIS_CONFIG": str(unlocked_config)}
    aegis.run("init", **unlocked)
    old = produce_mix(aegis, 200, seed=41, day_offset=5)
    # Small flushes: each partition's expired part is several flushes, so one marker names the
    # last of them.
    aegis.consume_until_idle(**unlocked, AEGIS_SEGMENT__MAX_RECORDS="20")
    new = produce_mix(aegis, 200, seed=42, start=1000)
    aegis.consume_until_idle(**unlocked)
    before = [k for k in trail.list_keys(aegis.bucket, "trail/") if k.endswith(".parquet")]

    dry = json.loads(aegis.run("prune", "--older-than", "2", "--dry-run", "--json", **unlocked).stdout)
    assert dry["deleted"] and not dry["locked"]
    assert [k for k in trail.list_keys(aegis.bucket, "trail/") if k.endswith(".parquet")] == before

    # One expired object also gets a "null" version (written while versioning was suspended, as
    # in a bucket versioned after the fact): prune deletes it too, not just hides it.
    s3 = trail.s3()
    null_key = dry["deleted"][0]
    s3.put_bucket_versioning(Bucket=aegis.bucket, VersioningConfiguration={"Status": "Suspended"})
    s3.put_object(Bucket=aegis.bucket, Key=null_key, Body=s3.get_object(Bucket=aegis.bucket, Key=null_key)["Body"].read())
    s3.put_bucket_versioning(Bucket=aegis.bucket, VersioningConfiguration={"Status": "Enabled"})
    assert "null" in [v["VersionId"] for v in s3.list_object_versions(Bucket=aegis.bucket, Prefix=null_key)["Versions"]]

    # Two flushes per marker write: a partition with three or more expired flushes goes through a
    # full batch and a remainder, and must end where the one-batch dry run said.
    report = json.loads(aegis.run("prune", "--older-than", "2", "--batch-flushes", "2", "--json", **unlocked).stdout)
    assert sorted(report["deleted"]) == sorted(dry["deleted"])
    partition_of = lambda key: re.search(r"-p(\d{4,})-", key)[1]
    after = [k for k in trail.list_keys(aegis.bucket, "trail/") if k.endswith(".parquet")]
    assert set(after) == set(before) - set(report["deleted"])
    versions = trail.s3().list_object_versions(Bucket=aegis.bucket, Prefix="trail/year=")
    assert not any(v["Key"] in report["deleted"] for v in versions.get("Versions", []) + versions.get("DeleteMarkers", []))
    rows = trail.read_rows(aegis.bucket, "trail/")
    assert {(r["kafka_partition"], r["kafka_offset"]) for r in rows} == {(p, o) for p, o, _ in new}, \
        "exactly the old flushes are gone"
    # Per pruned partition, a marker naming the entry the first remaining row links to.
    assert report["markers"], report
    flushes = {(partition_of(k), re.search(r"-p\d{4,}-(\d+)-", k)[1]) for k in report["deleted"]}
    assert max(sum(1 for p, _ in flushes if p == q) for q, _ in flushes) >= 3, "several batches of a partition pruned"
    assert not report["unanchored"]
    for key in report["markers"]:
        marker = json.loads(trail.s3().get_object(Bucket=aegis.bucket, Key=key)["Body"].read())
        first = min((r for r in rows if r["kafka_partition"] == marker["partition"]), key=lambda r: r["kafka_offset"])
        assert (marker["format"], marker["cutoff"]) == ("aegis-pruned/v1", report["cutoff"]), marker
        assert first["prev_hash"] == marker["last_entry_hash"] and first["kafka_offset"] > marker["last_offset"], marker

    # The remaining trail verifies only with the prune acknowledged.
    assert "missing_segment" in {p["code"] for p in aegis.verify(**unlocked)["problems"]}
    pruned = aegis.verify("--pruned-before", report["cutoff"], **unlocked)
    assert pruned["ok"], pruned["problems"][:3]
    assert pruned["pruned_segments"] == len(report["deleted"])

    # In a locked bucket nothing expired is deleted; each locked object is reported.
    locked_aegis_bucket = f"{aegis.bucket}-locked"
    locked = {"AEGIS_S3__BUCKET": locked_aegis_bucket}
    aegis.run("init", **locked)
    for key in before[:3]:
        body = trail.s3().get_object(Bucket=aegis.bucket, Key=key)["Body"].read() if key in after else b"x"
        trail.s3().put_object(Bucket=locked_aegis_bucket, Key=key, Body=body, ObjectLockMode="COMPLIANCE",
                              ObjectLockRetainUntilDate=time.time() + 86400)
    # An expired flush of another partition under a legal hold alone (evidence for an incident):
    # kept and listed, not a failed delete.
    locked_partitions = {partition_of(key) for key in before[:3]}
    held = next(k for k in report["deleted"] if partition_of(k) not in locked_partitions)
    trail.s3().put_object(Bucket=locked_aegis_bucket, Key=held, Body=b"x", ObjectLockLegalHoldStatus="ON")
    # An older version locked under an unlocked current one: checked too, before any delete.
    in_partition = lambda key, p: re.sub(r"-p\d{4,}-", f"-p{p:04d}-", key)
    relocked = in_partition(report["deleted"][0], 43)
    trail.s3().put_object(Bucket=locked_aegis_bucket, Key=relocked, Body=b"v1", ObjectLockMode="COMPLIANCE",
                          ObjectLockRetainUntilDate=time.time() + 86400)
    trail.s3().put_object(Bucket=locked_aegis_bucket, Key=relocked, Body=b"v2")
    # A partition's newest flush is never pruned (it may still be being written): an expired,
    # unlocked flush alone in its partition stays, and so does everything above with a newer
    # flush after it.
    lone = in_partition(report["deleted"][0], 42)
    trail.s3().put_object(Bucket=locked_aegis_bucket, Key=lone, Body=b"x")
    # An expired, unlocked flush whose object lost its entry-hash metadata (a copy that replaced
    # it): no marker could anchor what follows, so it is kept and listed.
    unanchored = in_partition(report["deleted"][0], 44)
    trail.s3().put_object(Bucket=locked_aegis_bucket, Key=unanchored, Body=b"x")
    newer = {re.sub(r"-p\d{4,}-\d+-\d+\.parquet$", f"-p{int(p):04d}-{900000:020d}-{900001:020d}.parquet", after[0])
             for p in locked_partitions | {partition_of(held), "0043", "0044"}}
    for key in newer:
        trail.s3().put_object(Bucket=locked_aegis_bucket, Key=key, Body=b"x")
    locked_report = json.loads(aegis.run("prune", "--older-than", "2", "--json", **locked).stdout)
    assert locked_report["deleted"] == []
    assert [held, "legal hold"] in locked_report["locked"], locked_report["locked"]
    assert any(k == relocked and "noncurrent version" in why for k, why in locked_report["locked"]), locked_report
    # Pruning stops at a partition's first locked flush and names its objects: expired ones.
    expired = (set(before[:3]) | {held}) & set(report["deleted"]) | {relocked}
    locked_keys = {key for key, _ in locked_report["locked"]}
    assert locked_keys and locked_keys <= expired, (locked_report, expired)
    assert lone not in locked_keys and not newer & locked_keys
    assert locked_report["unanchored"] == [unanchored], locked_report
    assert len(trail.list_keys(locked_aegis_bucket, "trail/")) == 4 + 3 + len(newer)

    # lifecycle: the AWS CLI document, accepted by the S3 API.
    lifecycle = json.loads(aegis.run("lifecycle").stdout)
    rule = lifecycle["Rules"][0]
    assert [t["StorageClass"] for t in rule["Transitions"]] == ["STANDARD_IA", "GLACIER"]
    assert rule["Expiration"]["Days"] == 1095 and rule["Filter"]["Prefix"] == "trail/year="
    assert lifecycle["Rules"][1]["Filter"]["Prefix"] == "trail/quarantine/year=", "digests are never tiered or expired"
    # Expiry in a versioned bucket leaves noncurrent versions: they expire too, or nothing is freed.
    assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
    trail.s3().put_bucket_lifecycle_configuration(Bucket=aegis.bucket, LifecycleConfiguration=lifecycle)
    assert aegis.run("lifecycle", "--standard-ia-after-days", "10", check=False).returncode == 2
    # S3 keeps an object 30 days in STANDARD_IA before it moves on.
    refused = aegis.run("lifecycle", "--glacier-after-days", "59", check=False)
    assert refused.returncode == 2 and "--glacier-after-days" in refused.stderr, refused.stderr
    # Expiry inside Object Lock's retention would hide segments still locked.
    long_lock = tmp_path / "long-lock.toml"
    long_lock.write_text(text.replace("object_lock_retention_days = 1", "object_lock_retention_days = 2555"))
    refused = aegis.run("lifecycle", check=False, AEGIS_CONFIG=str(long_lock))
    assert refused.returncode == 2 and "s3.object_lock_retention_days" in refused.stderr, refused.stderr
    kept = json.loads(aegis.run("lifecycle", "--no-expiration", "--archive-class", "GLACIER_IR", AEGIS_CONFIG=str(long_lock)).stdout)
    assert all("Expiration" not in r and "NoncurrentVersionExpiration" not in r
               and r["Transitions"][1]["StorageClass"] == "GLACIER_IR" for r in kept["Rules"]), kept

    ddl = aegis.run("athena-ddl").stdout
    assert f"s3://{aegis.bucket}/trail/" in ddl and "{{" not in ddl
    # A projection starting after its end (2200, the last year an event may have) is refused.
    late = aegis.run("athena-ddl", "--projection-start-year", "2300", check=False)
    assert late.returncode == 2 and "--projection-start-year" in late.stderr, late.stderr


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def total(values, metric):
    return sum(v for k, v in values.items() if k == metric or k.startswith(metric + "{"))


def test_metrics_endpoint_counts_what_was_produced(aegis):
    aegis.init()
    delivered = produce_mix(aegis, 600, seed=51, bad=20)
    end = end_offsets(delivered)
    consumer = aegis.start("run")
    try:
        wait_for(lambda: committed_offsets(aegis.group, aegis.topic, aegis.partitions) == end, timeout=120,
                 what="caught up")
        # Lag comes from librdkafka statistics (every 5 s): wait for a report after the commits.
        wait_for(lambda: (v := scrape(aegis.metrics_port)) and total(v, "aegis_consumer_lag") == 0
                 and any(k.startswith("aegis_consumer_lag{") for k in v), timeout=30, what="lag reported")
        values = scrape(aegis.metrics_port)
        assert total(values, "aegis_records_consumed_total") == len(delivered)
        assert total(values, "aegis_records_written_total") == len(delivered)
        assert total(values, "aegis_records_rejected_total") == 20
        assert total(values, "aegis_records_dead_lettered_total") == 20
        flags = sum(1 for _, _, v in delivered if b'"safety_flag"' in v)
        assert total(values, "aegis_safety_flags_total") == flags
        # What S3 holds, listed with boto3 (the service wrote every object once: fresh bucket).
        segments = trail.s3().list_objects_v2(Bucket=aegis.bucket, Prefix="trail/").get("Contents", [])
        segments = [o for o in segments if o["Key"].endswith(".parquet")]
        assert total(values, "aegis_segments_written_total") == len(segments)
        assert total(values, "aegis_segment_bytes_total") == sum(o["Size"] for o in segments)
        assert values["aegis_flush_duration_seconds_count"] > 0 and values["aegis_commit_duration_seconds_count"] > 0
        for p, o in end.items():
            assert values[f'aegis_chain_head_offset{{partition="{p}"}}'] == o - 1
            assert values[f'aegis_committed_offset{{partition="{p}"}}'] == o
        with urllib.request.urlopen(f"http://127.0.0.1:{aegis.metrics_port}/readyz", timeout=5) as r:
            assert r.status == 200
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=60)


def test_a_trail_at_the_bucket_root(aegis, tmp_path):
    """`s3.prefix = ""`: every tool finds the trail at the bucket's root (they used to list `/`
    or `/year=`, which match no key, and verify passed a trail it had not read)."""
    from test_verify import python_verify

    aegis.prefix = ""
    unlocked_config = tmp_path / "unlocked.toml"
    text = open(os.path.join(REPO, "config", "local.toml")).read()
    unlocked_config.write_text("\n".join(l for l in text.splitlines() if not l.startswith("object_lock_retention_days")))
    unlocked = {"AEGIS_CONFIG": str(unlocked_config)}
    aegis.run("init", **unlocked)
    old = produce_mix(aegis, 120, seed=51, day_offset=5, bad=3)
    aegis.consume_until_idle(**unlocked)
    produce_mix(aegis, 120, seed=52, start=1000)
    aegis.consume_until_idle(**unlocked)
    segments = [k for k in trail.list_keys(aegis.bucket) if k.endswith(".parquet")]
    assert segments and all(k.startswith(("year=", "quarantine/year=")) for k in segments), segments[:3]
    assert any(k.startswith("quarantine/") for k in segments)
    # Another deployment's trail of the same topic under a longer prefix ("nested/"): not this
    # trail's. Neither verifier may read it, nor prune delete it.
    s3 = trail.s3()
    for key in trail.list_keys(aegis.bucket):
        s3.copy_object(Bucket=aegis.bucket, Key=f"nested/{key}", CopySource={"Bucket": aegis.bucket, "Key": key})

    report = aegis.verify(**unlocked)
    assert report["ok"] and report["objects"] == len(segments), (report["objects"], len(segments), report["problems"][:3])
    python = python_verify(aegis, aegis.bucket)
    assert python["ok"] and python["objects"] == len(segments), (python["objects"], python["problems"][:3])

    index = snapshot_index(aegis.table)
    assert len(index) > 0
    trail.dynamodb().delete_table(TableName=aegis.table)
    wait_for(lambda: aegis.table not in trail.dynamodb().list_tables()["TableNames"], what="table deleted")
    aegis.run("init", **unlocked)
    rebuilt = json.loads(aegis.run("rebuild-index", "--checkpoint", str(tmp_path / "root.checkpoint"), **unlocked).stdout)
    assert snapshot_index(aegis.table) == index, rebuilt

    lifecycle = json.loads(aegis.run("lifecycle", **unlocked).stdout)
    assert [r["Filter"]["Prefix"] for r in lifecycle["Rules"]] == ["year=", "quarantine/year="]
    dry = json.loads(aegis.run("prune", "--older-than", "2", "--dry-run", "--json", **unlocked).stdout)
    old_days = {datetime.fromisoformat(json.loads(p)["occurred_at"].replace("Z", "+00:00")).strftime("day=%d")
                for _, _, p in old if p.startswith(b"{")}
    assert dry["deleted"] and all(k.startswith("year=") and k.split("/")[2] in old_days for k in dry["deleted"]), dry
    nested = sorted(k for k in trail.list_keys(aegis.bucket) if k.startswith("nested/"))
    aegis.run("prune", "--older-than", "2", **unlocked)
    keys = set(trail.list_keys(aegis.bucket))
    assert not keys & set(dry["deleted"]), "what the dry run listed is gone"
    assert sorted(k for k in keys if k.startswith("nested/")) == nested, "the other trail is untouched"
