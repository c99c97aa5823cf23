"""Driver of ops/bench/e2e.sh (run it through e2e.sh, which brings the stack up and picks the binary).

Per mode ("s3-only", "s3+dynamodb"), on fresh names (topic with P partitions, group, bucket,
tables):
  1. `aegis-audit init`; `aegis-audit produce --count N` (its per-partition offsets are the truth);
  2. throughput: `aegis-audit run --exit-when-idle 15` over the backlog of N events;
  3. broker ceiling: a consumer that only reads, in its own group: what the broker serves here;
  4. baseline: ops/bench/baseline.py on the same topic with its own group and bucket;
  5. latency: `aegis-audit run` again (same group, continues the chain) while marker events are
     produced at a steady trickle; each marker's produce-to-commit latency is observed by polling
     the group's committed offsets;
  6. checks: rows in S3 (distinct partition/offset pairs) equal the events produced, committed
     offsets equal end offsets, and the baseline's entry hashes equal aegis-audit's.
See ops/bench/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pyarrow.parquet as pq
from confluent_kafka import Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "ops" / "bench" / "baseline.py"
sys.path.insert(0, str(REPO / "tests" / "py"))
from conftest import free_port  # noqa: E402  (one port picker: below the ephemeral range, checked free)
BROKERS = os.environ.get("AEGIS_KAFKA__BROKERS", "127.0.0.1:9092")
AWS_URL = os.environ.get("AEGIS_S3__ENDPOINT_URL", "http://127.0.0.1:5000")
# Generous: tansu takes several seconds to serve the first fetch of a topic holding 1M records.
IDLE_S = 15
MAX_RECORDS = 100_000
MAX_AGE_MS = 5_000
SHORT_WINDOW_S = 3 * MAX_AGE_MS / 1000  # a measuring window this short is mostly the max_age wait


def say(msg: str) -> None:
    print(f"[e2e] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int, int, float]:
    """Waits for proc with wait4: (exit code, peak RSS in KiB, user + system CPU seconds), from the
    kernel's rusage."""
    deadline = time.time() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss, usage.ru_utime + usage.ru_stime
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"pid {proc.pid} did not finish within {timeout:.0f} s")
        time.sleep(0.05)


def committed(consumer: Consumer, topic: str, partitions: int, patience: float = 0) -> dict[int, int] | None:
    """The group's committed offsets; None if the broker does not answer (another user of the shared
    stack may be restarting it), after retrying for `patience` seconds."""
    deadline = time.time() + patience
    while True:
        try:
            tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
            return {tp.partition: tp.offset for tp in tps}
        except Exception:  # noqa: BLE001  (KafkaException while the broker is away)
            if time.time() >= deadline:
                return None
            time.sleep(1)


def stack_pids() -> dict[str, str]:
    """The pids of the shared stack's services (ops/stack.sh pid files): if they change during a run,
    someone restarted the broker or cut S3/DynamoDB, and the figures of that run are disturbed."""
    run = Path(os.environ.get("AEGIS_STACK_DIR", REPO / ".stack")) / "run"
    out = {}
    for name in ("broker", "awsproxy", "moto"):
        try:
            out[name] = (run / f"{name}.pid").read_text().split()[0]
        except (OSError, IndexError):
            out[name] = "down"
    return out


