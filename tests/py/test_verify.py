"""Prove it: `aegis-audit verify` and the independent `ops/verify_trail.py` (pyarrow + hashlib +
cryptography, written from schemas/CHAIN.md alone) read the same trail from S3 and must reach
the same verdict: OK on an intact trail, and the same problem codes for each kind of tampering.
Inclusion proofs are checked offline by `aegis-audit verify-proof`."""
import base64
import struct
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import uuid

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import trail
from conftest import REPO, make_event, produce

PY_VERIFIER = os.path.join(REPO, "ops", "verify_trail.py")


def python_verify(aegis, bucket) -> dict:
    out = subprocess.run(
        [sys.executable, PY_VERIFIER, "--bucket", bucket, "--prefix", aegis.prefix, "--topic", aegis.topic,
         "--public-key", aegis.public_key, "--json"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, AEGIS_TEST_AWS_ENDPOINT=trail.ENDPOINT),
    )
    assert out.returncode in (0, 1), f"verify_trail.py exited {out.returncode}: {out.stderr[-2000:]}"
    report = json.loads(out.stdout)
    assert (out.returncode == 0) == report["ok"]
    return report


def both(aegis, bucket) -> tuple[dict, dict]:
    return aegis.verify(AEGIS_S3__BUCKET=bucket), python_verify(aegis, bucket)


ROW_CODES = {"broken_link", "entry_hash", "duplicate_offset", "misplaced_row", "segment_range", "digest_mismatch"}


def findings(report) -> set:
    """(code, partition, key, offset): offsets compared for row-level findings only (an
    object-level finding may name the object's first offset or none)."""
    return {(p["code"], p["partition"], p["key"], p["offset"] if p["code"] in ROW_CODES else None)
            for p in report["problems"]}


def codes(report) -> set:
    return {p["code"] for p in report["problems"]}


@pytest.fixture(scope="module")
def signed_trail(tmp_path_factory, signing_key):
    """One signed trail for every scenario: 4 partitions, several flushes and digests each, and
    rejected records (quarantine) on every partition."""
    from conftest import Aegis
    aegis = Aegis(tmp_path_factory.mktemp("signed"), signing_key)
    aegis.init()
    rng = random.Random(21)
    events = [make_event(i, rng, day_offset=i % 2) for i in range(1200)]
    payloads = [json.dumps(e).encode() for e in events]
    for i in range(0, len(payloads), 41):  # 41: spread over the 4 partitions
        payloads[i] = b"not json " + payloads[i][:40] if i % 2 else payloads[i].replace(b'"event_type": "', b'"event_type": "x-')
    events = [e for e, p in zip(events, payloads) if p == json.dumps(e).encode()]
    delivered = produce(aegis.topic, payloads, partitions=aegis.partitions)
    # Three runs, so each partition has several flushes and digests (a digest on each clean stop).
    for _ in range(3):
        aegis.consume_until_idle(idle=3, AEGIS_SEGMENT__MAX_RECORDS="100")
        extra = [make_event(5000 + len(delivered) + i, rng) for i in range(200)]
        delivered += produce(aegis.topic, [json.dumps(e).encode() for e in extra], partitions=aegis.partitions)
    aegis.consume_until_idle(idle=3, AEGIS_SEGMENT__MAX_RECORDS="100")
    return aegis, delivered, events


def copy_bucket(source: str) -> str:
    """A scratch copy of the trail to tamper with (the original stays intact and locked)."""
    s3 = trail.s3()
    target = f"tamper-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=target)
    for key in trail.list_keys(source):
        body = s3.get_object(Bucket=source, Key=key)["Body"].read()
        s3.put_object(Bucket=target, Key=key, Body=body, ChecksumAlgorithm="SHA256")
    return target


def segments(bucket, partition=None):
    keys = [k for k in trail.list_keys(bucket, "trail/") if k.endswith(".parquet")]
    if partition is not None:
        keys = [k for k in keys if f"-p{partition:04d}-" in k]
    return sorted(keys, key=lambda k: k.rsplit("-", 2)[-2])  # by flush first offset


def quarantine_segments(bucket, partition):
    return [k for k in segments(bucket, partition) if "/quarantine/" in k]


def accepted_segments(bucket, partition):
    return [k for k in segments(bucket, partition) if "/quarantine/" not in k]


