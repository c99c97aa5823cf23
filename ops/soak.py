"""Soak: run the fault mix against the local stack for a while, then audit the result.

    bash ops/stack.sh up && eval "$(bash ops/stack.sh env)"
    "$AEGIS_PYTHON" ops/soak.py --duration 600 [--rate 300] [--seed 1]

A producer writes continuously while faults are applied at random: SIGKILL of the consumer,
SIGTERM and restart, a second instance joining then leaving, an S3 + DynamoDB outage, a broker
restart. At the end one clean run drains the topic, and the script prints: events produced,
events in S3, duplicates, gaps, forks (chain breaks), restarts, faults by kind, peak RSS of any
consumer process. Exit status 0 only when duplicates, gaps and forks are all zero.
This is a script, not a test: its figures belong in notes, not assertions on timing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "py"))
import trail  # noqa: E402
from conftest import Aegis, free_port, make_event, make_signing_key, produce  # noqa: E402

SESSION_MS = 6000


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        folder = Path(tempfile.mkdtemp(prefix="aegis-soak-"))
        self.aegis = Aegis(folder, make_signing_key(folder))
        self.env = dict(AEGIS_SEGMENT__MAX_RECORDS="500", AEGIS_SEGMENT__MAX_AGE_MS="500", AEGIS_KAFKA__SESSION_TIMEOUT_MS=str(SESSION_MS))
        self.delivered: list = []
        self.stop = threading.Event()
        self.restarts = 0
        self.faults = collections.Counter()
        self.peak_rss = 0
        self.consumers: list[subprocess.Popen] = []

    def stack(self, *cmd):
        subprocess.run(["bash", str(REPO / "ops" / "stack.sh"), *cmd], check=True, capture_output=True, timeout=180)

    def start(self, metrics_port=None) -> subprocess.Popen:
        extra = dict(self.env)
        if metrics_port:
            extra["AEGIS_METRICS__LISTEN"] = f"127.0.0.1:{metrics_port}"
        proc = self.aegis.start("run", **extra)
        self.consumers.append(proc)
        self.restarts += 1
        return proc

    def sample_rss(self):
        for p in self.consumers:
            if p.poll() is None:
                self.peak_rss = max(self.peak_rss, peak_rss_kib(p.pid))

    def end(self, proc: subprocess.Popen, sig):
        self.sample_rss()
        proc.send_signal(sig)
        proc.wait(timeout=90)
        self.consumers.remove(proc)

    def producer(self):
        i = 0
        batch = max(1, self.args.rate // 5)
        while not self.stop.is_set():
            rng = random.Random(i)
            payloads = [json.dumps(make_event(i * batch + j, rng)).encode() for j in range(batch)]
            self.delivered += produce(self.aegis.topic, payloads, partitions=self.aegis.partitions)
            i += 1
            time.sleep(0.2)

    def run(self):
        try:
            return self.soak()
        finally:
            # Whatever failed: no consumer left running, no outage left in place.
            self.stop.set()
            for p in list(self.consumers):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            subprocess.run(["bash", str(REPO / "ops" / "stack.sh"), "start-aws"], capture_output=True, timeout=180)

    def soak(self):
        a = self.aegis
        a.run("init")
        threading.Thread(target=self.producer, daemon=True).start()
        main = self.start()
        deadline = time.time() + self.args.duration
        while time.time() < deadline:
            time.sleep(self.rng.uniform(2, 6))
            self.sample_rss()
            fault = self.rng.choice(["sigkill", "sigterm", "second_instance", "aws_outage", "broker_restart"])
            self.faults[fault] += 1
            print(f"[soak] {time.strftime('%H:%M:%S')} fault: {fault}", flush=True)
            if fault == "sigkill":
                self.end(main, signal.SIGKILL)
                time.sleep(SESSION_MS / 1000 + 1)  # let the dead member expire (see README: broker quirks)
                main = self.start()
            elif fault == "sigterm":
                self.end(main, signal.SIGTERM)
                main = self.start()
            elif fault == "second_instance":
                other = self.start(metrics_port=free_port())
                time.sleep(self.rng.uniform(4, 10))
                self.end(other, signal.SIGTERM)
            elif fault == "aws_outage":
                self.stack("stop-aws")
                time.sleep(self.rng.uniform(3, 10))
                self.stack("start-aws")
            else:
                self.stack("restart-broker")
        self.stop.set()
        time.sleep(1)
        self.end(main, signal.SIGTERM)
        for p in list(self.consumers):
            self.end(p, signal.SIGTERM)
        log = a.consume_until_idle(idle=6, timeout=600, **self.env)
        return self.report()

    def report(self) -> int:
        rows = trail.read_rows(self.aegis.bucket, "trail/")
        seen = collections.Counter((r["kafka_partition"], r["kafka_offset"]) for r in rows)
        produced = {(p, o) for p, o, _ in self.delivered}
        duplicates = sum(n - 1 for n in seen.values() if n > 1)
        gaps = len(produced - set(seen))
        forks = 0
        try:
            trail.verify_chains([r for r in rows])
        except AssertionError as e:
            forks = 1
            print(f"[soak] chain check failed: {e}")
        verified = self.aegis.verify()
        if not verified["ok"]:
            print(f"[soak] aegis-audit verify: {verified['problems'][:5]}")
        report = {
            "duration_s": self.args.duration,
            "events_produced": len(self.delivered),
            "events_in_s3": len(rows),
            "duplicates": duplicates,
            "gaps": gaps,
            "forks": forks,
            "restarts": self.restarts,
            "faults": dict(self.faults),
            "peak_rss_mib": round(self.peak_rss / 1024, 1),
            "verify_ok": verified["ok"],
            "digests": verified["digests"],
            "verify_records_per_s": round(verified["records_per_second"]),
        }
        print(json.dumps(report, indent=2))
        clean = duplicates == gaps == forks == 0 and report["events_in_s3"] == report["events_produced"]
        return 0 if clean and verified["ok"] else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=300, help="seconds of faults (default 300)")
    ap.add_argument("--rate", type=int, default=300, help="events per second produced (default 300)")
    ap.add_argument("--seed", type=int, default=1)
    sys.exit(Soak(ap.parse_args()).run())


if __name__ == "__main__":
    main()
