"""The Athena table of ops/athena/ checked against the real trail on the local stack.

- create_table.sql declares every column of schemas/parquet-columns.md (and of a real segment)
  with the matching Athena type; `aegis-audit athena-ddl` prints it with the four placeholders
  filled in; its partition projection (storage.location.template) yields exactly the directories
  aegis-audit writes: every accepted segment, and nothing in quarantine or _digests;
- the example queries of ops/athena/queries/, run with DuckDB over a local mirror of the bucket
  (the Hive layout Athena reads) through a view typed as the DDL types the table, give exactly the
  answers computed in Python from the events produced.

The answers come from independent clients: confluent-kafka produces, boto3 mirrors, pyarrow and
DuckDB read.
"""
from __future__ import annotations

import io
import json
import random
import re
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import trail
from conftest import REPO, make_event, produce

ATHENA = Path(REPO) / "ops" / "athena"
DDL = ATHENA / "create_table.sql"
QUERIES = ATHENA / "queries"
COLUMNS_DOC = Path(REPO) / "schemas" / "parquet-columns.md"

PLACEHOLDERS = {"database", "table", "location", "projection_start_year"}
START_YEAR = 2000  # the first year decode.rs accepts for occurred_at
PARTITION_KEYS = [("year", "int"), ("month", "int"), ("day", "int"), ("environment", "string")]
VIEW = "audit_trail"
EPOCH = datetime(1970, 1, 1)
# Athena type -> the DuckDB type with the same values, for the view that stands in for the table.
DUCKDB_TYPE = {"string": "VARCHAR", "int": "INTEGER", "bigint": "BIGINT", "double": "DOUBLE",
               "binary": "BLOB", "timestamp": "TIMESTAMP"}


# --- the DDL template ------------------------------------------------------------------------