def rewrite(bucket, key, change):
    """Reads a segment, applies `change(table) -> table`, writes it back with the same footer."""
    s3 = trail.s3()
    pf = pq.ParquetFile(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
    table = pf.read()
    table = change(table).replace_schema_metadata(pf.schema_arrow.metadata)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    s3.put_object(Bucket=bucket, Key=key, Body=sink.getvalue(), ChecksumAlgorithm="SHA256")


def set_column(table, name, values):
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def test_intact_trail_both_verifiers_ok(signed_trail):
    aegis, delivered, _ = signed_trail
    rust, python = both(aegis, aegis.bucket)
    assert rust["ok"] and python["ok"], (rust["problems"][:3], python["problems"][:3])
    assert rust["records"] == python["records"] == len(delivered)
    assert rust["digests"] == python["digests"] >= 4 * 4
    assert rust["unsigned_segments"] == python["unsigned_segments"] == 0
    rows = trail.read_rows(aegis.bucket, "trail/quarantine/")
    assert {r["kafka_partition"] for r in rows} == {0, 1, 2, 3} and {r["status"] for r in rows} == {"rejected"}


def tamper_delete_segment(bucket):
    victim = segments(bucket, 1)[1]
    trail.s3().delete_object(Bucket=bucket, Key=victim)
    return {"missing_segment", "broken_link"}


def tamper_change_row(bucket):
    victim = segments(bucket, 2)[0]

    def change(table):
        payload = table.column("payload").to_pylist()
        payload[0] = payload[0].replace(b'"action": "', b'"action": "not-')
        return set_column(table, "payload", payload)
    rewrite(bucket, victim, change)
    return {"entry_hash", "object_changed"}


def tamper_unknown_status(bucket):
    victim = segments(bucket, 3)[0]
    rewrite(bucket, victim, lambda t: set_column(t, "status", ["approved"] + t.column("status").to_pylist()[1:]))
    return {"object_unreadable"}





def tamper_delete_quarantine_segment(bucket):
    """Rejected records are entries of the chain like any other."""
    trail.s3().delete_object(Bucket=bucket, Key=quarantine_segments(bucket, 2)[0])
    return {"missing_segment", "broken_link"}


def tamper_rejected_row_marked_accepted(bucket):
    """A rejected record passed off as accepted: the status is part of the entry hash."""
    victim = quarantine_segments(bucket, 1)[0]
    rewrite(bucket, victim, lambda t: set_column(t, "status", ["accepted"] + t.column("status").to_pylist()[1:]))
    return {"entry_hash", "object_changed"}


def tamper_edit_derived_column(bucket):
    """An analyst-visible column edited, the payload left alone: the chain does not hash it, the
    digest's SHA-256 of the object and the check against the payload see it."""
    victim = accepted_segments(bucket, 0)[1]
    rewrite(bucket, victim, lambda t: set_column(t, "action", ["approve-edited"] + t.column("action").to_pylist()[1:]))
    return {"derived_column", "object_changed"}


def tamper_move_to_another_environment(bucket):
    """A segment moved to another environment's directory: Athena would file its rows there."""
    s3 = trail.s3()
    victim = next(k for k in accepted_segments(bucket, 3) if "environment=prod/" in k)
    target = victim.replace("environment=prod/", "environment=qa/")
    s3.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": victim})
    s3.delete_object(Bucket=bucket, Key=victim)
    return {"misplaced_row", "missing_segment", "unsigned_segment"}


def tamper_null_partition(bucket):
    """A row's kafka_partition made null: no value at all, not partition 0."""
    victim = accepted_segments(bucket, 0)[0]
    rewrite(bucket, victim, lambda t: set_column(t, "kafka_partition", [None] + t.column("kafka_partition").to_pylist()[1:]))
    return {"object_unreadable"}


def tamper_empty_segment(bucket):
    """A segment's rows all removed, its file still there: the writer never makes one."""
    victim = accepted_segments(bucket, 2)[1]
    rewrite(bucket, victim, lambda t: t.slice(0, 0))
    return {"segment_range", "object_changed"}


def tamper_swap_rows(bucket):
    """Rows 0 and 1 trade places in the file (the Merkle tree is over row order)."""
    victim = next(k for k in segments(bucket, 3) if pq.read_metadata(io.BytesIO(
        trail.s3().get_object(Bucket=bucket, Key=k)["Body"].read())).num_rows >= 2)
    rewrite(bucket, victim, lambda t: t.take([1, 0] + list(range(2, t.num_rows))))
    return {"merkle_root", "object_changed"}


def tamper_swap_payloads(bucket):
    """Two records' contents trade offsets (a reordering of the stream)."""
    victim = next(k for k in segments(bucket, 1) if pq.read_metadata(io.BytesIO(
        trail.s3().get_object(Bucket=bucket, Key=k)["Body"].read())).num_rows >= 2)

    def change(table):
        payload = table.column("payload").to_pylist()
        payload[0], payload[1] = payload[1], payload[0]
        return set_column(table, "payload", payload)
    rewrite(bucket, victim, change)
    return {"entry_hash", "object_changed"}


def tamper_truncate_tail(bucket):
    newest = segments(bucket, 0)[-1]
    flush = newest.rsplit("/", 1)[1]
    for key in segments(bucket, 0):
        if key.endswith(flush):  # the newest flush, in every Hive directory
            trail.s3().delete_object(Bucket=bucket, Key=key)
    return {"missing_segment"}


def tamper_resign_digest(bucket):
    """Digest 1 of partition 0, its body edited (one segment dropped) and signed with another key."""
    s3 = trail.s3()
    key = sorted(k for k in trail.list_keys(bucket, "trail/_digests/") if "/p0000/" in k)[1]
    body_line, _ = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().split("\n", 1)
    body = json.loads(body_line)
    body["segments"] = body["segments"][1:]
    new_body = json.dumps(body, separators=(",", ":")).encode()
    other = Ed25519PrivateKey.generate()
    raw = other.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(raw).hexdigest()[:16]
    s3.put_object(Bucket=bucket, Key=key, Body=new_body + f"\ned25519:{key_id}:{other.sign(new_body).hex()}\n".encode())
    return {"digest_signature", "digest_chain", "unsigned_segment"}


def tamper_recomputed_chain(bucket):
    """The newest segment of partition 3 rewritten with a changed last row whose hash, chain and
    Merkle root are all recomputed: only the signed digest can tell."""
    victim = segments(bucket, 3)[-1]

    def change(table):
        rows = table.to_pylist()
        original = trail.merkle_root([bytes.fromhex(r["entry_hash"]) for r in rows])
        assert original.hex().encode() == table.schema.metadata[b"aegis.merkle_root"], "the writer's Merkle root"
        last = rows[-1]
        last["payload"] = last["payload"].replace(b'"action": "', b'"action": "not-')
        status = 0 if last["status"] == "accepted" else 1
        last["entry_hash"] = trail.entry_hash(bytes.fromhex(last["prev_hash"]), last["kafka_topic"], last["kafka_partition"],
                                              last["kafka_offset"], status, last["payload"]).hex()
        metadata = dict(table.schema.metadata)
        root = trail.merkle_root([bytes.fromhex(r["entry_hash"]) for r in rows])
        metadata[b"aegis.merkle_root"] = root.hex().encode()
        return pa.Table.from_pylist(rows, schema=table.schema).replace_schema_metadata(metadata)

    s3 = trail.s3()
    pf = pq.ParquetFile(io.BytesIO(s3.get_object(Bucket=bucket, Key=victim)["Body"].read()))
    table = change(pf.read())
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    s3.put_object(Bucket=bucket, Key=victim, Body=sink.getvalue(), ChecksumAlgorithm="SHA256")
    return {"object_changed", "merkle_root"}


def tamper_forged_stored_checksum(bucket):
    """A segment's bytes stored again with a SHA-256 checksum that is not theirs: what S3
    recorded at upload no longer matches the body."""
    victim = accepted_segments(bucket, 1)[0]  # one rebuild-index reads too
    body = trail.s3().get_object(Bucket=bucket, Key=victim)["Body"].read()
    forged = base64.b64encode(hashlib.sha256(b"not the body").digest()).decode()

    def forge(request, **_):
        del request.headers["x-amz-checksum-sha256"]
        request.headers["x-amz-checksum-sha256"] = forged
    s3 = trail.s3()
    s3.meta.events.register("before-sign.s3.PutObject", forge)
    s3.put_object(Bucket=bucket, Key=victim, Body=body, ChecksumAlgorithm="SHA256")
    stored = trail.s3().head_object(Bucket=bucket, Key=victim, ChecksumMode="ENABLED").get("ChecksumSHA256")
    assert stored == forged, "the S3 server kept the forged checksum"
    return {"object_checksum"}


def tamper_overlapping_flush(bucket):
    """A zombie's flush: partition 2's first flush written again under a name that overlaps
    the next flush, so offsets repeat across flushes."""
    first = segments(bucket, 2)[0]
    flush = first.rsplit("/", 1)[1]
    last = int(flush.rsplit("-", 1)[1].removesuffix(".parquet"))
    s3 = trail.s3()
    for key in segments(bucket, 2):
        if key.endswith(flush):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            zombie = key.removesuffix(f"{last:020d}.parquet") + f"{last + 1:020d}.parquet"
            s3.put_object(Bucket=bucket, Key=zombie, Body=body, ChecksumAlgorithm="SHA256")
    return {"duplicate_offset", "segment_range"}


def tamper_misnamed_digest(bucket):
    """Digest 1 of partition 2 renamed off the <seq:012>.digest pattern."""
    s3 = trail.s3()
    key = sorted(k for k in trail.list_keys(bucket, "trail/_digests/") if "/p0002/" in k)[1]
    s3.copy_object(Bucket=bucket, Key=key.rsplit("/", 1)[0] + "/1.digest", CopySource={"Bucket": bucket, "Key": key})
    s3.delete_object(Bucket=bucket, Key=key)
    return {"digest_unexpected", "digest_missing"}


def tamper_uppercase_signature(bucket):
    """Digest 0 of partition 1 with its signature in uppercase hex: the same bytes, but not the
    documented format."""
    s3 = trail.s3()
    key = sorted(k for k in trail.list_keys(bucket, "trail/_digests/") if "/p0001/" in k)[0]
    signed_part, signature = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().rsplit(":", 1)
    s3.put_object(Bucket=bucket, Key=key, Body=f"{signed_part}:{signature.upper()}".encode())
    return {"digest_malformed"}


def tamper_replayed_digest(bucket):
    """Partition 3's first digest copied over partition 2's: well formed and validly signed, but
    out of place."""
    s3 = trail.s3()
    digests = trail.list_keys(bucket, "trail/_digests/")
    source = sorted(k for k in digests if "/p0003/" in k)[0]
    target = sorted(k for k in digests if "/p0002/" in k)[0]
    s3.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source})
    return {"digest_chain"}


