#!/usr/bin/env python3
"""Independent verifier of an aegis-audit trail, written from schemas/CHAIN.md only.

This is the second implementation of the checks `aegis-audit verify` makes. It deliberately
follows nothing but the written spec (schemas/CHAIN.md for the hash chain, Merkle roots, digests
and problem codes; schemas/parquet-columns.md for the Parquet columns) and shares no code with
the Rust sources, so a bug in either implementation (or in the spec) shows up as a disagreement.

What it checks, per partition of one topic:
  * segments `<topic>-p<PPPP>-<first:020>-<last:020>.parquet` in the writer's directories
    directly under the prefix (year=/month=/day=/environment=/ and quarantine/year=/month=/day=/);
    anything else there but another topic's segments and names starting with _ or . (what
    Athena skips) is an unexpected_object; one flush (first, last) at a time in ascending order, rows of
    a flush merged by kafka_offset: offsets (segment_range, duplicate_offset), placement
    (misplaced_row), the columns derived from the payload (derived_column), links from genesis
    (broken_link), entry hashes (entry_hash), the footer Merkle root (merkle_root), the footer
    statistics against the rows (statistics), the SHA-256 checksum S3 stored at upload
    (object_checksum);
  * signed digests `<prefix>/_digests/<topic>/p<PPPP>/<seq:012>.digest`: presence from seq 0
    (digest_missing), format (digest_malformed), Ed25519 signature (digest_signature), chaining
    (digest_chain), other objects in that folder (digest_unexpected), and what the digests list:
    missing_segment, object_changed, merkle_root, digest_mismatch, unsigned_segment.

Usage:
  verify_trail.py --bucket B [--prefix trail] --topic T [--partition P] [--public-key FILE ...]
                  [--endpoint-url URL] [--json]
  verify_trail.py --dir MIRROR ...      # a local copy where each S3 key is a path under MIRROR
  verify_trail.py --self-test           # the test vectors of CHAIN.md

Exit status: 0 when the trail verifies, 1 when problems were found, 2 on usage or operational
errors (unreachable endpoint, missing bucket, unreadable key file, ...).

The S3 endpoint defaults to $AEGIS_TEST_AWS_ENDPOINT or http://127.0.0.1:5000 (the local stack),
with $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY or "testing"/"testing"; `--endpoint-url ''`
uses AWS itself with boto3's default credential and region chain.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import json
import os
import re
import struct
import sys
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

DEFAULT_ENDPOINT = "http://127.0.0.1:5000"
DIGEST_FORMAT = "aegis-digest/v1"
ZERO_HASH = "0" * 64
STATUS_CODES = {"accepted": 0, "rejected": 1}
# The columns the chain needs (schemas/parquet-columns.md), with the Arrow types a row must have
# to be hashed at all; payload may be null (a null record value hashes as 0 bytes).
def _is_text(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


COLUMNS = {
    "kafka_topic": _is_text, "kafka_partition": pa.types.is_int32, "kafka_offset": pa.types.is_int64,
    "status": _is_text, "payload": _is_bytes, "prev_hash": _is_text, "entry_hash": _is_text,
}
# The columns the writer derives from the payload and verdict, which the chain does not hash
# (CHAIN.md, "Derived columns"), with their Arrow types; any may be null.
DERIVED_TEXT = ("decision_id", "event_type", "user_id", "session_id", "action", "policy_version", "model_version",
                "request_id", "reviewer_id", "override_reason", "original_action", "safety_category", "severity",
                "metadata")
DERIVED = {name: _is_text for name in DERIVED_TEXT} | {
    "confidence_score": pa.types.is_float64,
    "occurred_at": lambda t: pa.types.is_timestamp(t) and t.unit == "us",
    "reject_code": _is_text,
    "reject_reason": _is_text,
    "kafka_timestamp": lambda t: pa.types.is_timestamp(t) and t.unit == "ms",
}
# One read of a segment takes both, chain columns first: the order column problems are reported in.
SEGMENT_COLUMNS = COLUMNS | DERIVED
NULLABLE = {"payload", *DERIVED}
HEX64 = re.compile(r"[0-9a-f]{64}\Z")
SIGNATURE_LINE = re.compile(r"ed25519:([0-9a-f]{16}):([0-9a-f]{128})\Z")
DIGEST_DIR = re.compile(r"p([0-9]{4,})/(.+)\Z", re.S)  # under <prefix>/_digests/<topic>/
DIGEST_NAME = re.compile(r"([0-9]{12})\.digest\Z")
I32_MAX, I64_MAX, U64_MAX = 2**31 - 1, 2**63 - 1, 2**64 - 1


class UsageError(Exception):
    """An operational or usage problem: reported as `error: ...`, exit status 2."""


# ------------------------------------------------------------------ chain primitives (CHAIN.md)

def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def genesis(topic: str, partition: int) -> bytes:
    t = topic.encode()
    return sha256(b"aegis-audit/genesis/v1\0" + struct.pack(">H", len(t)) + t + struct.pack(">i", partition))


def entry_hash(prev: bytes, topic: str, partition: int, offset: int, status: int, payload: bytes) -> bytes:
    t = topic.encode()
    return sha256(b"aegis-audit/entry/v1\0" + prev + struct.pack(">H", len(t)) + t
                  + struct.pack(">iqB", partition, offset, status)
                  + struct.pack(">I", len(payload)) + payload)


def merkle_root(entry_hashes: list[bytes]) -> bytes:
    """RFC 9162 §2.1 Merkle Tree Hash over raw 32-byte entry hashes, in the given order."""
    if not entry_hashes:
        return sha256(b"")  # RFC 9162: the hash of an empty list is SHA-256 of nothing

    def mth(lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 1:
            return sha256(b"\x00" + entry_hashes[lo])
        k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two < n
        return sha256(b"\x01" + mth(lo, lo + k) + mth(lo + k, hi))

    return mth(0, len(entry_hashes))


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes, where: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise UsageError(f"{where}: not an SPKI PEM public key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{where}: not an Ed25519 public key")
    return key


# ------------------------------------------------------------------ storage: S3 or a local mirror

@dataclass
class Blob:
    body: bytes
    stored_sha256: str | None = None  # base64, as S3 returns it; None when none was stored
    checked: bool = False             # whether the store can tell what checksum was stored


class S3Store:
    def __init__(self, bucket: str, endpoint_url: str, workers: int):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError, FlexibleChecksumError

        self.ClientError, self.FlexibleChecksumError = ClientError, FlexibleChecksumError
        self.bucket = bucket
        # "when_required": botocore then validates a body only when we ask for checksums, so a
        # second, plain GET returns a tampered body for us to report instead of raising.
        config = Config(max_pool_connections=workers, response_checksum_validation="when_required",
                        retries={"max_attempts": 5, "mode": "standard"})
        kwargs: dict = {"config": config}
        if endpoint_url:  # the local stack (moto): static credentials, fixed region
            kwargs.update(endpoint_url=endpoint_url, region_name="us-east-1",
                          aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                          aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
        self.client = boto3.client("s3", **kwargs)

    def describe(self) -> str:
        return f"s3://{self.bucket}/"

    def keys(self, prefix: str) -> Iterator[str]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def get(self, key: str) -> Blob:
        """The object's bytes and the SHA-256 checksum S3 stored at upload. Raises KeyError
        when the object cannot be read (gone, access denied)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            stored = resp.get("ChecksumSHA256")
            try:
                body = resp["Body"].read()
            except self.FlexibleChecksumError:
                # botocore found the body differs from a stored checksum; fetch it unchecked so
                # the difference is reported as a problem and the other checks still run.
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.ClientError as e:
            raise KeyError(f"cannot read: {e.response.get('Error', {}).get('Code', e)}") from None
        return Blob(body, stored, checked=True)