def render_ddl(database="aegis_audit", table="audit_trail", location="s3://bucket/trail/", start_year=START_YEAR) -> str:
    """What `aegis-audit athena-ddl` prints: the four placeholders substituted, nothing else."""
    text = DDL.read_text()
    for name, value in {"database": database, "table": table, "location": location,
                        "projection_start_year": str(start_year)}.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def block(text: str, opener: str) -> list[str]:
    """The lines after the line that ends with `opener`, up to the line that starts with `)`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith(opener))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith(")"))
    return lines[start + 1:end]


def column_defs(lines: list[str]) -> list[tuple[str, str]]:
    cols = []
    for line in lines:
        m = re.match(r"\s*`(\w+)`\s+(\w+)", line)
        if m:
            cols.append((m.group(1), m.group(2).lower()))
    return cols


def ddl_parts(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, str]]:
    """(data columns, partition columns, TBLPROPERTIES) of the rendered DDL."""
    data = column_defs(block(text, "` ("))
    partitions = column_defs(block(text, "PARTITIONED BY ("))
    props = {}
    for line in block(text, "TBLPROPERTIES ("):
        m = re.match(r"\s*'([\w.]+)'\s*=\s*'([^']*)',?\s*$", line)
        if m:
            props[m.group(1)] = m.group(2)
    return data, partitions, props


def documented_columns() -> list[tuple[str, str]]:
    """(column, Athena type) for every row of the table in schemas/parquet-columns.md."""
    cols = []
    for line in COLUMNS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("column", "") or set(cells[0]) <= set("-: "):
            continue
        arrow = cells[1]
        if arrow.startswith("Timestamp("):
            athena = "timestamp"
        else:
            athena = {"Utf8": "string", "Int32": "int", "Int64": "bigint", "Float64": "double",
                      "Binary": "binary"}[arrow.split(" ")[0]]
        cols.append((cells[0], athena))
    return cols


def athena_type(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_timestamp(t):
        assert t.tz is not None, f"{t}: timestamps must be UTC-adjusted"
        return "timestamp"
    return {pa.int32(): "int", pa.int64(): "bigint", pa.float64(): "double"}[t]


def location_pattern(template: str) -> re.Pattern:
    """storage.location.template as a regex over object URLs, one group per partition key."""
    pattern = re.escape(template)
    for key in ("year", "month", "day", "environment"):
        pattern = pattern.replace(re.escape("${" + key + "}"), f"(?P<{key}>[^/]+)")
    return re.compile("^" + pattern + r"[^/]+\.parquet$")


def project(template: str, props: dict[str, str], year: int, month: int, day: int, environment: str) -> str:
    """The S3 prefix Athena computes for one partition, following the projection properties."""
    def integer(key, value):
        lo, hi = (int(v) for v in props[f"projection.{key}.range"].split(","))
        assert props[f"projection.{key}.type"] == "integer" and lo <= value <= hi, (key, value)
        digits = int(props.get(f"projection.{key}.digits", "1"))
        return f"{value:0{digits}d}"

    return (template.replace("${year}", integer("year", year)).replace("${month}", integer("month", month))
            .replace("${day}", integer("day", day)).replace("${environment}", environment))


def test_ddl_declares_every_parquet_column_and_projects_the_hive_layout():
    raw = DDL.read_text()
    # Athena picks the engine from the first word: nothing may precede CREATE EXTERNAL TABLE.
    assert raw.lstrip().startswith("CREATE EXTERNAL TABLE IF NOT EXISTS `{{database}}`.`{{table}}` (")
    assert set(re.findall(r"\{\{(\w+)\}\}", raw)) == PLACEHOLDERS
    assert re.findall(r"\{\{|\}\}", re.sub(r"\{\{(\w+)\}\}", "", raw)) == [], "stray braces the command would not substitute"
    # Notes inside the statement carry no quote characters (Hive's lexer joins adjacent literals).
    for line in raw.splitlines():
        if line.lstrip().startswith("--"):
            assert "'" not in line and '"' not in line, line
    # Exactly one statement, without a trailing semicolon, as StartQueryExecution takes it.
    assert ";" not in raw

    location = "s3://aegis-audit-example/trail/"
    text = render_ddl(location=location, start_year=2024)
    assert "{{" not in text and "}}" not in text
    data, partitions, props = ddl_parts(text)
    assert data == documented_columns()
    assert partitions == PARTITION_KEYS
    assert not {name for name, _ in data} & {name for name, _ in partitions}
    assert re.search(r"^STORED AS PARQUET$", text, re.M)
    assert re.search(rf"^LOCATION '{re.escape(location)}'$", text, re.M)
    assert props == {
        "projection.enabled": "true",
        "projection.year.type": "integer", "projection.year.range": "2024,2200",
        "projection.month.type": "integer", "projection.month.range": "1,12", "projection.month.digits": "2",
        "projection.day.type": "integer", "projection.day.range": "1,31", "projection.day.digits": "2",
        "projection.environment.type": "injected",
        "storage.location.template": location + "year=${year}/month=${month}/day=${day}/environment=${environment}/",
        "parquet.compression": "ZSTD",
        "classification": "parquet",
    }
    # The template reproduces the keys segment.rs writes, and never a quarantine or digest key.
    pattern = location_pattern(props["storage.location.template"])
    key = "year=2026/month=01/day=05/environment=prod/t-p0003-00000000000000000010-00000000000000000020.parquet"
    m = pattern.match(location + key)
    assert m and m.groupdict() == {"year": "2026", "month": "01", "day": "05", "environment": "prod"}
    assert project(props["storage.location.template"], props, 2026, 1, 5, "prod") == location + key.rsplit("/", 1)[0] + "/"
    assert not pattern.match(location + "quarantine/year=2026/month=01/day=05/t-p0003-00000000000000000010-00000000000000000020.parquet")
    assert not pattern.match(location + "_digests/t/p0003/00000000000000000001.digest")


# --- the example queries ---------------------------------------------------------------------

def load_query(name: str, params: dict[str, str]) -> str:
    """A query file with its header comment dropped, the table placeholder pointed at the DuckDB
    view and each documented example literal replaced (each must occur exactly once)."""
    text = (QUERIES / name).read_text()
    header = [line for line in text.splitlines() if line.startswith("--")]
    assert header and text.startswith("--"), f"{name}: header comment missing"
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    assert body.count("{{database}}.{{table}}") == 1, name
    body = body.replace("{{database}}.{{table}}", VIEW)
    assert "{{" not in body, name
    for literal in params:
        assert body.count(literal) == 1, f"{name}: example literal {literal!r} found {body.count(literal)} times"
        assert any(literal in line for line in header), f"{name}: {literal!r} is not documented in the header"
    # All at once: one after another, a value can spell a later literal (a first day of
    # 2026-12-01 is the example's end literal) and be replaced again.
    if params:
        body = re.sub("|".join(map(re.escape, params)), lambda m: params[m.group(0)], body)
    return body


def day_params(first: date, last: date) -> dict[str, str]:
    """Replacements for the example whole-day range 2026-11-01 to 2026-11-30 (both inclusive)."""
    after = last + timedelta(days=1)
    return {
        "year BETWEEN 2026 AND 2026": f"year BETWEEN {first.year} AND {last.year}",
        "BETWEEN 20261101 AND 20261130": f"BETWEEN {first:%Y%m%d} AND {last:%Y%m%d}",
        "TIMESTAMP '2026-11-01 00:00:00'": f"TIMESTAMP '{first:%Y-%m-%d} 00:00:00'",
        "TIMESTAMP '2026-12-01 00:00:00'": f"TIMESTAMP '{after:%Y-%m-%d} 00:00:00'",
    }


def create_view(con, glob: str, columns: list[tuple[str, str]]):
    """The DuckDB stand-in for the Athena table: every DDL column (data and partition keys) with
    the DuckDB type of its Athena type, over the Hive layout, partition values read as text."""
    con.execute("SET TimeZone = 'UTC'")
    select = ",\n  ".join(f"CAST({name} AS {DUCKDB_TYPE[t]}) AS {name}" for name, t in columns)
    con.execute(f"""CREATE VIEW {VIEW} AS SELECT
  {select}