def tamper_digest_folder_spelled_twice(bucket):
    """A copy of partition 1's first digest under p00001/ beside p0001/: the same partition
    number, but not the chain's folder."""
    s3 = trail.s3()
    key = sorted(k for k in trail.list_keys(bucket, "trail/_digests/") if "/p0001/" in k)[0]
    s3.copy_object(Bucket=bucket, Key=key.replace("/p0001/", "/p00001/"), CopySource={"Bucket": bucket, "Key": key})
    return {"digest_unexpected"}


def tamper_made_up_objects(bucket):
    """Made-up decisions where Athena reads them: a segment's copy under a name of no segment,
    and under the topic's name with offsets no chain can have. Neither verifier may skip them."""
    s3 = trail.s3()
    key = segments(bucket, 1)[0]
    directory, file = key.rsplit("/", 1)
    topic = file.rsplit("-p0001-", 1)[0]
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    for name in ["extra.parquet", f"{topic}-p0001-{'9' * 20}-{'9' * 20}.parquet"]:
        s3.put_object(Bucket=bucket, Key=f"{directory}/{name}", Body=body, ChecksumAlgorithm="SHA256")
    return {"unexpected_object"}


def duckdb_answer(body: bytes, query: str) -> int:
    """DuckDB's answer to `SELECT <query> FROM <body as a Parquet file>`."""
    with tempfile.NamedTemporaryFile(suffix=".parquet") as f:
        f.write(body)
        f.flush()
        return duckdb.connect().execute(f"SELECT {query.format(file=f'read_parquet({f.name!r})')}").fetchone()[0]