class DirStore:
    """A local mirror: S3 key `a/b/c` is the file DIR/a/b/c. No stored checksums here."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise UsageError(f"--dir {root}: not a directory")
        self.root = root

    def describe(self) -> str:
        return f"{self.root}/"

    def keys(self, prefix: str) -> Iterator[str]:
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    yield key

    def get(self, key: str) -> Blob:
        try:
            with open(os.path.join(self.root, *key.split("/")), "rb") as f:
                return Blob(f.read())
        except OSError as e:
            raise KeyError(f"cannot read: {e.strerror}") from None


def bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """Like pool.map, in order, but with at most `ahead` items fetched or waiting, so only that
    many flushes' bytes are in memory at once."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------ report

@dataclass
class Report:
    problems: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    partitions: int = 0
    objects: int = 0
    records: int = 0
    digests: int = 0
    unsigned_segments: int = 0

    def problem(self, code: str, partition: int, key: str | None, offset: int | None, detail: str) -> None:
        self.problems.append({"code": code, "partition": partition, "key": key, "offset": offset, "detail": detail})

    def as_json(self) -> dict:
        return {"ok": not self.problems, "partitions": self.partitions, "objects": self.objects,
                "records": self.records, "digests": self.digests,
                "unsigned_segments": self.unsigned_segments, "notes": self.notes, "problems": self.problems}

    def print_text(self, out=sys.stdout) -> None:
        for p in self.problems:
            offset = "-" if p["offset"] is None else p["offset"]
            print(f"FAIL {p['code']} p{p['partition']} {p['key'] or '-'} offset {offset}: {p['detail']}", file=out)
        for note in self.notes:
            print(f"note: {note}", file=out)
        counts = (f"{self.partitions} partitions, {self.objects} objects, {self.records} records, "
                  f"{self.digests} digests, {self.unsigned_segments} unsigned segments")
        print(f"FAILED: {len(self.problems)} problems; {counts}" if self.problems else f"OK: {counts}", file=out)


# ------------------------------------------------------------------ the trail's layout

class Layout(NamedTuple):
    """What the listing holds for the topic: segment keys by partition and flush, digest keys by
    partition and seq, other objects in a partition's digest folder, the published public keys."""
    segments: dict[int, dict[tuple[int, int], list[str]]]
    digests: dict[int, dict[int, str]]
    unexpected: dict[int, list[str]]
    key_files: list[str]
    strangers: list[str]  # in a trail directory, a segment of no topic: Athena reads it all the same
    other_topics: list[str]  # topics whose segments share the directories (verified on their own)

    def partitions(self) -> list[int]:
        return sorted(set(self.segments) | set(self.digests) | set(self.unexpected))


def trail_directory(base: str, key: str) -> str | None:
    """The key's directory under the prefix (`base`, empty or ending in /) if it is one the writer
    makes there: year=/month=/day=/environment= or quarantine/year=/month=/day=. Another trail
    under a longer prefix (`trail/staging/...` under `trail`) is not this one."""
    if not key.startswith(base) or "/" not in key[len(base):]:
        return None
    directory = key[len(base):].rsplit("/", 1)[0]
    parts = directory.split("/")
    date = lambda y, m, d: y.startswith("year=") and m.startswith("month=") and d.startswith("day=")  # noqa: E731
    if len(parts) == 4 and parts[0] == "quarantine" and date(*parts[1:]):
        return directory
    if len(parts) == 4 and date(*parts[:3]) and parts[3].startswith("environment="):
        return directory
    return None


def scan(store, prefix: str, topic: str, only_partition: int | None) -> Layout:
    base = f"{prefix}/" if prefix else ""
    digests_root = f"{base}_digests/"
    topic_digests = f"{digests_root}{topic}/"
    segment_name = re.compile(re.escape(topic) + r"-p([0-9]{4,})-([0-9]{20})-([0-9]{20})\.parquet\Z")
    any_segment = re.compile(r"(.+)-p([0-9]{4,})-([0-9]{20})-([0-9]{20})\.parquet\Z")
    strangers, other_topics = [], set()
    segments: dict = defaultdict(lambda: defaultdict(list))
    digests: dict = defaultdict(dict)
    unexpected: dict = defaultdict(list)
    key_files = []
    wanted = lambda partition: only_partition is None or partition == only_partition  # noqa: E731
    for key in store.keys(base):
        if key.startswith(digests_root):
            # Only <key_id>.pem side by side: a topic named `keys` has its digests below them.
            if key.startswith(f"{digests_root}keys/") and key.endswith(".pem") and "/" not in key[len(digests_root) + 5:]:
                key_files.append(key)
            elif key.startswith(topic_digests) and (m := DIGEST_DIR.match(key[len(topic_digests):])):
                if (partition := int(m[1])) > I32_MAX or not wanted(partition):
                    continue  # not a partition number: belongs to no chain
                if m[1] != f"{partition:04d}":
                    unexpected[partition].append(key)  # p00002/ beside p0002/: not the chain's folder
                elif name := DIGEST_NAME.match(m[2]):
                    digests[partition][int(name[1])] = key
                else:
                    unexpected[partition].append(key)
            continue  # the rest of _digests/ (other topics) is not part of this chain
        if trail_directory(base, key) is None:
            continue  # not one of this trail's directories (another trail under a longer prefix)
        file = key.rsplit("/", 1)[-1]
        if (m := segment_name.match(file)) and int(m[1]) <= I32_MAX and int(m[2]) <= I64_MAX and int(m[3]) <= I64_MAX:
            if wanted(int(m[1])):
                segments[int(m[1])][(int(m[2]), int(m[3]))].append(key)
        elif file == "" or file[0] in "_.":
            continue  # folder markers, and what Athena skips (names starting with _ or .)
        elif (m := any_segment.match(file)) and m[1] != topic and int(m[2]) <= I32_MAX \
                and int(m[3]) <= I64_MAX and int(m[4]) <= I64_MAX:
            other_topics.add(m[1])
        elif only_partition is None:
            strangers.append(key)
    return Layout(segments, digests, unexpected, sorted(key_files), strangers, sorted(other_topics))


def digest_key(prefix: str, topic: str, partition: int, seq: int) -> str:
    base = f"{prefix}/" if prefix else ""
    return f"{base}_digests/{topic}/p{partition:04d}/{seq:012d}.digest"


