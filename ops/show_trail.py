"""Shows what `aegis-audit run` wrote: S3 layout, a DuckDB query over the Hive-partitioned
Parquet (the way Athena reads it), and a DynamoDB lookup. Reads config/local.toml (or
$AEGIS_CONFIG) and uses only boto3, duckdb and the standard library."""
import collections
import os
import sys
import tempfile
import tomllib

import boto3
import duckdb

config = tomllib.load(open(os.environ.get("AEGIS_CONFIG", "config/local.toml"), "rb"))
env = lambda section, key: os.environ.get(f"AEGIS_{section.upper()}__{key.upper()}", config[section].get(key))
bucket, prefix = env("s3", "bucket"), env("s3", "prefix")
kw = dict(region_name=config.get("aws", {}).get("region", "us-east-1"),
          aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
          aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
s3 = boto3.client("s3", endpoint_url=env("s3", "endpoint_url"), **kw)
ddb = boto3.client("dynamodb", endpoint_url=env("dynamodb", "endpoint_url"), **kw)

keys = []
prefix = prefix.strip("/")
base = f"{prefix}/" if prefix else ""  # an empty prefix: the trail is at the bucket's root
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
    # Segments only: digests and keys live under _digests/, markers under _chains/ and _pruned/.
    keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])
             if o["Key"].endswith(".parquet") and not o["Key"][len(base):].startswith("_")]
if not keys:
    sys.exit(f"no segments under s3://{bucket}/{base}")
dirs = collections.Counter(k.rsplit("/", 1)[0] for k, _ in keys)
print(f"s3://{bucket}/ holds {len(keys)} Parquet segments, {sum(s for _, s in keys) / 1e6:.2f} MB:")
for d, n in sorted(dirs.items()):
    print(f"  {d}/  ({n} objects)")
print(f"  e.g. {keys[0][0]}")

with tempfile.TemporaryDirectory() as mirror:
    for key, _ in keys:
        path = os.path.join(mirror, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, key, path)
    glob = f"{mirror}/{base}year=*/month=*/day=*/environment=*/*.parquet"
    query = f"""select environment, event_type, count(*) as events,
       count(distinct kafka_partition || ':' || kafka_offset) as distinct_offsets,
       round(avg(confidence_score), 3) as avg_confidence
from read_parquet('{glob}', hive_partitioning = 1)
group by all order by all"""
    print("\nDuckDB over the Hive layout (what Athena sees):")
    print("  " + query.replace(mirror, "<mirror>").replace("\n", "\n  "))
    print(duckdb.sql(query))
    found = duckdb.sql(f"select decision_id from read_parquet('{glob}', hive_partitioning = 1) where event_type = 'override' limit 1").fetchall()
    sample = found[0] if found else None

if sample:
    table = env("dynamodb", "table")
    items = ddb.query(TableName=table, KeyConditionExpression="PK = :pk",
                      ExpressionAttributeValues={":pk": {"S": f"DECISION#{sample[0]}"}})["Items"]
    print(f"DynamoDB: Query {table} PK = DECISION#{sample[0]} ->")
    for item in items:
        print(f"  {item['SK']['S']}: action={item['action']['S']} user={item['user_id']['S']}"
              + (f" reviewer={item['reviewer_id']['S']}" if "reviewer_id" in item else ""))