def patch_footer(body: bytes, old: bytes, new: bytes) -> bytes:
    """`body` with every `old` in its Parquet footer (the thrift metadata) made `new`."""
    footer_len = struct.unpack("<I", body[-8:-4])[0]
    start = len(body) - 8 - footer_len
    assert old in body[start:-8] and len(old) == len(new)
    return body[:start] + body[start:-8].replace(old, new) + body[-8:]


def tamper_narrowed_statistic(bucket):
    """A row hidden from queries without touching it: row group 0's max kafka_offset in the
    footer lowered by one. Every row, link and Merkle root still verifies; DuckDB (like Athena)
    skips the row group for `WHERE kafka_offset = <the last>`."""
    s3 = trail.s3()
    victim = next(k for k in accepted_segments(bucket, 0) if pq.read_metadata(io.BytesIO(
        s3.get_object(Bucket=bucket, Key=k)["Body"].read())).num_rows >= 2)
    body = s3.get_object(Bucket=bucket, Key=victim)["Body"].read()
    offsets = pq.read_metadata(io.BytesIO(body)).row_group(0).column(2)
    assert offsets.path_in_schema == "kafka_offset"
    top = offsets.statistics.max
    narrowed = patch_footer(body, struct.pack("<q", top), struct.pack("<q", top - 1))
    assert pq.read_metadata(io.BytesIO(narrowed)).row_group(0).column(2).statistics.max == top - 1
    assert pq.read_table(io.BytesIO(narrowed)).equals(pq.read_table(io.BytesIO(body))), "the rows are untouched"
    find = f"count(*) FROM {{file}} WHERE kafka_offset = {top}"
    assert (duckdb_answer(body, find), duckdb_answer(narrowed, find)) == (1, 0), "the row is hidden"
    s3.put_object(Bucket=bucket, Key=victim, Body=narrowed, ChecksumAlgorithm="SHA256")
    return {"statistics", "object_changed"}