# ------------------------------------------------------------------ reading one segment object

class Row(NamedTuple):  # the fields of COLUMNS, in that order, the object's key, DERIVED's values
    topic: str
    partition: int
    offset: int
    status: str
    payload: bytes
    prev_hash: str
    entry_hash: str
    key: str
    derived: dict


@dataclass
class Segment:
    key: str
    sha256: str | None = None          # hex SHA-256 of the whole object
    checksum_problem: str | None = None
    no_checksum: bool = False          # S3 holds no plain SHA-256 of the body to compare with
    unreadable: str | None = None      # why the object could not be read or parsed
    footer_root: str | None = None
    footer_problems: list[tuple[int | None, str]] = field(default_factory=list)
    merkle_root: str | None = None     # recomputed from the rows' entry hashes, in row order
    merkle_error: str | None = None
    rows: list[Row] = field(default_factory=list)


def load_segment(store, key: str) -> Segment:
    seg = Segment(key)
    try:
        blob = store.get(key)
    except KeyError as e:
        seg.unreadable = str(e.args[0])
        return seg
    seg.sha256 = hashlib.sha256(blob.body).hexdigest()
    seg.checksum_problem = checksum_problem(blob)
    seg.no_checksum = blob.checked and (blob.stored_sha256 is None or "-" in blob.stored_sha256)
    try:
        parquet = pq.ParquetFile(io.BytesIO(blob.body))
        meta = parquet.metadata.metadata or {}
        table = parquet.read(columns=[c for c in SEGMENT_COLUMNS if c in parquet.schema_arrow.names])
    except Exception as e:  # pyarrow raises many types for corrupt or foreign files
        seg.unreadable = f"not a readable segment: {e}"
        return seg
    seg.unreadable = column_problem(table)
    if seg.unreadable:
        return seg
    try:
        seg.footer_problems = footer_problems(parquet.metadata, table)
    except Exception as e:  # a footer pyarrow reads but no writer makes: reported, not a crash
        seg.footer_problems = [(None, f"the statistics could not be checked: {e!r}")]
    root = meta.get(b"aegis.merkle_root")
    seg.footer_root = root.decode(errors="replace") if root is not None else None
    chain = [table.column(c).to_pylist() for c in COLUMNS]
    # Timestamps as plain integers: a year past 9999 is no Python datetime.
    derived = pa.table({name: table.column(name).cast(pa.int64()) if pa.types.is_timestamp(table.column(name).type)
                        else table.column(name) for name in DERIVED}).to_pylist()
    seg.rows = [Row(*values, key, extra) for values, extra in zip(zip(*chain), derived)]
    # As in aegis-audit's reader (schemas/CHAIN.md): a status that is neither value makes the
    # whole object unreadable, so both verifiers report the same code.
    for i, row in enumerate(seg.rows):
        if row.status not in STATUS_CODES:
            seg.rows, seg.unreadable = [], f"not a readable segment: row {i}: unknown status {row.status!r}"
            return seg
    if not seg.rows:
        return seg  # no tree: reported as segment_range (CHAIN.md)
    try:
        seg.merkle_root = merkle_root([bytes.fromhex(r.entry_hash) for r in seg.rows]).hex()
    except (TypeError, ValueError):
        seg.merkle_error = "an entry_hash is not hex, so the Merkle root cannot be recomputed"
    return seg


# Text and binary bounds the writer cut (src/segment.rs, STATISTICS_TRUNCATE_BYTES): at 64 bytes,
# at a character boundary for text (up to 3 bytes less), the max's last character raised (a
# byte more). A shorter bound is no truncation.
TRUNCATED_BOUND_BYTES = range(64 - 3, 64 + 2)


def footer_problems(meta: pq.FileMetaData, table: pa.Table) -> list[tuple[int | None, str]]:
    """Where the footer's statistics or indexes do not hold for the values (CHAIN.md, "Footer
    statistics"), as (the first offset a bound excludes, or None; what). Readers trust them:
    Athena and DuckDB skip a row group whose min/max excludes what a query asks for, and DuckDB
    answers max() from them; no entry hash covers them. Each min/max pyarrow reads must be the
    row group's smallest/largest value (or the writer's truncation of it), each null count the
    values', and no column may carry a bloom filter (the writer makes none). Column indexes (page
    statistics, which the first images wrote) are checked by `aegis-audit verify` alone: pyarrow
    does not expose them."""
    found, blooms = [], []
    start = 0
    for g in range(meta.num_row_groups):
        row_group = meta.row_group(g)
        rows = table.slice(start, max(row_group.num_rows, 0))
        start += max(row_group.num_rows, 0)
        for j in range(row_group.num_columns):
            chunk = row_group.column(j)
            name = chunk.path_in_schema
            if chunk.bloom_filter_offset is not None and name not in blooms:
                blooms.append(name)
            stats = chunk.statistics
            if stats is None or name not in rows.column_names:
                continue
            found += bound_problems(g, name, stats, rows.column(name), rows.column("kafka_offset"))
    if blooms:
        found.append((None, f"bloom filters, which the writer never writes, on {', '.join(blooms)}"))
    return found


def bound_problems(g: int, name: str, stats, values: pa.ChunkedArray, offsets: pa.ChunkedArray) -> list:
    found = []
    if stats.has_null_count and stats.null_count != values.null_count:
        found.append((None, f"row group {g}: the footer counts {stats.null_count} nulls in {name}, "
                            f"the values {values.null_count}"))
    if not stats.has_min_max:  # e.g. a double's IEEE 754 total order, which pyarrow 26 does not read
        return found
    text = _is_text(values.type)
    bounds = {"min": stats.min_raw, "max": stats.max_raw}
    if text:
        for bound, raw in list(bounds.items()):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                found.append((None, f"row group {g}: the footer's {bound} of {name} does not read as its type"))
                del bounds[bound]
    # Compared as stored: timestamps as integers, text as UTF-8 bytes (unsigned byte order).
    if pa.types.is_timestamp(values.type):
        values = values.cast(pa.int64())
    elif text:
        values = values.cast(pa.binary())
    excluded = [pc.fill_null(outside(values, pa.scalar(bounds[bound], values.type)), False)
                for bound, outside in (("min", pc.less), ("max", pc.greater)) if bound in bounds]
    first = min((pc.index(e, True).as_py() for e in excluded if pc.any(e).as_py()), default=None)
    if first is not None:
        lo = "min" in bounds and pc.less(values[first], pa.scalar(bounds["min"], values.type)).as_py()
        found.append((offsets[first].as_py(),
                      f"row group {g}: the footer's {'min' if lo else 'max'} of {name} excludes this row's value"))
        return found
    actual = pc.min_max(values).as_py()
    for bound, raw in bounds.items():
        value = actual[bound]
        if value is not None and bound_attained(bound, raw, value, text or _is_bytes(values.type), text):
            continue
        found.append((None, f"row group {g}: the footer's {bound} of {name} is not the values' {bound} "
                            "(an aggregate read from the footer would be wrong)"))
    return found


