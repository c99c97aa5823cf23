"""Independent readers of the audit trail for tests: boto3 + pyarrow + duckdb + hashlib.

Nothing here imports or shells out to aegis-audit: it follows schemas/CHAIN.md and
schemas/parquet-columns.md only, so it cross-checks the Rust implementation.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
from collections import defaultdict

import boto3
import pyarrow.parquet as pq

ENDPOINT = os.environ.get("AEGIS_TEST_AWS_ENDPOINT", "http://127.0.0.1:5000")


def genesis(topic: str, partition: int) -> bytes:
    t = topic.encode()
    return hashlib.sha256(b"aegis-audit/genesis/v1\0" + struct.pack(">H", len(t)) + t + struct.pack(">i", partition)).digest()


def entry_hash(prev: bytes, topic: str, partition: int, offset: int, status: int, payload: bytes) -> bytes:
    t = topic.encode()
    return hashlib.sha256(
        b"aegis-audit/entry/v1\0" + prev + struct.pack(">H", len(t)) + t
        + struct.pack(">iqB", partition, offset, status) + struct.pack(">I", len(payload)) + payload
    ).digest()


def merkle_root(entry_hashes: list[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash over the entry hashes, as schemas/CHAIN.md defines it."""
    def mth(nodes: list[bytes]) -> bytes:
        if len(nodes) == 1:
            return nodes[0]
        k = 1
        while k * 2 < len(nodes):
            k *= 2
        return hashlib.sha256(b"\1" + mth(nodes[:k]) + mth(nodes[k:])).digest()
    return mth([hashlib.sha256(b"\0" + h).digest() for h in entry_hashes])


def s3():
    return boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def dynamodb():
    return boto3.client("dynamodb", endpoint_url=ENDPOINT, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def chain_head(table: str, topic: str, partition: int) -> dict:
    """A partition's chain-head item in the chain table (schemas/dynamodb-layout.md)."""
    return dynamodb().get_item(TableName=table, Key={"PK": {"S": f"CHAIN#{topic}#{partition}"}},
                               ConsistentRead=True)["Item"]


def kms():
    return boto3.client("kms", endpoint_url=ENDPOINT, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def list_keys(bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def download(bucket: str, dest: str, prefix: str = "") -> list[str]:
    """Mirrors the bucket's objects into `dest` keeping the key layout (what Athena scans)."""
    client = s3()
    keys = list_keys(bucket, prefix)
    for key in keys:
        path = os.path.join(dest, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        client.download_file(bucket, key, path)
    return keys


def read_rows(bucket: str, prefix: str) -> list[dict]:
    """Every row of every segment under `prefix` (trail and quarantine), with its object key."""
    client = s3()
    rows = []
    for key in list_keys(bucket, prefix):
        if not key.endswith(".parquet"):
            continue
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for row in pq.read_table(io.BytesIO(body)).to_pylist():
            row["_key"] = key
            rows.append(row)
    return rows


def verify_chains(rows: list[dict]) -> dict[tuple[str, int], int]:
    """Checks every partition's chain from genesis: links, hashes, strictly increasing offsets.
    Returns {(topic, partition): entries}. Raises AssertionError naming the first broken row."""
    by_partition = defaultdict(list)
    for r in rows:
        by_partition[(r["kafka_topic"], r["kafka_partition"])].append(r)
    counts = {}
    for (topic, partition), entries in by_partition.items():
        entries.sort(key=lambda r: r["kafka_offset"])
        prev = genesis(topic, partition)
        last_offset = None
        for r in entries:
            where = f"{topic}/{partition} offset {r['kafka_offset']} in {r['_key']}"
            assert last_offset is None or r["kafka_offset"] > last_offset, f"duplicate or out-of-order offset at {where}"
            assert bytes.fromhex(r["prev_hash"]) == prev, f"broken link at {where}"
            status = 0 if r["status"] == "accepted" else 1
            want = entry_hash(prev, topic, partition, r["kafka_offset"], status, r["payload"])
            assert want.hex() == r["entry_hash"], f"entry hash mismatch at {where}"
            prev = want
            last_offset = r["kafka_offset"]
        counts[(topic, partition)] = len(entries)
    return counts