def tamper_widened_statistic(bucket):
    """A footer's max kafka_offset raised above every row: nothing hidden, but DuckDB answers
    `max(kafka_offset)` from the footer, so an analyst reads an offset the trail never had."""
    s3 = trail.s3()
    victim = accepted_segments(bucket, 1)[0]
    body = s3.get_object(Bucket=bucket, Key=victim)["Body"].read()
    meta = pq.read_metadata(io.BytesIO(body))
    assert meta.num_row_groups == 1 and meta.row_group(0).column(2).path_in_schema == "kafka_offset"
    top = meta.row_group(0).column(2).statistics.max
    widened = patch_footer(body, struct.pack("<q", top), struct.pack("<q", top + 1000))
    top_of = "max(kafka_offset) FROM {file}"
    assert (duckdb_answer(body, top_of), duckdb_answer(widened, top_of)) == (top, top + 1000), \
        "DuckDB reads max() from the footer"
    s3.put_object(Bucket=bucket, Key=victim, Body=widened, ChecksumAlgorithm="SHA256")
    return {"statistics", "object_changed"}


@pytest.mark.parametrize("tamper", [
    tamper_made_up_objects, tamper_delete_segment, tamper_change_row, tamper_swap_rows, tamper_swap_payloads, tamper_truncate_tail,
    tamper_resign_digest, tamper_recomputed_chain, tamper_forged_stored_checksum, tamper_overlapping_flush,
    tamper_misnamed_digest, tamper_uppercase_signature, tamper_replayed_digest, tamper_digest_folder_spelled_twice,
    tamper_unknown_status, tamper_delete_quarantine_segment, tamper_rejected_row_marked_accepted,
    tamper_edit_derived_column, tamper_move_to_another_environment, tamper_null_partition, tamper_empty_segment,
    tamper_narrowed_statistic, tamper_widened_statistic,
], ids=lambda f: f.__name__.removeprefix("tamper_"))
def test_tampering_is_detected_by_both_verifiers(signed_trail, tamper):
    aegis, _, _ = signed_trail
    bucket = copy_bucket(aegis.bucket)
    assert both(aegis, bucket)[0]["ok"], "the copy verifies before tampering"
    expected = tamper(bucket)
    rust, python = both(aegis, bucket)
    assert not rust["ok"] and not python["ok"]
    assert expected <= codes(rust), (expected, rust["problems"][:6])
    assert findings(rust) == findings(python), (sorted(findings(rust))[:6], sorted(findings(python))[:6])


def test_reading_a_segment_that_fails_its_stored_checksum_is_a_clear_error(signed_trail, tmp_path):
    """rebuild-index reads segments with the SDK's checksum validation: a body that does not
    match what S3 stored is a fatal error naming the object, not a retry loop."""
    aegis, _, _ = signed_trail
    bucket = copy_bucket(aegis.bucket)
    tamper_forged_stored_checksum(bucket)
    victim = accepted_segments(bucket, 1)[0]
    out = aegis.run("rebuild-index", "--checkpoint", str(tmp_path / "rebuild.checkpoint"), check=False, timeout=90,
                    AEGIS_S3__BUCKET=bucket)
    assert out.returncode != 0, out.stdout + out.stderr[-2000:]
    assert "does not match the checksum S3 stored" in out.stderr and victim in out.stderr, out.stderr[-2000:]