def bound_attained(bound: str, raw, value, cut: bool, text: bool) -> bool:
    """Whether a bound that excludes no value is the values' extreme, or the writer's cut of it."""
    if raw == value or not cut or len(raw) not in TRUNCATED_BOUND_BYTES:
        return raw == value
    if bound == "min":
        return value.startswith(raw)
    kept = len(raw) - (len(raw.decode("utf-8")[-1].encode()) if text and raw else 1)
    return raw > value and len(value) > kept and value.startswith(raw[:kept])


def column_problem(table: pa.Table) -> str | None:
    """Why the rows cannot be hashed or their derived columns checked (a missing or mistyped
    column, a null where the chain needs a value), if so."""
    for name, type_ok in SEGMENT_COLUMNS.items():
        if name not in table.column_names:
            return f"not a readable segment: column {name} missing"
        column = table.column(name)
        if not type_ok(column.type):
            return f"not a readable segment: column {name} is {column.type}"
        if column.null_count and name not in NULLABLE:
            return f"not a readable segment: column {name} has nulls"
    return None


# ------------------------------------------------------------------ derived columns (CHAIN.md)

RFC3339 = re.compile("([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\\.[0-9]+)?"
                     "([Zz]|[+\\-\u2212][0-9]{2}:[0-9]{2})\\Z")