FROM read_parquet('{glob}', hive_partitioning = true, hive_types_autocast = false)""")


def utc(event: dict) -> datetime:
    """occurred_at as the naive UTC datetime Athena (and the DuckDB view) return."""
    return datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00")).astimezone(timezone.utc).replace(tzinfo=None)


def iso(t: datetime) -> str:
    return t.replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def events_for_the_queries(now: datetime):
    """A deterministic mix: random events over three UTC days, plus hand-made ones whose answers
    are known. Returns (accepted events, rejected payloads, parameters)."""
    rng = random.Random(7_2026)
    events = [make_event(i, rng, day_offset=i % 3) for i in range(600)]
    crafted = random.Random(11)

    def craft(i, kind, when, environment, **fields):
        e = make_event(10_000 + i, crafted, kind=kind)
        e.update(occurred_at=iso(when), environment=environment, **fields)
        for k in [k for k, v in fields.items() if v is None]:
            del e[k]
        return e

    user = "user-007"
    today, yesterday = now.date(), (now - timedelta(days=1)).date()
    midday_yesterday = datetime.combine(yesterday, datetime.min.time()) + timedelta(hours=12)
    three_days_ago = now - timedelta(days=3)
    # Safety flags: a time range that starts yesterday and ends an hour ago, so it cuts through
    # today's partitions (the most recent random events are after its end).
    flag_from = (now - timedelta(hours=30)).replace(microsecond=0)
    flag_to = (now - timedelta(hours=1)).replace(microsecond=0)
    events += [
        # decisions_by_user: in range in prod, in range but staging, before the range.
        craft(0, "decision", now - timedelta(hours=2), "prod", user_id=user, session_id=f"{user}-s9", action="approve"),
        craft(1, "decision", midday_yesterday, "prod", user_id=user, session_id=f"{user}-s9", action="deny"),
        craft(2, "decision", now - timedelta(minutes=30), "staging", user_id=user, action="approve"),
        craft(3, "decision", three_days_ago, "prod", user_id=user, action="escalate"),
        # overrides_per_reviewer: known reviewers and transitions, one outside the date range.
        craft(10, "override", now - timedelta(hours=3), "prod", decision_id="dec-crafted-a", reviewer_id="rev-alice",
              original_action="approve", action="deny"),
        craft(11, "override", now - timedelta(hours=4), "staging", decision_id="dec-crafted-a", reviewer_id="rev-alice",
              original_action="approve", action="deny"),
        craft(12, "override", midday_yesterday, "dev", decision_id="dec-crafted-b", reviewer_id="rev-alice",
              original_action="approve", action="deny"),
        craft(13, "override", midday_yesterday + timedelta(minutes=5), "prod", decision_id="dec-crafted-c",
              reviewer_id="rev-alice", original_action="deny", action="approve"),
        craft(14, "override", now - timedelta(hours=5), "prod", decision_id="dec-crafted-d", reviewer_id="rev-bob",
              original_action="escalate", action="approve"),
        craft(15, "override", now - timedelta(hours=6), "prod", decision_id="dec-crafted-e", reviewer_id="rev-bob",
              original_action=None, action="deny"),
        craft(16, "override", three_days_ago, "prod", decision_id="dec-crafted-f", reviewer_id="rev-carol",
              original_action="approve", action="deny"),
        # safety_flags_in_range: every severity, on and around the bounds (start inclusive, end exclusive).
        craft(20, "safety_flag", flag_from, "staging", severity="high", safety_category="self_harm"),
        craft(21, "safety_flag", flag_from - timedelta(seconds=1), "prod", severity="critical", safety_category="pii_leak"),
        craft(22, "safety_flag", flag_from + timedelta(hours=1), "prod", severity="critical", safety_category="jailbreak"),
        craft(23, "safety_flag", flag_from + timedelta(hours=2), "staging", severity="medium", safety_category="bias"),
        craft(24, "safety_flag", flag_from + timedelta(hours=3), "dev", severity="low", safety_category="toxicity"),
        craft(25, "safety_flag", flag_to - timedelta(seconds=1), "dev", severity="critical", safety_category="pii_leak"),
        craft(26, "safety_flag", flag_to, "prod", severity="high", safety_category="jailbreak"),
        craft(27, "safety_flag", flag_from + timedelta(hours=4), "qa", severity="critical", safety_category="bias"),
    ]
    # Rejected records go to quarantine: never in the table, whatever they claim.
    bad = craft(30, "decision", now - timedelta(hours=2), "prod", user_id=user)
    del bad["confidence_score"]  # required for a decision: rejected as invalid_field
    rejected = [
        json.dumps(craft(31, "decision", now - timedelta(hours=2), "PROD", user_id=user)).encode(),
        json.dumps(bad).encode(),
        b"not json at all",
    ]
    params = {"user": user, "days": (yesterday, today), "flags": (flag_from, flag_to)}
    return events, rejected, params


def test_example_queries_answer_on_the_real_trail(aegis, tmp_path):
    aegis.init()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    events, rejected, params = events_for_the_queries(now)
    payloads = [json.dumps(e).encode() for e in events] + rejected
    delivered = produce(aegis.topic, payloads, partitions=aegis.partitions)
    aegis.consume_until_idle()
    where = {v: (p, o) for p, o, v in delivered}
    order = {id(e): where[json.dumps(e).encode()] for e in events}

    # --- `aegis-audit athena-ddl` against the real bucket: keys, then the Parquet schema ---
    location = f"s3://{aegis.bucket}/{aegis.prefix}/"
    ddl = aegis.run("athena-ddl", "--database", "aegis_it", "--table", VIEW,
                    "--projection-start-year", str(START_YEAR)).stdout
    # The command fills in the four placeholders of the template and changes nothing else
    # (compared without the -- notes, which the binary holds as of its last build).
    def statement(text):
        return [line.rstrip() for line in text.strip().splitlines() if not line.lstrip().startswith("--")]
    assert statement(ddl) == statement(render_ddl(database="aegis_it", table=VIEW, location=location, start_year=START_YEAR))
    data_cols, partition_cols, props = ddl_parts(ddl)
    template = props["storage.location.template"]
    pattern = location_pattern(template)
    keys = trail.list_keys(aegis.bucket, aegis.prefix + "/")
    segments = [k for k in keys if k.endswith(".parquet")]
    quarantine = [k for k in keys if k.startswith(f"{aegis.prefix}/quarantine/")]
    digests = [k for k in keys if k.startswith(f"{aegis.prefix}/_digests/")]
    # Digests, keys, genesis markers: the service's own objects, under names Athena skips.
    hidden = [k for k in keys if k.startswith(f"{aegis.prefix}/_")]
    assert quarantine and digests and segments
    assert any(k.startswith(f"{aegis.prefix}/_chains/") and k.endswith(".genesis") for k in hidden), hidden
    rejects = trail.read_rows(aegis.bucket, f"{aegis.prefix}/quarantine/")
    assert sorted(r["reject_code"] for r in rejects) == ["bad_environment", "invalid_field", "not_json"]
    assert sorted(r["payload"] for r in rejects) == sorted(rejected)
    seen_partitions = set()
    for key in keys:
        m = pattern.match(f"s3://{aegis.bucket}/{key}")
        if key in quarantine or key in hidden:
            assert not m, f"{key} would be read by Athena"
            continue
        assert m, f"{key} is not under storage.location.template {template}: Athena would never read it"
        g = m.groupdict()
        part = (int(g["year"]), int(g["month"]), int(g["day"]), g["environment"])
        # Athena builds the prefix from the projected values; it must be this key's directory.
        assert project(template, props, *part) == f"s3://{aegis.bucket}/{key.rsplit('/', 1)[0]}/"
        seen_partitions.add(part)
    assert len({p[:3] for p in seen_partitions}) >= 3 and len({p[3] for p in seen_partitions}) == 4
    schema = pq.read_schema(io.BytesIO(trail.s3().get_object(Bucket=aegis.bucket, Key=segments[0])["Body"].read()))
    assert [(f.name, athena_type(f.type)) for f in schema] == data_cols

    # --- DuckDB over the mirrored Hive layout, typed as the DDL types the table ---
    mirror = tmp_path / "mirror"
    trail.download(aegis.bucket, str(mirror), aegis.prefix + "/")
    glob = mirror / aegis.prefix / "year=*" / "month=*" / "day=*" / "environment=*" / "*.parquet"
    con = duckdb.connect()
    create_view(con, str(glob), data_cols + partition_cols)
    total, statuses = con.execute(f"SELECT count(*), list(DISTINCT status) FROM {VIEW}").fetchone()
    assert total == len(events) and statuses == ["accepted"]
    check_example_queries(con, events, order, params)


def check_example_queries(con, events: list[dict], order: dict[int, tuple[int, int]], params: dict):
    """Runs the three query files on the DuckDB view and compares with the answers computed from
    `events` (`order`: id(event) -> (kafka partition, offset), the queries' tie-breaker)."""

    def run(name, replacements):
        sql = load_query(name, replacements)
        cur = con.execute(sql)
        return [d[0] for d in cur.description], cur.fetchall()

    def key(e):
        return order[id(e)]

    # decisions_by_user.sql
    user = params["user"]
    first, last = params["days"]
    in_days = [e for e in events if first <= utc(e).date() <= last]
    cols, got = run("decisions_by_user.sql", {"'user-0042'": f"'{user}'", **day_params(first, last)})
    want = sorted((e for e in in_days if e["event_type"] == "decision" and e["user_id"] == user and e["environment"] == "prod"),
                  key=lambda e: ((EPOCH - utc(e)) / timedelta(microseconds=1), key(e)))
    assert cols == ["occurred_at", "decision_id", "environment", "action", "confidence_score", "policy_version",
                    "model_version", "session_id", "request_id"]
    assert got == [(utc(e), e["decision_id"], e["environment"], e["action"], e["confidence_score"], e["policy_version"],
                    e["model_version"], e["session_id"], e["request_id"]) for e in want]
    assert {"req-010000", "req-010001"} <= {r[-1] for r in got}, "the hand-made decisions of the user are missing"

    # safety_flags_in_range.sql
    t0, t1 = params["flags"]
    cols, got = run("safety_flags_in_range.sql", {
        "TIMESTAMP '2026-11-23 00:00:00'": f"TIMESTAMP '{t0:%Y-%m-%d %H:%M:%S}'",
        "TIMESTAMP '2026-11-24 12:00:00'": f"TIMESTAMP '{t1:%Y-%m-%d %H:%M:%S}'",
        "year BETWEEN 2026 AND 2026": f"year BETWEEN {t0.year} AND {t1.year}",
        "BETWEEN 20261123 AND 20261124": f"BETWEEN {t0:%Y%m%d} AND {t1:%Y%m%d}",
    })
    want = sorted((e for e in events if e["event_type"] == "safety_flag" and t0 <= utc(e) < t1
                   and e["environment"] in ("prod", "staging", "dev") and e["severity"] in ("medium", "high", "critical")),
                  key=lambda e: (e["environment"], utc(e), key(e)))
    assert cols == ["environment", "occurred_at", "severity", "safety_category", "decision_id", "user_id", "session_id",
                    "action", "model_version", "policy_version"]
    assert got == [(e["environment"], utc(e), e["severity"], e["safety_category"], e["decision_id"], e["user_id"],
                    e["session_id"], e["action"], e["model_version"], e["policy_version"]) for e in want]
    flags = {r[:4] for r in got}
    assert {("staging", t0, "high", "self_harm"), ("prod", t0 + timedelta(hours=1), "critical", "jailbreak"),
            ("staging", t0 + timedelta(hours=2), "medium", "bias"),
            ("dev", t1 - timedelta(seconds=1), "critical", "pii_leak")} <= flags, "hand-made flags in the range are missing"
    assert not [r for r in got if r[1] in (t0 - timedelta(seconds=1), t1) or r[2] == "low" or r[0] == "qa"]

    # overrides_per_reviewer.sql
    cols, got = run("overrides_per_reviewer.sql", {**day_params(first, last)})
    groups = defaultdict(list)
    for e in in_days:
        if e["event_type"] == "override" and e["environment"] in ("prod", "staging", "dev"):
            groups[(e["reviewer_id"], e.get("original_action"), e["action"])].append(e)
    want = [(r, o, a, len(g), len({e["decision_id"] for e in g}), min(map(utc, g)), max(map(utc, g)))
            for (r, o, a), g in groups.items()]
    want.sort(key=lambda w: (w[0], -w[3], w[1] is None, w[1] or "", w[2]))
    assert cols == ["reviewer_id", "original_action", "action", "overrides", "decisions", "first_at", "last_at"]
    assert got == want
    by_group = {w[:3]: w[3:5] for w in got}
    assert by_group[("rev-alice", "approve", "deny")] == (3, 2)
    assert by_group[("rev-alice", "deny", "approve")] == (1, 1)
    assert by_group[("rev-bob", "escalate", "approve")] == (1, 1)
    assert by_group[("rev-bob", None, "deny")] == (1, 1)
    assert not [w for w in got if w[0] == "rev-carol"]