def offsets_reader(group: str) -> Consumer:
    return Consumer({"bootstrap.servers": BROKERS, "group.id": group, "enable.auto.commit": False, "log_level": 3})


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="aegis-bench-"))
        self.key = self.tmp / "key.pem"
        self.session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                             region_name="us-east-1")
        self.s3 = self.session.client("s3", endpoint_url=AWS_URL)
        out = subprocess.run([args.bin, "keygen", "--out", str(self.key)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"aegis-audit keygen failed: {out.stderr}")

    # ------------------------------------------------------------------ helpers
    def env(self, names: dict, metrics_port: int) -> dict:
        env = dict(os.environ)
        env.update({
            "AEGIS_CONFIG": str(REPO / "config" / "local.toml"),
            "AEGIS_KAFKA__BROKERS": BROKERS,
            "AEGIS_KAFKA__TOPIC": names["topic"],
            "AEGIS_KAFKA__DEAD_LETTER_TOPIC": names["topic"] + ".dlq",
            "AEGIS_KAFKA__GROUP_ID": names["group"],
            "AEGIS_KAFKA__PARTITIONS": str(self.args.partitions),
            "AEGIS_S3__BUCKET": names["bucket"],
            "AEGIS_S3__PREFIX": "trail",
            "AEGIS_S3__ENDPOINT_URL": AWS_URL,
            "AEGIS_DYNAMODB__ENDPOINT_URL": AWS_URL,
            "AEGIS_DYNAMODB__TABLE": names["table"],
            "AEGIS_DYNAMODB__CHAIN_TABLE": names["chain_table"],
            "AEGIS_SEGMENT__MAX_RECORDS": str(MAX_RECORDS),
            "AEGIS_SEGMENT__MAX_AGE_MS": str(MAX_AGE_MS),
            "AEGIS_METRICS__LISTEN": f"127.0.0.1:{metrics_port}",
            "AEGIS_DIGEST__SIGNING_KEY_FILE": str(self.key),
            "AEGIS_LOG_FORMAT": "json",
            "RUST_LOG": "info,rdkafka=warn",
            # s3-only: S3 and the chain table (the fence) only; the index is rebuildable from S3.
            "AEGIS_DYNAMODB__WRITE_INDEX": "false" if names.get("mode") == "s3-only" else "true",
            # tansu's in-memory storage reports the high watermark as the last batch's base offset
            # + 1 (README), at or below the chain head the latency phase continues from.
            "AEGIS_KAFKA__CHECK_LOG_END": "false" if self.args.broker_storage == "memory" else "true",
        })
        return env

    def aegis(self, names, *args, timeout=600) -> subprocess.CompletedProcess:
        out = subprocess.run([self.args.bin, *args], env=self.env(names, free_port()), capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise SystemExit(f"aegis-audit {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
        return out

    def s3_audit(self, bucket: str, prefix: str) -> dict:
        """Every .parquet object under the prefix: bytes, rows, distinct (partition, offset), entry hashes."""
        keys = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            keys += [(o["Key"], o["Size"]) for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
        rows, seen, hashes, per_part = 0, set(), {}, {}
        for key, _size in keys:
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            t = pq.read_table(io.BytesIO(body), columns=["kafka_partition", "kafka_offset", "entry_hash"])
            rows += t.num_rows
            for p, o, h in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), t.column(2).to_pylist()):
                seen.add((p, o))
                hashes[(p, o)] = h
                lo, hi = per_part.get(p, (o, o))
                per_part[p] = (min(lo, o), max(hi, o))
        return {"objects": len(keys), "bytes": sum(s for _, s in keys), "rows": rows, "distinct": len(seen),
                "pairs": seen, "hashes": hashes, "per_partition": per_part}

    # ------------------------------------------------------------------ phases
    def throughput(self, names: dict, n: int) -> dict:
        port = free_port()
        log_path = self.tmp / f"{names['topic']}-throughput.log"
        with open(log_path, "w") as log:
            t_spawn = time.time()
            proc = subprocess.Popen([self.args.bin, "run", "--exit-when-idle", str(IDLE_S)],
                                    env=self.env(names, port), stdout=log, stderr=subprocess.STDOUT)
        state = {"t_first_consumed": None, "t_all_committed": None, "rss_samples_kib": [], "hwm_kib": 0}
        end = names["end_offsets"]
        stop = threading.Event()

        def sampler():
            reader = offsets_reader(names["group"])
            next_commit_poll = 0.0
            try:
                while not stop.is_set():
                    now = time.time()
                    rss = status_kib(proc.pid, "VmRSS")
                    if rss:
                        state["rss_samples_kib"].append((now - t_spawn, rss))
                        state["hwm_kib"] = max(state["hwm_kib"], status_kib(proc.pid, "VmHWM"))
                    if state["t_first_consumed"] is None:
                        try:
                            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                                text = r.read().decode()
                            consumed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                           if line.startswith("aegis_records_consumed_total"))
                            if consumed > 0:
                                state["t_first_consumed"] = now
                        except OSError:
                            pass
                    elif state["t_all_committed"] is None and now >= next_commit_poll:
                        next_commit_poll = now + 0.25
                        got = committed(reader, names["topic"], self.args.partitions) or {}
                        if got and all(got.get(p, -1) >= o for p, o in end.items()):
                            state["t_all_committed"] = time.time()
                    time.sleep(0.1 if state["t_first_consumed"] is None else 0.25)
            finally:
                reader.close()

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        load_before = os.getloadavg()
        code, maxrss_kib, cpu_s = wait_rusage(proc, timeout=self.args.timeout)
        stop.set()
        th.join(timeout=30)
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        if code != 0:
            raise SystemExit(f"aegis-audit run exited {code}; log: {log_path}")
        flushes = [x for x in lines if x["fields"].get("message") == "flushed"]
        assigned = [ts(x["timestamp"]) for x in lines if x["fields"].get("message") == "partitions assigned"]
        flushed_records = sum(x["fields"]["records"] for x in flushes)
        t_last_flush = max(ts(x["timestamp"]) for x in flushes) if flushes else None
        t_first_flush = min(ts(x["timestamp"]) for x in flushes) if flushes else None
        t_start = state["t_first_consumed"] or (assigned[0] if assigned else None)
        seconds = (t_last_flush - t_start) if (t_last_flush and t_start) else None
        return {
            "log": str(log_path),
            "exit_code": code,
            "events": flushed_records,
            "flushes": len(flushes),
            "objects": sum(x["fields"]["objects"] for x in flushes),
            "start_basis": "first record consumed (aegis_records_consumed_total > 0, polled every 0.1 s)"
                           if state["t_first_consumed"] else "partitions assigned (log; metrics poll saw nothing)",
            "seconds": round(seconds, 3) if seconds else None,
            "events_per_s": round(n / seconds, 1) if seconds else None,
            "startup_s": round(t_start - t_spawn, 3) if t_start else None,
            "first_flush_after_s": round(t_first_flush - t_start, 3) if (t_first_flush and t_start) else None,
            "all_committed_polled_after_s": round(state["t_all_committed"] - t_start, 3)
            if (state["t_all_committed"] and t_start) else None,
            "wall_s": round(time.time() - t_spawn, 3),
            "peak_rss_mib": round(maxrss_kib / 1024, 1),
            # CPU of the whole run (startup and idle tail too) per event: steadier than events/s on
            # a machine the broker and moto share.
            "cpu_s": round(cpu_s, 2),
            "cpu_us_per_event": round(cpu_s * 1e6 / n, 2) if n else None,
            "peak_rss_sampled_vmhwm_mib": round(state["hwm_kib"] / 1024, 1),
            "rss_samples": len(state["rss_samples_kib"]),
            # (seconds since spawn, VmRSS MiB), at most ~120 points
            "rss_timeline_mib": [[round(t, 1), round(k / 1024, 1)] for t, k in
                                 state["rss_samples_kib"][::max(1, len(state["rss_samples_kib"]) // 120)]],
            "flush_log": [[round(ts(x["timestamp"]) - t_start, 2), x["fields"]["partition"], x["fields"]["records"],
                           x["fields"]["objects"]] for x in flushes] if t_start else None,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }

    def broker_ceiling(self, names: dict, n: int) -> dict:
        """A consumer that only reads: librdkafka (confluent-kafka) in its own group, aegis-audit's
        fetch settings, no work per record. What the broker serves here is the most any consumer
        of this stack can show, and so bounds the ratio to the baseline."""
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": names["group"] + "-ceiling",
                      "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3,
                      "fetch.max.bytes": 16 * 1024 * 1024, "queued.max.messages.kbytes": 16384,
                      "fetch.queue.backoff.ms": 10})
        c.subscribe([names["topic"]])
        got, first, last = 0, None, None
        deadline = time.monotonic() + self.args.timeout
        quiet_since = time.monotonic()
        while got < n and time.monotonic() < deadline:
            msgs = c.consume(num_messages=10000, timeout=1.0)
            now = time.monotonic()
            records = sum(1 for m in msgs if not m.error())
            if records:
                first = first or now
                last, quiet_since = now, now
                got += records
            elif first and now - quiet_since > IDLE_S:
                break
        c.close()
        seconds = (last - first) if first and last and last > first else None
        return {"events": got, "seconds": round(seconds, 3) if seconds else None,
                "events_per_s": round(got / seconds, 1) if seconds else None,
                "config": "confluent-kafka consume(10000) batches, no work; fetch.max.bytes 16 MiB, "
                          "queued.max.messages.kbytes 16384, fetch.queue.backoff.ms 10"}

    def baseline(self, names: dict, n: int, dynamodb: bool) -> dict:
        cmd = [sys.executable, str(BASELINE), "--brokers", BROKERS, "--topic", names["topic"],
               "--group", names["group"] + "-baseline", "--bucket", names["bucket"] + "-baseline",
               "--endpoint-url", AWS_URL, "--max-records", str(MAX_RECORDS), "--max-age-ms", str(MAX_AGE_MS),
               "--idle", str(IDLE_S)]
        if dynamodb:
            cmd += ["--dynamodb", "--table", names["table"] + "-baseline"]
        log_path = self.tmp / f"{names['topic']}-baseline.log"
        with open(log_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            # the JSON result is one short line, so the pipe cannot fill before exit
            code, maxrss_kib, cpu_s = wait_rusage(proc, timeout=self.args.timeout)
            out = proc.stdout.read()
        if code != 0:
            raise SystemExit(f"baseline exited {code}; log: {log_path}")
        result = json.loads(out.strip().splitlines()[-1])
        result["peak_rss_mib_wait4"] = round(maxrss_kib / 1024, 1)
        result["cpu_s"] = round(cpu_s, 2)
        result["cpu_us_per_event"] = round(cpu_s * 1e6 / n, 2) if n else None  # per produced event, as for aegis-audit
        result["log"] = str(log_path)
        return result

    def latency(self, names: dict) -> dict:
        """A second aegis-audit run (same group) while markers trickle in; produce-to-commit per marker."""
        port = free_port()
        log_path = self.tmp / f"{names['topic']}-latency.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([self.args.bin, "run"], env=self.env(names, port), stdout=log,
                                    stderr=subprocess.STDOUT)
        P = self.args.partitions
        # Ready when every partition's worker has resumed its chain ("continuing chain" per partition).
        deadline = time.time() + 120
        while time.time() < deadline:
            text = log_path.read_text()
            if text.count('"continuing chain"') >= len(names["end_offsets"]):
                break
            if proc.poll() is not None:
                raise SystemExit(f"aegis-audit run (latency phase) exited {proc.returncode}; log: {log_path}")
            time.sleep(0.2)
        else:
            proc.kill()
            raise SystemExit(f"aegis-audit did not resume all partitions within 120 s; log: {log_path}")
        time.sleep(1)

        markers: list[dict] = []  # partition, offset, t_send
        lock = threading.Lock()
        done_producing = threading.Event()

        failed: list[str] = []

        def produce_markers():
            try:
                produce_all()
            except Exception as e:  # noqa: BLE001
                failed.append(f"marker producer stopped: {e}")
            finally:
                done_producing.set()

        def produce_all():
            producer = Producer({"bootstrap.servers": BROKERS, "acks": "all", "linger.ms": 0})
            total = int(self.args.marker_rate * self.args.marker_seconds)
            t0 = time.time()
            for i in range(total):
                target = t0 + i / self.args.marker_rate
                time.sleep(max(0.0, target - time.time()))
                now = datetime.now(timezone.utc)
                event = {
                    "decision_id": f"marker-{names['topic']}-{i:06d}", "event_type": "decision",
                    "occurred_at": now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                    "environment": "prod", "user_id": "bench-marker", "session_id": "bench-marker-s0",
                    "action": "approve", "confidence_score": 0.5, "policy_version": "policy-1.0",
                    "model_version": "model-bench", "request_id": f"req-marker-{i:06d}",
                    "metadata": {"marker": i, "sent_at": now.timestamp()},
                }
                delivered = {}
                t_send = time.time()
                producer.produce(names["topic"], json.dumps(event).encode(), partition=i % P,
                                 on_delivery=lambda err, msg: delivered.update(err=err, msg=msg))
                producer.flush(30)
                t_ack = time.time()
                if delivered.get("err") or "msg" not in delivered:
                    # e.g. someone restarted the shared broker: this marker is left out, not retried
                    # (its latency would be the outage's)
                    failed.append(f"marker {i}: {delivered.get('err')}")
                    continue
                with lock:
                    markers.append({"partition": i % P, "offset": delivered["msg"].offset(), "t_send": t_send,
                                    "t_ack": t_ack, "t_committed": None})

        threading.Thread(target=produce_markers, daemon=True).start()
        reader = offsets_reader(names["group"])
        poll_rtts = []
        hwm = 0
        hard_deadline = time.time() + self.args.marker_seconds + 300
        try:
            deadline = None
            while time.time() < hard_deadline:
                t0 = time.time()
                got = committed(reader, names["topic"], P) or {}
                t1 = time.time()
                poll_rtts.append(t1 - t0)
                with lock:
                    for m in markers:
                        if m["t_committed"] is None and got.get(m["partition"], -1) > m["offset"]:
                            m["t_committed"] = t1
                    pending = [m for m in markers if m["t_committed"] is None]
                hwm = max(hwm, status_kib(proc.pid, "VmHWM"))
                if done_producing.is_set():
                    if not pending:
                        break
                    deadline = deadline or time.time() + 120
                    if time.time() > deadline:
                        break
                time.sleep(0.1)
        finally:
            reader.close()
            proc.send_signal(signal.SIGTERM)
            code, maxrss_kib, _ = wait_rusage(proc, timeout=120)
        lat = [m["t_committed"] - m["t_send"] for m in markers if m["t_committed"] is not None]
        ack = [m["t_ack"] - m["t_send"] for m in markers]
        for m in markers:
            names["end_offsets"][m["partition"]] = max(names["end_offsets"][m["partition"]], m["offset"] + 1)
        return {
            "log": str(log_path),
            "exit_code": code,
            "markers": len(markers),
            "markers_committed": len(lat),
            "markers_not_produced": failed[:20],
            "rate_per_s": self.args.marker_rate,
            "p50_s": round(pct(lat, 0.50), 3) if lat else None,
            "p99_s": round(pct(lat, 0.99), 3) if lat else None,
            "max_s": round(max(lat), 3) if lat else None,
            "min_s": round(min(lat), 3) if lat else None,
            "produce_ack_p50_s": round(pct(ack, 0.5), 4) if ack else None,
            "offset_poll_interval_s": 0.1,
            "offset_poll_rtt_p50_s": round(pct(poll_rtts, 0.5), 4) if poll_rtts else None,
            "peak_rss_mib": round(maxrss_kib / 1024, 1),
        }

    def cleanup(self, names: dict, baseline_ran: bool, dynamodb_baseline: bool) -> list[str]:
        notes = []
        ddb = self.session.client("dynamodb", endpoint_url=AWS_URL)
        tables = [names["table"], names["chain_table"]] + ([names["table"] + "-baseline"] if dynamodb_baseline else [])
        for t in tables:
            try:
                ddb.delete_table(TableName=t)
            except Exception as e:  # noqa: BLE001
                notes.append(f"table {t}: {e}")
        buckets = [names["bucket"]] + ([names["bucket"] + "-baseline"] if baseline_ran else [])
        for b in buckets:
            try:
                for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=b):
                    objs = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
                    for i in range(0, len(objs), 1000):
                        r = self.s3.delete_objects(Bucket=b, Delete={"Objects": objs[i:i + 1000], "Quiet": True})
                        if r.get("Errors"):
                            raise RuntimeError(f"{len(r['Errors'])} objects not deleted, e.g. {r['Errors'][0]}")
                self.s3.delete_bucket(Bucket=b)
            except Exception as e:  # noqa: BLE001
                notes.append(f"bucket {b} kept: {str(e)[:200]}")
        # Topics are kept: tansu 0.6's DeleteTopics deletes every topic of the broker (README),
        # including those of a test run sharing the stack. `ops/stack.sh down` removes them.
        return notes

    # ------------------------------------------------------------------ one mode
    def mode(self, mode: str) -> dict:
        n, P = self.args.events, self.args.partitions
        tag = uuid.uuid4().hex[:8]
        short = "s3" if mode == "s3-only" else "ddb"
        names = {"topic": f"bench-{short}-{tag}", "group": f"bench-{short}-{tag}", "bucket": f"bench-{short}-{tag}",
                 "table": f"bench-{short}-{tag}-index", "chain_table": f"bench-{short}-{tag}-chain", "mode": mode}
        say(f"=== mode {mode}: topic {names['topic']} ({P} partitions), bucket {names['bucket']}")
        pids_before = stack_pids()
        self.aegis(names, "init")
        t0 = time.time()
        out = self.aegis(names, "produce", "--count", str(n), timeout=3600)
        produce_s = time.time() - t0
        produced = json.loads(out.stdout)["partitions"]
        count = sum(v["count"] for v in produced.values())
        if count != n:
            raise SystemExit(f"produce delivered {count} events, expected {n}")
        names["end_offsets"] = {int(p): v["last_offset"] + 1 for p, v in produced.items()}
        for p in range(P):
            names["end_offsets"].setdefault(p, 0)
        say(f"produced {n} events in {produce_s:.1f} s: " + ", ".join(
            f"p{p}={v['count']}" for p, v in sorted(produced.items(), key=lambda kv: int(kv[0]))))

        say(f"aegis-audit run --exit-when-idle {IDLE_S} (throughput) ...")
        aegis = self.throughput(names, n)
        say(f"aegis: {aegis['events_per_s']} events/s over {aegis['seconds']} s, peak RSS {aegis['peak_rss_mib']} MiB, "
            f"CPU {aegis['cpu_us_per_event']} us/event")
        checks = {}
        reader = offsets_reader(names["group"])
        got = committed(reader, names["topic"], P, patience=120) or {}
        checks["aegis_committed_equals_end"] = all(got.get(p) == o for p, o in names["end_offsets"].items())
        checks["aegis_committed"] = got
        checks["end_offsets"] = dict(names["end_offsets"])
        audit = self.s3_audit(names["bucket"], "trail")
        expected_pairs = {(int(p), o) for p, v in produced.items()
                          for o in range(v["first_offset"], v["last_offset"] + 1)}
        checks["aegis_s3_rows"] = audit["rows"]
        # every produced (partition, offset) exactly once
        checks["aegis_s3_rows_equal_n"] = audit["rows"] == n and audit["pairs"] == expected_pairs
        aegis["parquet_objects"] = audit["objects"]
        aegis["parquet_bytes"] = audit["bytes"]
        aegis["parquet_bytes_per_event"] = round(audit["bytes"] / n, 1)
        aegis_hashes = audit["hashes"]
        del audit

        say("broker ceiling: a consumer that only reads (own group) ...")
        ceiling = self.broker_ceiling(names, n)
        say(f"broker ceiling: {ceiling['events_per_s']} events/s ({ceiling['events']} records read)")

        base = None
        if not self.args.skip_baseline:
            say(f"baseline.py{' --dynamodb' if mode != 's3-only' else ''} on the same topic (own group) ...")
            base = self.baseline(names, n, dynamodb=(mode != "s3-only"))
            say(f"baseline: {base['events_per_s']} events/s over {base['seconds']} s, "
                f"peak RSS {base['peak_rss_mib_wait4']} MiB, CPU {base['cpu_us_per_event']} us/event")
            breader = offsets_reader(names["group"] + "-baseline")
            got = committed(breader, names["topic"], P, patience=120) or {}
            breader.close()
            checks["baseline_committed_equals_end"] = all(got.get(p) == o for p, o in names["end_offsets"].items())
            baudit = self.s3_audit(names["bucket"] + "-baseline", "trail")
            checks["baseline_s3_rows"] = baudit["rows"]
            checks["baseline_s3_rows_equal_n"] = baudit["rows"] == n and baudit["distinct"] == n
            checks["baseline_entry_hashes_equal_aegis"] = baudit["hashes"] == aegis_hashes
            base["parquet_bytes_per_event"] = round(baudit["bytes"] / n, 1)
            base["parquet_objects"] = baudit["objects"]
            del baudit
        del aegis_hashes

        lat = None
        if self.args.marker_seconds > 0:
            say(f"latency: aegis-audit run + {self.args.marker_rate:g} markers/s for {self.args.marker_seconds:g} s ...")
            lat = self.latency(names)
            say(f"latency: p50 {lat['p50_s']} s, p99 {lat['p99_s']} s over {lat['markers_committed']} markers")
            got = committed(reader, names["topic"], P, patience=120) or {}
            checks["aegis_committed_equals_end_after_markers"] = all(
                got.get(p) == o for p, o in names["end_offsets"].items())
            rows = self.s3_audit(names["bucket"], "trail")
            checks["aegis_s3_rows_after_markers"] = rows["rows"]
            checks["aegis_s3_rows_equal_n_plus_markers"] = rows["rows"] == rows["distinct"] == n + lat["markers"]
            checks["all_markers_committed"] = lat["markers_committed"] == lat["markers"]
            del rows
        reader.close()
        pids_after = stack_pids()
        disturbed = [k for k in pids_before if pids_before[k] != pids_after[k]]
        if disturbed:
            say(f"WARNING: {', '.join(disturbed)} restarted during this mode (by another user of the stack?): "
                "its figures are disturbed; run again")

        result = {
            "mode": mode,
            "names": {k: v for k, v in names.items() if k != "end_offsets"},
            "aegis_config": "S3 + chain table (dynamodb.write_index = false)" if mode == "s3-only"
                            else "S3 + DynamoDB index + chain table",
            "baseline_config": "S3 only (no DynamoDB)" if mode == "s3-only" else "S3 + DynamoDB index (batch_writer)",
            "produce_s": round(produce_s, 3),
            "aegis": aegis,
            "baseline": base,
            "latency": lat,
            "ratio_aegis_over_baseline": round(aegis["events_per_s"] / base["events_per_s"], 2)
            if (base and aegis["events_per_s"] and base["events_per_s"]) else None,
            "broker_ceiling": ceiling,
            "ratio_ceiling_over_baseline": round(ceiling["events_per_s"] / base["events_per_s"], 2)
            if (base and ceiling["events_per_s"] and base["events_per_s"]) else None,
            "checks": checks,
            "stack_restarted_during_mode": disturbed,
        }
        if not self.args.keep:
            result["cleanup_notes"] = self.cleanup(names, base is not None, mode != "s3-only")
        return result


def fmt(v, spec=""):
    return "n/a" if v is None else format(v, spec)


def summary(report: dict) -> str:
    rows = []
    short = lambda r: r and r.get("seconds") is not None and r["seconds"] < SHORT_WINDOW_S  # noqa: E731
    mark = lambda r, text: text + (" +" if short(r) else "")  # noqa: E731
    head = ["mode", "aegis ev/s", "baseline ev/s", "ratio", "broker ev/s", "max ratio", "p50 commit s", "p99 commit s", "aegis RSS MiB",
            "base RSS MiB", "aegis CPU us/ev", "base CPU us/ev", "aegis B/ev", "base B/ev", "checks"]
    for m in report["modes"]:
        a, b, lat = m["aegis"], m["baseline"] or {}, m["latency"] or {}
        ok = all(v for k, v in m["checks"].items() if isinstance(v, bool))
        rows.append([
            m["mode"] + (" *" if m["mode"] == "s3-only" else ""),
            mark(a, fmt(a["events_per_s"], ",.0f")), mark(b, fmt(b.get("events_per_s"), ",.0f")),
            fmt(m["ratio_aegis_over_baseline"], ".2f"),
            fmt(m["broker_ceiling"]["events_per_s"], ",.0f"), fmt(m["ratio_ceiling_over_baseline"], ".2f"),
            fmt(lat.get("p50_s"), ".2f"), fmt(lat.get("p99_s"), ".2f"), fmt(a["peak_rss_mib"], ".0f"),
            fmt(b.get("peak_rss_mib_wait4"), ".0f"), fmt(a.get("cpu_us_per_event"), ".1f"),
            fmt(b.get("cpu_us_per_event"), ".1f"), fmt(a["parquet_bytes_per_event"], ".0f"),
            fmt(b.get("parquet_bytes_per_event"), ".0f"),
            ("ok" if ok else "FAILED") + (" (stack restarted: disturbed)" if m["stack_restarted_during_mode"] else ""),
        ])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


NOTES = [
    "binary: {build} build ({bin}); N = {events} events, {partitions} partitions; segment.max_records=100000, "
    "segment.max_age_ms=5000, --exit-when-idle 15; broker: tansu, {broker_storage} storage; machine: {cpus} CPUs "
    "shared by broker, moto, consumer and others.",
    "ev/s: N / (last offset commit - first record consumed). aegis-audit: start = first poll (every 0.1 s) of "
    "/metrics showing aegis_records_consumed_total > 0; end = timestamp of the last 'flushed' log line (the "
    "offset commit follows it; the broker-polled 'all committed' time is in the JSON). Baseline: first record "
    "returned by consume() -> return of its last commit. Startup, group join and the idle tail are excluded; "
    "the final wait of up to max_age_ms (5 s) for the last partial segments is included for both.",
    "broker ev/s: a consumer that only reads (confluent-kafka, own group, aegis-audit's fetch settings, no work) "
    "over the same N records: what the broker serves on this machine, the ceiling for any consumer here. "
    "max ratio = broker ev/s / baseline ev/s: the largest ratio any consumer could show on this stack.",
    "* s3-only: aegis-audit runs with dynamodb.write_index = false: segments to S3, plus one conditional write "
    "per flush to the chain table (its fence and progress marker, which it cannot run without); the baseline "
    "writes S3 only.",
    "p50/p99 commit s: produce-to-commit latency of marker events produced at a steady trickle (see JSON: rate, "
    "count) to a second aegis-audit run that has caught up, i.e. at low load, not during the backlog drain. "
    "Latency = time the group's committed offset (polled every 0.1 s via OffsetFetch) first exceeds the marker's "
    "offset - time produce() was called. It is dominated by segment.max_age_ms=5000 by design (a quiet partition "
    "flushes when its oldest record is 5 s old). With a few hundred markers, p99 is close to the maximum. "
    "Not measured for the baseline.",
    "+ : measuring window under {short:g} s: the figure is mostly the final wait of up to max_age_ms (5 s) "
    "for the last segments plus one flush, not a sustained rate; use a larger --events.",
    "RSS: peak resident set from the kernel (wait4 rusage ru_maxrss) of the throughput run; baseline likewise.",
    "CPU us/ev: user + system CPU of the whole process (wait4 rusage; startup and idle tail included) / N; "
    "steadier than ev/s on a machine the consumer shares with the broker and moto.",
    "B/ev: sum of .parquet object sizes under the trail prefix / N, after the throughput run (aegis-audit writes "
    "one object per Hive directory per flush; the baseline one object per partition per flush).",
    "moto's DynamoDB (and S3) are in-process Python and far slower than the real services; in s3+dynamodb mode "
    "both consumers are bound by moto. Figures from this stack are not production figures.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--build", required=True)
    ap.add_argument("--broker-storage", default="unknown", help="the tansu storage engine (memory, sqlite)")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--modes", default="s3-only,s3+dynamodb")
    ap.add_argument("--marker-rate", type=float, default=10.0, help="latency markers per second")
    ap.add_argument("--marker-seconds", type=float, default=30.0, help="how long markers are produced (0: skip)")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="max seconds per consumer run")
    ap.add_argument("--keep", action="store_true", help="keep topics, buckets and tables (default: delete them)")
    ap.add_argument("--results-dir", default=str(REPO / "ops" / "bench" / "results"))
    args = ap.parse_args()

    bench = Bench(args)
    started = datetime.now(timezone.utc)
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "binary": args.bin, "build": args.build, "events": args.events, "partitions": args.partitions,
        "broker": {"name": "tansu", "storage": args.broker_storage},
        "config": {"segment.max_records": MAX_RECORDS, "segment.max_age_ms": MAX_AGE_MS, "exit_when_idle_s": IDLE_S,
                   "base": "config/local.toml (Object Lock retention 1 day, digests every 10 s)"},
        "host": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "modes": [],
    }
    for mode in args.modes.split(","):
        report["modes"].append(bench.mode(mode.strip()))
    report["host"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["notes"] = [n.format(build=args.build, bin=args.bin, events=args.events, partitions=args.partitions,
                                cpus=os.cpu_count(), short=SHORT_WINDOW_S, broker_storage=args.broker_storage)
                       for n in NOTES]
    table = summary(report)
    report["summary_table"] = table.splitlines()

    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"e2e-{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print()
    print(table)
    print()
    for note in report["notes"]:
        print("- " + note)
    failed = [f"{m['mode']}: {k}" for m in report["modes"] for k, v in m["checks"].items() if v is False]
    print()
    print(f"checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    print(f"JSON: {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