# The same vectors as src/verify.rs's tests and CHAIN.md's table.
OCCURRED_AT_VECTORS = [
    ("2026-11-18T10:00:00.5+01:00", (1794992400500000, (2026, 11, 18))),
    ("2026-12-31T23:59:60.25Z", (1798761600250000, (2026, 12, 31))),
    ("2026-11-18t10:00:00z", (1794996000000000, (2026, 11, 18))),
    ("2026-11-18T10:00:00.1234567\u221200:30", (1794997800123456, (2026, 11, 18))),
    ("2026-11-18 00:30:00+01:00", (1794958200000000, (2026, 11, 17))),
    ("2026-02-29T00:00:00Z", None),
    ("2026-11-18T24:00:00Z", None),
    ("2026-11-18T10:00:00+24:00", None),
    ("2026-11-18T10:00Z", None),
]


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date, for any year (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The proleptic Gregorian date `days` after 1970-01-01, for any year (H. Hinnant's algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def parse_rfc3339(text: str) -> tuple[int, tuple[int, int, int]] | None:
    """(µs since the epoch, sub-µs digits dropped; the UTC date), or None where chrono's
    parse_from_rfc3339 refuses the text. A leap second (:60) counts as the next second but keeps
    its own date."""
    m = RFC3339.match(text)
    if not m:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 60:
        return None
    if not 1 <= day <= (days_from_civil(year + (month == 12), month % 12 + 1, 1) - days_from_civil(year, month, 1)):
        return None
    micros = int(((m[7] or ".")[1:] + "000000")[:6])
    zone = m[8]
    offset = 0
    if zone not in ("Z", "z"):
        if int(zone[1:3]) > 23 or int(zone[4:6]) > 59:
            return None
        offset = (-1 if zone[0] in "-\u2212" else 1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    utc = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + min(second, 59) - offset
    return (utc + (second == 60)) * 1_000_000 + micros, civil_from_days(utc // 86400)


def quarantine_directory(kafka_timestamp_ms: int | None) -> str:
    year, month, day = 1970, 1, 1
    if kafka_timestamp_ms is not None:
        date = civil_from_days(kafka_timestamp_ms // 86_400_000)
        if -262_143 <= date[0] <= 262_142:  # beyond the writer's calendar (chrono's): 1970-01-01
            year, month, day = date
    return f"quarantine/year={year:04d}/month={month:02d}/day={day:02d}"


def compact_json(raw: str) -> str:
    """JSON text without the whitespace between tokens (what the writer stores as metadata)."""
    out, in_string, escaped = [], False, False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in " \t\n\r":
            continue
        out.append(c)
    return "".join(out)


WS = " \t\n\r"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int:
    """Index past the JSON string starting at text[i] == '"'."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _value_end(text: str, i: int) -> int:
    """Index past the JSON value starting at text[i]: nested values without recursion."""
    if i >= len(text):
        raise ValueError("value expected")
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                i = _string_end(text, i)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated value")
    j = i
    while j < len(text) and text[j] not in WS + ",}]":
        j += 1
    if j == i:
        raise ValueError("value expected")
    return j


def json_members(payload: bytes) -> dict[str, str] | None:
    """A JSON object's members as raw text (the last of a repeated key), or None if the payload is
    not one. Only the fields asked for are ever parsed, as the writer reads them."""
    try:
        text = payload.decode("utf-8")
        i = _skip_ws(text, 0)
        if text[i:i + 1] != "{":
            return None
        members, i = {}, _skip_ws(text, i + 1)
        if text[i:i + 1] == "}":
            return members if _skip_ws(text, i + 1) == len(text) else None
        while True:
            if text[i:i + 1] != '"':
                return None
            end = _string_end(text, i)
            name = json.loads(text[i:end])
            i = _skip_ws(text, end)
            if text[i:i + 1] != ":":
                return None
            start = _skip_ws(text, i + 1)
            end = _value_end(text, start)
            members[name] = text[start:end]
            i = _skip_ws(text, end)
            if text[i:i + 1] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if text[i:i + 1] == "}" and _skip_ws(text, i + 1) == len(text):
                return members
            return None
    except (UnicodeDecodeError, ValueError):
        return None


def _member(members: dict[str, str], name: str, kind: type):
    raw = members.get(name)
    if raw is None:
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            value = float(value)
        except OverflowError:
            return None
        return value if value not in (float("inf"), float("-inf")) else None
    return value if isinstance(value, kind) else None


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _no_repeats(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key repeated")
    return dict(pairs)


def _typed(value):
    """The value with each scalar tagged by its JSON type: Python's True == 1 == 1.0."""
    if isinstance(value, dict):
        return ("object", tuple(sorted((k, _typed(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("array", tuple(_typed(v) for v in value))
    return (type(value).__name__, value)


def _strict_json(text: str):
    """A column's JSON, typed; a repeated key is refused (readers differ on which one wins)."""
    return _typed(json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_repeats))


def _serde_int(text: str):
    # serde_json reads -0 and integers outside [-2^63, 2^64) as floats.
    value = int(text)
    return float(text) if text == "-0" or not -2**63 <= value < 2**64 else value


def _serde_value(text: str):
    """The payload's JSON as serde_json's Value holds it (the last of a repeated key), typed."""
    return _typed(json.loads(text, parse_constant=_no_constants, parse_int=_serde_int))


def derived_check(row: Row) -> tuple[list[str], str | None]:
    """The derived columns that disagree with the payload and verdict, and the directory the row
    belongs in (None when an accepted row's payload gives no date or environment)."""
    d = row.derived
    if row.status == "rejected":
        wrong = [name for name in DERIVED_TEXT if d[name] is not None]
        wrong += [name for name in ("confidence_score", "occurred_at") if d[name] is not None]
        wrong += [name for name in ("reject_code", "reject_reason") if d[name] is None]
        return wrong, quarantine_directory(d["kafka_timestamp"])
    members = json_members(row.payload or b"")
    if members is None:
        return ["payload (not a JSON object)"], None
    wrong = []
    for name in DERIVED_TEXT:
        if name == "metadata":
            raw = members.get("metadata")
            expected = compact_json(raw) if raw is not None and raw.startswith("{") else None
            if expected is not None and d[name] is not None and expected != d[name]:
                # Images before c32fe7f (2026-11-23) re-serialised metadata: the same JSON value,
                # compared strictly (no repeated key, which a first-wins reader would see
                # otherwise; true is not 1, 1 is not 1.0).
                try:
                    if _serde_value(expected) == _strict_json(d[name]):
                        expected = d[name]
                except (ValueError, RecursionError):
                    pass
        else:
            expected = _member(members, name, str)
        if expected != d[name]:
            wrong.append(name)
    if _member(members, "confidence_score", float) != d["confidence_score"]:
        wrong.append("confidence_score")
    text = _member(members, "occurred_at", str)
    parsed = parse_rfc3339(text) if text is not None else None
    if (parsed[0] if parsed else None) != d["occurred_at"]:
        wrong.append("occurred_at")
    wrong += [name for name in ("reject_code", "reject_reason") if d[name] is not None]
    environment = _member(members, "environment", str)
    if parsed is None or environment is None:
        return wrong, None
    year, month, day = parsed[1]
    return wrong, f"year={year:04d}/month={month:02d}/day={day:02d}/environment={environment}"


def checksum_problem(blob: Blob) -> str | None:
    # No stored SHA-256, or a multipart composite one (not a hash of the body): nothing to
    # compare with. object_checksum is defined as a difference; the absence is only noted.
    if not blob.checked or blob.stored_sha256 is None or "-" in blob.stored_sha256:
        return None
    actual = base64.b64encode(sha256(blob.body)).decode()
    if actual != blob.stored_sha256:
        return f"body SHA-256 {actual} differs from the checksum S3 stored at upload {blob.stored_sha256}"
    return None


# ------------------------------------------------------------------ digests

class DigestError(Exception):
    """A digest that does not follow the documented format (digest_malformed)."""


@dataclass
class Digest:
    key: str
    body: bytes
    fields: dict
    key_id: str
    signature: bytes


# Integers by range: the widths CHAIN.md's fields have (partition i32, offsets i64, counts u64).
I32, I64, U64 = (-2**31, I32_MAX), (-2**63, I64_MAX), (0, U64_MAX)
SEGMENT_FIELDS = {"key": str, "sha256": "hex", "rows": U64, "first_offset": I64, "last_offset": I64,
                  "first_prev_hash": "hex", "last_entry_hash": "hex", "merkle_root": "hex"}
DIGEST_FIELDS = {"format": str, "topic": str, "partition": I32, "seq": U64, "prev_digest_sha256": "hex",
                 "key_id": str, "created_at": str, "first_offset": I64, "first_prev_hash": "hex",
                 "last_offset": I64, "last_entry_hash": "hex", "segments": list}


def check_fields(obj, spec: dict, what: str) -> None:
    if not isinstance(obj, dict):
        raise DigestError(f"{what} is not a JSON object")
    if unknown := sorted(set(obj) - set(spec)):
        raise DigestError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}")
    for name, kind in spec.items():
        value = obj.get(name)
        if kind == "hex":
            ok = isinstance(value, str) and HEX64.match(value)
        elif isinstance(kind, tuple):
            ok = isinstance(value, int) and not isinstance(value, bool) and kind[0] <= value <= kind[1]
        else:
            ok = isinstance(value, kind)
        if not ok:
            what_kind = f"an integer in {kind[0]}..{kind[1]}" if isinstance(kind, tuple) else \
                f"a {getattr(kind, '__name__', kind)}"
            raise DigestError(f"{what}: field {name!r} is missing or not {what_kind}")


def unique_keys(pairs: list) -> dict:
    """A JSON object with a key given twice is not the documented format (a parser would pick one)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return obj


def parse_digest(key: str, data: bytes) -> Digest:
    lines = data.split(b"\n")
    if len(lines) != 3 or lines[2] != b"":
        raise DigestError("not exactly two lines each ending in a newline")
    body, sig_line = lines[0], lines[1].decode("ascii", errors="replace")
    m = SIGNATURE_LINE.match(sig_line)
    if not m:
        raise DigestError("second line is not ed25519:<16 hex key_id>:<128 hex signature>")
    try:
        fields = json.loads(body, object_pairs_hook=unique_keys)
    except ValueError as e:
        raise DigestError(f"body is not JSON: {e}") from None
    check_fields(fields, DIGEST_FIELDS, "body")
    if fields["format"] != DIGEST_FORMAT:
        raise DigestError(f"format is {fields['format']!r}, expected {DIGEST_FORMAT!r}")
    for i, seg in enumerate(fields["segments"]):
        check_fields(seg, SEGMENT_FIELDS, f"segments[{i}]")
    return Digest(key, body, fields, m[1], bytes.fromhex(m[2]))


@dataclass
class Signed:
    """What a partition's digests claim: the segments they list, the head at each digest's
    last_offset, and the offset range they cover."""
    listed: dict[str, tuple[dict, str]] = field(default_factory=dict)  # key -> (segment entry, digest key)
    # offset -> [(entry hash, digest key)]: two digests may claim one offset (one replayed from
    # another slot, say), and each claim is checked
    heads: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    heads_seen: set[int] = field(default_factory=set)                  # offsets of heads a row was found at
    first: int | None = None
    last: int | None = None

    def covers(self, first: int, last: int) -> bool:
        """Whether a flush lies inside the signed offset range (one after it is not signed yet)."""
        return self.first is not None and first >= self.first and last <= self.last


# ------------------------------------------------------------------ verifying one partition

class Verifier:
    def __init__(self, store, prefix: str, topic: str, keys: dict[str, ed25519.Ed25519PublicKey],
                 pool: ThreadPoolExecutor, ahead: int, report: Report):
        self.store, self.prefix, self.topic, self.keys = store, prefix, topic, keys
        self.pool, self.ahead, self.report = pool, ahead, report
        self.no_checksum = 0  # objects S3 holds no plain SHA-256 checksum for

    def problem(self, code: str, partition: int, key: str | None, offset: int | None, detail: str) -> None:
        self.report.problem(code, partition, key, offset, detail)

    # -- digests

    def check_digests(self, partition: int, digest_keys: dict[int, str]) -> Signed:
        signed = Signed()
        seqs = sorted(digest_keys)
        prev: Digest | None = None  # None after a missing or malformed digest
        expected = 0
        fetched = bounded_map(self.pool, lambda s: self.fetch_digest(digest_keys[s]), seqs, self.ahead)
        for seq, data in zip(seqs, fetched):
            key = digest_keys[seq]
            if seq > expected:  # one problem per gap: a forged huge seq must not mean a huge loop
                self.report_missing_digests(partition, expected, seq, key)
                prev = None
            expected = seq + 1
            if isinstance(data, KeyError):
                self.problem("digest_missing", partition, key, None, f"digest seq {seq} is {data.args[0]}")
                prev = None
                continue
            self.report.digests += 1
            try:
                digest = parse_digest(key, data)
            except DigestError as e:
                self.problem("digest_malformed", partition, key, None, str(e))
                prev = None
                continue
            self.check_signature(partition, digest)
            self.check_digest_chain(partition, digest, seq, prev)
            # A digest that fails its signature or chain still says what it lists: checking
            # that too points at what was changed rather than only at the digest.
            self.record_claims(signed, digest)
            prev = digest
        return signed

    def report_missing_digests(self, partition: int, first: int, found: int, found_key: str) -> None:
        # Named after the digest that reveals the gap (the spec leaves the key open; this is
        # what `aegis-audit verify` reports); the detail names the absent objects.
        absent = digest_key(self.prefix, self.topic, partition, first)
        what = f"digest seq {first} ({absent}) is" if found == first + 1 else \
            f"digests seq {first}..{found - 1} (from {absent}) are"
        self.problem("digest_missing", partition, found_key, None, f"{what} absent, found seq {found}")

    def fetch_digest(self, key: str) -> bytes | KeyError:
        try:
            return self.store.get(key).body
        except KeyError as e:
            return e

    def check_signature(self, partition: int, digest: Digest) -> None:
        problem = None
        public_key = self.keys.get(digest.key_id)
        if public_key is None:
            problem = f"no trusted public key with key_id {digest.key_id}"
        elif digest.fields["key_id"] != digest.key_id:
            problem = f"body key_id {digest.fields['key_id']} differs from the signature's {digest.key_id}"
        else:
            try:
                public_key.verify(digest.signature, digest.body)
            except InvalidSignature:
                problem = f"Ed25519 signature does not verify with key {digest.key_id}"
        if problem:
            self.problem("digest_signature", partition, digest.key, digest.fields["last_offset"], problem)

    def check_digest_chain(self, partition: int, digest: Digest, seq: int, prev: Digest | None) -> None:
        f = digest.fields
        # A digest copied from another slot (replayed) is well formed but out of place.
        where = {"topic": self.topic, "partition": partition, "seq": seq}
        for name, want in where.items():
            if f[name] != want:
                self.problem("digest_chain", partition, digest.key, f["first_offset"],
                             f"body says {name} {f[name]!r} but its key says {want!r}")
        if seq == 0:
            if f["prev_digest_sha256"] != ZERO_HASH:
                self.problem("digest_chain", partition, digest.key, f["first_offset"],
                             "seq 0 must have prev_digest_sha256 of 64 zeros")
            return
        if prev is None:
            return  # the previous digest is missing or malformed: already reported
        if f["prev_digest_sha256"] != hashlib.sha256(prev.body).hexdigest():
            self.problem("digest_chain", partition, digest.key, f["first_offset"],
                         f"prev_digest_sha256 is not the SHA-256 of digest seq {seq - 1}'s body")
        if f["first_prev_hash"] != prev.fields["last_entry_hash"]:
            self.problem("digest_chain", partition, digest.key, f["first_offset"],
                         f"first_prev_hash {f['first_prev_hash']} is not seq {seq - 1}'s last_entry_hash "
                         f"{prev.fields['last_entry_hash']}")
        if f["first_offset"] <= prev.fields["last_offset"]:
            self.problem("digest_chain", partition, digest.key, f["first_offset"],
                         f"first_offset {f['first_offset']} does not follow seq {seq - 1}'s last_offset "
                         f"{prev.fields['last_offset']}")

    @staticmethod
    def record_claims(signed: Signed, digest: Digest) -> None:
        f = digest.fields
        for seg in f["segments"]:
            signed.listed.setdefault(seg["key"], (seg, digest.key))
        signed.heads.setdefault(f["last_offset"], []).append((f["last_entry_hash"], digest.key))
        signed.first = f["first_offset"] if signed.first is None else min(signed.first, f["first_offset"])
        signed.last = f["last_offset"] if signed.last is None else max(signed.last, f["last_offset"])

    # -- segments

    def verify_partition(self, partition: int, flushes: dict[tuple[int, int], list[str]],
                         digest_keys: dict[int, str], unexpected: list[str]) -> None:
        for key in unexpected:  # e.g. a digest renamed out of the sequence
            self.problem("digest_unexpected", partition, key, None,
                         "in the partition's digest folder but not named <seq:012>.digest")
        signed = self.check_digests(partition, digest_keys)
        chain = ChainState(genesis(self.topic, partition).hex())
        order = sorted(flushes)
        loaded = bounded_map(self.pool, lambda r: [load_segment(self.store, k) for k in sorted(flushes[r])],
                             order, self.ahead)
        for (first, last), segments in zip(order, loaded):
            for seg in segments:
                self.check_object(partition, seg, first, last, signed)
            self.check_flush(partition, first, last, segments, chain, signed)
        self.check_leftover_claims(partition, signed)
        if not digest_keys and flushes:
            self.report.notes.append(f"p{partition}: no digests; its segments are checked by links alone")

    def check_object(self, partition: int, seg: Segment, first: int, last: int, signed: Signed) -> None:
        self.report.objects += 1
        self.report.records += len(seg.rows)
        key = seg.key
        if seg.unreadable:
            self.problem("object_unreadable", partition, key, first, seg.unreadable)
        if seg.checksum_problem:
            self.problem("object_checksum", partition, key, first, seg.checksum_problem)
        if not seg.unreadable and not seg.rows:
            self.problem("segment_range", partition, key, first, "the object has no rows")
        self.no_checksum += seg.no_checksum
        self.check_footer_root(partition, seg, first)
        for offset, detail in seg.footer_problems:
            self.problem("statistics", partition, key, offset, detail)
        claim = signed.listed.pop(key, None)
        if claim is not None:
            self.check_claim(partition, seg, first, *claim)
        elif signed.covers(first, last):
            self.problem("unsigned_segment", partition, key, first,
                         f"flush {first}..{last} lies in the signed range {signed.first}..{signed.last} "
                         "but no digest lists this object")
        else:
            self.report.unsigned_segments += 1

    def check_footer_root(self, partition: int, seg: Segment, first: int) -> None:
        if seg.merkle_error:
            self.problem("merkle_root", partition, seg.key, first, seg.merkle_error)
        elif seg.merkle_root is None:
            return  # unreadable: already reported
        elif seg.footer_root is None:
            self.problem("merkle_root", partition, seg.key, first, "footer has no aegis.merkle_root")
        elif seg.footer_root != seg.merkle_root:
            self.problem("merkle_root", partition, seg.key, first,
                         f"footer aegis.merkle_root {seg.footer_root} but the rows give {seg.merkle_root}")

    def check_claim(self, partition: int, seg: Segment, first: int, claim: dict, digest: str) -> None:
        if seg.sha256 is None:
            return  # unreadable: already reported
        if seg.sha256 != claim["sha256"]:
            self.problem("object_changed", partition, seg.key, first,
                         f"SHA-256 {seg.sha256} but {digest} lists {claim['sha256']}")
        if seg.merkle_root is not None and seg.merkle_root != claim["merkle_root"]:
            self.problem("merkle_root", partition, seg.key, first,
                         f"rows give Merkle root {seg.merkle_root} but {digest} lists {claim['merkle_root']}")

    def check_flush(self, partition: int, first: int, last: int, segments: list[Segment],
                    chain: "ChainState", signed: Signed) -> None:
        # Rows of an unreadable object (reported already) are simply absent here, like those of
        # a deleted object: the links around them break and say where.
        rows = sorted((r for seg in segments for r in seg.rows), key=lambda r: r.offset)
        if not rows:
            key = segments[0].key if segments else None
            self.problem("segment_range", partition, key, first, f"flush {first}..{last} has no rows")
        elif rows[0].offset != first or rows[-1].offset != last:
            bad = rows[0] if rows[0].offset != first else rows[-1]
            self.problem("segment_range", partition, bad.key, bad.offset,
                         f"flush {first}..{last} has rows {rows[0].offset}..{rows[-1].offset}")
        # Where each object lies depends on its key alone: worked out once, not once per row
        # (scan() kept only keys in the trail's directories).
        base = f"{self.prefix}/" if self.prefix else ""
        directories = {seg.key: trail_directory(base, seg.key) for seg in segments}
        for row in rows:
            self.check_row(partition, row, directories[row.key], chain, signed)

    def check_row(self, partition: int, row: Row, directory: str, chain: "ChainState", signed: Signed) -> None:
        if row.topic != self.topic or row.partition != partition:
            self.problem("misplaced_row", partition, row.key, row.offset,
                         f"row is {row.topic!r} partition {row.partition}, the key says {self.topic!r} p{partition}")
        self.check_derived(partition, row, directory)
        self.check_entry_hash(partition, row)
        self.check_order(partition, row, chain)
        self.check_signed_head(partition, row, signed)
        self.check_link(partition, row, chain)

    def check_derived(self, partition: int, row: Row, found: str) -> None:
        # `found`: the row's object's directory; the one the row belongs in is the row's own.
        wrong, directory = derived_check(row)
        if wrong:
            self.problem("derived_column", partition, row.key, row.offset,
                         f"{', '.join(wrong)} do not match the payload")
        if directory is not None and found != directory:
            self.problem("misplaced_row", partition, row.key, row.offset, f"the row belongs under {directory}/")

    def check_order(self, partition: int, row: Row, chain: "ChainState") -> None:
        # Offsets are unique across the trail and increase along the chain; overlapping flushes
        # (or a row written twice) repeat them.
        if chain.highest is not None and row.offset <= chain.highest:
            what = "appears again" if row.offset == chain.highest else f"is not above {chain.highest}, seen before"
            self.problem("duplicate_offset", partition, row.key, row.offset, f"offset {row.offset} {what}")
        else:
            chain.highest = row.offset

    def check_signed_head(self, partition: int, row: Row, signed: Signed) -> None:
        claims = signed.heads.get(row.offset)
        if claims is None:
            return
        signed.heads_seen.add(row.offset)
        for want, digest in claims:  # every row at a signed head's offset must be that head
            if row.entry_hash != want:
                self.problem("digest_mismatch", partition, row.key, row.offset,
                             f"entry_hash {row.entry_hash} but {digest} signed {want}")

    def check_link(self, partition: int, row: Row, chain: "ChainState") -> None:
        # In row order even through repeated offsets: the previous entry is the row before.
        if row.prev_hash != chain.head:
            where = "genesis" if chain.offset is None else f"entry_hash of the previous entry (offset {chain.offset})"
            self.problem("broken_link", partition, row.key, row.offset,
                         f"prev_hash {row.prev_hash} is not the {where} {chain.head}")
        chain.head, chain.offset = row.entry_hash, row.offset

    def check_entry_hash(self, partition: int, row: Row) -> None:
        status = STATUS_CODES.get(row.status)
        if status is None:
            detail = f"status {row.status!r} is neither accepted nor rejected"
        elif not HEX64.match(row.prev_hash):
            detail = f"prev_hash {row.prev_hash!r} is not 64 lowercase hex chars"
        elif len(row.topic.encode()) > 0xFFFF:
            detail = "kafka_topic is too long to hash (u16 length)"
        else:
            payload = row.payload or b""  # a null value is hashed as 0 bytes
            want = entry_hash(bytes.fromhex(row.prev_hash), row.topic, row.partition, row.offset, status, payload)
            if want.hex() == row.entry_hash:
                return
            detail = f"row hashes to {want.hex()}, stored entry_hash {row.entry_hash}"
        self.problem("entry_hash", partition, row.key, row.offset, detail)

    def check_leftover_claims(self, partition: int, signed: Signed) -> None:
        for key, (claim, digest) in signed.listed.items():
            self.problem("missing_segment", partition, key, claim["first_offset"],
                         f"listed in {digest} but not in the trail")
        for offset, claims in signed.heads.items():
            if offset in signed.heads_seen:
                continue
            for want, digest in claims:
                self.problem("digest_mismatch", partition, digest, offset,
                             f"{digest} signed entry_hash {want} at offset {offset}, but no such row is in the trail")


@dataclass
class ChainState:
    head: str                   # entry_hash (hex) of the previous row: the next must link to it
    offset: int | None = None   # that row's offset; None before the first row (head = genesis)
    highest: int | None = None  # highest offset seen so far (offsets must strictly increase)


# ------------------------------------------------------------------ command line

def trusted_keys(args, store, layout: Layout, report: Report) -> dict[str, ed25519.Ed25519PublicKey]:
    keys = {}
    if args.public_key:
        for path in args.public_key:
            try:
                with open(path, "rb") as f:
                    key = load_public_key(f.read(), path)
            except OSError as e:
                raise UsageError(f"--public-key {path}: {e.strerror}") from None
            keys[key_id(key)] = key
        return keys
    for obj in layout.key_files:
        try:
            key = load_public_key(store.get(obj).body, obj)
        except (KeyError, UsageError) as e:
            report.notes.append(f"ignored published key {obj}: {e.args[0]}")
            continue
        keys[key_id(key)] = key
    report.notes.append(f"no --public-key: trusting the {len(keys)} key(s) published under _digests/keys/ "
                        f"({', '.join(sorted(keys)) or 'none'}); pass --public-key for an independent check")
    return keys


def verify(args) -> Report:
    prefix = args.prefix.strip("/")
    if args.dir:
        store = DirStore(args.dir)
    else:
        endpoint = args.endpoint_url if args.endpoint_url is not None else \
            os.environ.get("AEGIS_TEST_AWS_ENDPOINT", DEFAULT_ENDPOINT)
        store = S3Store(args.bucket, endpoint, args.workers)
    report = Report()
    layout = scan(store, prefix, args.topic, args.partition)
    keys = trusted_keys(args, store, layout, report)
    if args.dir:
        report.notes.append("local mirror: S3's stored checksums are not available, object_checksum not checked")
    for key in layout.strangers:
        report.problem("unexpected_object", -1, key, None,
                       "in a trail directory but not a segment of any topic: Athena reads it as part of the table")
    if layout.other_topics:
        report.notes.append(f"segments of other topics share the trail's directories, not verified here: "
                            f"{', '.join(layout.other_topics)} (verify each with --topic)")
    partitions = layout.partitions()
    if not partitions:
        report.notes.append(f"no segments or digests for topic {args.topic!r} under {store.describe()}{prefix}")
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        verifier = Verifier(store, prefix, args.topic, keys, pool, args.workers, report)
        for partition in partitions:
            report.partitions += 1
            verifier.verify_partition(partition, layout.segments.get(partition, {}),
                                      layout.digests.get(partition, {}), layout.unexpected.get(partition, []))
    if verifier.no_checksum:
        report.notes.append(f"{verifier.no_checksum} object(s) have no SHA-256 checksum stored in S3 (every "
                            "segment PUT carries one: copied or rewritten?); object_checksum not checked for them")
    return report


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]):
    p = Parser(description="Verify an aegis-audit trail independently (schemas/CHAIN.md).")
    p.add_argument("--bucket", help="S3 bucket holding the trail")
    p.add_argument("--dir", help="a local mirror of the bucket (each S3 key is a path under DIR)")
    p.add_argument("--prefix", default="trail", help="key prefix of the trail (default: trail)")
    p.add_argument("--topic", help="Kafka topic whose chains to verify")
    p.add_argument("--partition", type=int, help="only this partition")
    p.add_argument("--public-key", action="append", metavar="FILE",
                   help="trusted Ed25519 public key (SPKI PEM); repeatable. Default: the keys published in the bucket")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AEGIS_TEST_AWS_ENDPOINT or "
                   f"{DEFAULT_ENDPOINT}; '' for AWS itself with boto3's default credentials)")
    p.add_argument("--workers", type=int, default=16,
                   help="flushes fetched concurrently, also the most held in memory (default: 16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--self-test", action="store_true", help="check the test vectors of CHAIN.md and exit")
    args = p.parse_args(argv)
    if args.self_test:
        return args
    if bool(args.bucket) == bool(args.dir):
        p.error("give exactly one of --bucket and --dir")
    if not args.topic:
        p.error("--topic is required")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


# ------------------------------------------------------------------ self-test (CHAIN.md vectors)

def self_test() -> bool:
    g0, g7 = genesis("ai-decisions", 0), genesis("ai-decisions", 7)
    e0 = entry_hash(g0, "ai-decisions", 0, 0, 0, b'{"decision_id":"d-1","event_type":"decision"}')
    e1 = entry_hash(e0, "ai-decisions", 0, 1, 1, b"not json")
    e5 = entry_hash(e1, "ai-decisions", 0, 5, 0, b"")
    ints = lambda n: [sha256(struct.pack(">I", i)) for i in range(n)]  # noqa: E731
    seed_key = ed25519.Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
    public = seed_key.public_key()
    message = b'{"format":"aegis-digest/v1"}'
    signature = bytes.fromhex(
        "70af2add3043a9e77eaed85df3c5ccbec454fdb0aa4c6b88c1249e9fb41d6279"
        "a6f9f8f6cb554b675d5019d0fc204486ba53a051ab411cc9e51e4b48e97d110e")
    try:
        public.verify(signature, message)
        verified = "verifies"
    except InvalidSignature:
        verified = "does not verify"
    checks = [
        ("genesis ai-decisions/0", g0.hex(), "9c3f787772d9e568588361733a67cde94159483ec76fd3c82d7eb1d3b181d7cd"),
        ("genesis ai-decisions/7", g7.hex(), "aaa640bb4a298c8433f431e18a51e90ce40028904a383aec87dfc5853496016b"),
        ("entry offset 0 accepted", e0.hex(), "94ddd7fb090d327d570688f7c77dcdf99ef8fe863ecdce451758369beb7342ce"),
        ("entry offset 1 rejected", e1.hex(), "e74ad988c7a070b8a26a20c58667d29dee34de61dcc0fb8c545d5e5a06255ce3"),
        ("entry offset 5 empty", e5.hex(), "e0a1cda54dad9aa1399d3862ba0d436f12c29985d6e4522b00e960d846c85806"),
        ("merkle n=1", merkle_root(ints(1)).hex(), "965053f8e65891f8079863a0808b66d6dbba6e4ac34b710f797019ed633adf92"),
        ("merkle n=3", merkle_root(ints(3)).hex(), "b1782769b8906e20ab9b2648e93f64b15e98d20ebdc70e9d5dd2737378bfa0cd"),
        ("merkle n=5", merkle_root(ints(5)).hex(), "1a5bc16137527daa24003b99e35095b4d66d4c997f8986a46842f3cc4a81e275"),
        ("ed25519 public key",
         public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex(),
         "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"),
        ("ed25519 key_id", key_id(public), "10ba682c8ad13513"),
        ("ed25519 signature", seed_key.sign(message).hex(), signature.hex()),
        ("ed25519 verify", verified, "verifies"),
    ]
    # occurred_at as chrono reads it (CHAIN.md, "Derived columns"): (µs, UTC date) or None.
    for text, want in OCCURRED_AT_VECTORS:
        checks.append((f"occurred_at {text!r}", repr(parse_rfc3339(text)), repr(want)))
    checks.append(("metadata compacted", compact_json(r'{ "a" : [ 1 , "b c\\" ] ,"d":{}}'), r'{"a":[1,"b c\\"],"d":{}}'))
    # An older image's re-serialised metadata: the same value, strictly (CHAIN.md).
    for payload, column, want in [
            ('{"z": 1, "a": [true]}', '{"a":[true],"z":1}', True),
            ('{"z": 1, "a": [true]}', '{"a":[true],"z":1,"z":1}', "a key repeated"),
            ('{"z": 1, "a": [true]}', '{"a":[1],"z":1}', False),
            ('{"z": 1, "a": [true]}', '{"a":[true],"z":1.0}', False),
            # What serde_json's Value made of a payload: the last repeated key, -0 and huge
            # integers as floats.
            ('{"a":1,"a":2}', '{"a":2}', True),
            ('{"a":-0}', '{"a":-0.0}', True),
            ('{"a":18446744073709551616}', '{"a":1.8446744073709552e+19}', True)]:
        try:
            got = _serde_value(payload) == _strict_json(column)
        except ValueError as e:
            got = str(e)
        checks.append((f"metadata as an older image wrote it: {payload} -> {column}", repr(got), repr(want)))
    ok = True
    for name, got, want in checks:
        good = got == want
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name}" + ("" if good else f": got {got}, want {want}"))
    print("self-test OK" if ok else "self-test FAILED")
    return ok


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.self_test:
        return 0 if self_test() else 1
    try:
        report = verify(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # endpoint unreachable, bucket missing, credentials, ...
        print(f"error: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        report.print_text()
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