def test_inclusion_proof_checks_offline(signed_trail, tmp_path):
    aegis, delivered, events = signed_trail
    decision = next(e for e in events if e["event_type"] == "decision")
    proof_path = tmp_path / "proof.json"
    aegis.run("prove", decision["decision_id"], "--out", str(proof_path))
    proof = json.loads(proof_path.read_text())
    assert proof["decision_id"] == decision["decision_id"] and len(proof["merkle_path"]) >= 1

    def verify_proof(path, key=aegis.public_key):
        # Offline: no config, no endpoints (a bogus config path proves nothing is read).
        return subprocess.run([aegis_bin(), "--config", "/nonexistent.toml", "verify-proof", str(path),
                               "--public-key", key], capture_output=True, text=True, timeout=60)

    ok = verify_proof(proof_path)
    assert ok.returncode == 0 and ok.stdout.startswith("proof OK"), ok.stdout + ok.stderr

    forged = dict(proof, entry=dict(proof["entry"]))
    import base64
    payload = base64.b64decode(proof["entry"]["payload_base64"]).replace(b'"action": "', b'"action": "not-')
    forged["entry"]["payload_base64"] = base64.b64encode(payload).decode()
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    bad = verify_proof(tmp_path / "forged.json")
    assert bad.returncode == 1 and "proof rejected" in bad.stdout, bad.stdout

    # The digest's key is not signed: one that is not where its signed body belongs is refused.
    moved = dict(proof, digest=dict(proof["digest"]))
    moved["digest"]["key"] = re.sub(r"/p(\d{4,})/", "/p9999/", proof["digest"]["key"])
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    bad = verify_proof(tmp_path / "moved.json")
    assert bad.returncode == 1 and "is not where the signed body" in bad.stdout, bad.stdout

    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert verify_proof(proof_path, str(other)).returncode == 1


def aegis_bin():
    from conftest import BIN
    return BIN


def test_unusual_but_valid_events_verify_in_both(aegis):
    """Events the consumer accepts, written in every spelling the schema allows that a verifier
    re-deriving the columns could misread: both verifiers must find the trail intact."""
    from datetime import datetime, timedelta, timezone
    aegis.init()
    rng = random.Random(5)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    day = (now - timedelta(days=1)).strftime("%Y-%m-%d")
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S")
    times = [
        stamp.replace("T", "t") + "z", stamp.replace("T", " ") + "+00:00", stamp + "\u221201:00",
        f"{day}T23:59:60Z", f"{day}T23:30:00-01:00", stamp + ".123456789123Z", stamp + "+23:59",
    ]
    texts = []
    for i, when in enumerate(times):
        event = make_event(i, rng, kind="decision")
        event["occurred_at"] = when
        texts.append(json.dumps(event, ensure_ascii=i % 2 == 0))
    base = make_event(100, rng, kind="decision")
    base["occurred_at"] = stamp + "Z"
    plain = json.dumps(base)
    # Raw JSON the writer never parses: huge numbers, a lone surrogate, deep nesting, spaced
    # metadata, a confidence score written as an integer, an unknown member with 5000 digits.
    def variant(decision_id):
        return plain.replace('"decision_id": "dec-000100"', f'"decision_id": "{decision_id}"')
    texts.append(variant("dec-huge").replace('"metadata": {', '"metadata": {"n": 1e400, "s": "\\ud800", "deep": '
                                             + "[" * 200 + "]" * 200 + ', '))
    texts.append(variant("dec-spaced").replace('"metadata": {', '"metadata" :  {  "spaced" : [ 1 , "a b" ] , '))
    texts.append(variant("dec-long").replace('"confidence_score": ', '"extra": ' + "9" * 5000 + ', "confidence_score": '))
    assert all(f'"decision_id": "dec-{name}"' in t for name, t in zip(["huge", "spaced", "long"], texts[-3:]))
    score_int = dict(base, confidence_score=1, metadata=None, decision_id="dec-int")
    texts.append(json.dumps(score_int))
    produce(aegis.topic, [t.encode() for t in texts], partitions=aegis.partitions)
    aegis.consume_until_idle()
    rows = trail.read_rows(aegis.bucket, "trail/")
    rejected = [(r["reject_code"], r["reject_reason"]) for r in rows if r["status"] != "accepted"]
    assert len(rows) == len(texts) and not rejected, rejected
    rust, python = both(aegis, aegis.bucket)
    assert rust["ok"] and python["ok"], (rust["problems"], python["problems"])
    # And its inclusion proof checks offline.
    proof = aegis.tmp / "huge.proof.json"
    aegis.run("prove", "dec-huge", "--out", str(proof))
    checked = aegis.run("verify-proof", str(proof), "--public-key", aegis.public_key)
    assert checked.stdout.startswith("proof OK: decision dec-huge"), checked.stdout


def test_a_tail_removed_with_its_digest_shows_only_against_the_chain_table(signed_trail):
    """CHAIN.md's one blind spot of the bucket alone: the newest digest and everything after the
    previous one, removed together. The chain table still records them."""
    aegis, _, _ = signed_trail
    assert aegis.verify("--against-chain-table")["ok"]
    bucket = copy_bucket(aegis.bucket)
    s3 = trail.s3()
    digests = sorted(k for k in trail.list_keys(bucket, "trail/_digests/") if "/p0000/" in k)
    previous = json.loads(s3.get_object(Bucket=bucket, Key=digests[-2])["Body"].read().decode().split("\n")[0])
    s3.delete_object(Bucket=bucket, Key=digests[-1])
    removed = [k for k in segments(bucket, 0) if int(k.rsplit("-", 2)[-2]) > previous["last_offset"]]
    assert removed
    for key in removed:
        s3.delete_object(Bucket=bucket, Key=key)
    rust, python = both(aegis, bucket)
    assert rust["ok"] and python["ok"], "the bucket alone cannot tell"
    report = aegis.verify("--against-chain-table", AEGIS_S3__BUCKET=bucket)
    assert not report["ok"]
    assert {(p["code"], p["partition"]) for p in report["problems"]} == {("chain_head", 0)}, report["problems"]


def test_the_python_footer_check_finds_indexes_and_null_counts():
    """verify_trail.py's footer check beyond what the tampering tests cover: bloom filters the
    writer never makes, null counts not the values', bounds beyond or short of the values. In
    process: pyarrow writes the footers."""
    sys.path.insert(0, os.path.dirname(PY_VERIFIER))
    try:
        import verify_trail
    finally:
        sys.path.pop(0)
    table = pa.table({"kafka_offset": pa.array([10, 11, 12, 13], pa.int64()),
                      "user_id": pa.array(["a", None, "c", None]),
                      "payload": pa.array([b"x", b"y", b"z", b"w"])})

    def problems(read_back=None, **options):
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=2, **options)
        meta = pq.read_metadata(io.BytesIO(sink.getvalue()))
        return verify_trail.footer_problems(meta, read_back or table)

    assert problems() == []
    assert problems(write_page_index=True) == []  # the first images wrote column indexes
    assert problems(bloom_filter_options={"user_id": {"ndv": 4}}) == [
        (None, "bloom filters, which the writer never writes, on user_id")]
    filled = table.set_column(1, "user_id", pa.array(["a", "a", "c", "c"]))  # within the bounds
    assert problems(filled) == [(None, "row group 0: the footer counts 1 nulls in user_id, the values 0"),
                                (None, "row group 1: the footer counts 1 nulls in user_id, the values 0")]
    beyond = table.set_column(0, "kafka_offset", pa.array([10, 11, 12, 99], pa.int64()))
    assert problems(beyond) == [(99, "row group 1: the footer's max of kafka_offset excludes this row's value")]
    below = table.set_column(0, "kafka_offset", pa.array([10, 11, 12, 12], pa.int64()))
    assert problems(below) == [(None, "row group 1: the footer's max of kafka_offset is not the values' max "
                                      "(an aggregate read from the footer would be wrong)")]


def test_independent_verifier_self_test():
    """CHAIN.md's test vectors (hashes, Merkle roots, Ed25519, occurred_at), in the Python verifier."""
    out = subprocess.run([sys.executable, PY_VERIFIER, "--self-test"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("self-test OK"), out.stdout + out.stderr
    assert "FAIL" not in out.stdout and out.stdout.count("ok   occurred_at") == 9, out.stdout
