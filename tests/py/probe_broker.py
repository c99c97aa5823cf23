#!/usr/bin/env python3
"""Probe the local Kafka-compatible broker (ops/stack.sh) for what the aegis-audit consumer needs.

Run against a running stack:

    bash ops/stack.sh up
    eval "$(bash ops/stack.sh env)"
    "$AEGIS_PYTHON" tests/py/probe_broker.py            # includes two broker restarts
    "$AEGIS_PYTHON" tests/py/probe_broker.py --no-restart

Each check prints one line: PASS / FAIL / SKIP, [required] or [info]. The exit status is 1 if
any *required* check failed (or was skipped because a required one before it failed). The [info]
checks only report, so a known broker bug there does not fail the run -- read their lines:
  high_watermark*      ListOffsets(latest) == records produced (tansu's dynostore/memory engine
                       answers base offset of the last batch + 1; the sqlite engine is right)
  offsets_for_times    exact timestamp lookups; a timestamp newer than every record must give -1
                       (tansu 0.6.0 sqlite answers 0, i.e. "the beginning")
  snappy_compression   tansu 0.6.0 sqlite acks snappy batches but then cannot fetch them
  idempotent_producer, headers_nullkey_large_compressed
The restart checks run `ops/stack.sh restart-broker` (SIGTERM) and `restart-broker --kill`, so they
need a stack started by ops/stack.sh with the same AEGIS_* environment; --no-restart skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[2]
STACK_SH = REPO / "ops" / "stack.sh"

PARTITIONS = 4
N_RECORDS = 200  # 50 per partition
N_MORE = 20  # produced before resume-from-committed, 5 per partition
N_AFTER_RESTART = 8  # produced after each restart, 2 per partition


class Skip(Exception):
    pass


class Probe:
    def __init__(self, brokers: str) -> None:
        self.brokers = brokers
        self.results: list[tuple[str, str, bool, str]] = []  # (status, name, required, detail)
        self.failed_required: set[str] = set()
        self.run_id = f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
        self.topic = f"aegis-probe-{self.run_id}"
        self.group = f"aegis-probe-group-{self.run_id}"
        # (partition, offset) -> value bytes, for everything produced
        self.produced: dict[tuple[int, int], bytes] = {}
        self.timestamps: dict[tuple[int, int], int] = {}

    # -------------------------------------------------------------- plumbing

    def check(self, name: str, required: bool, fn, needs: tuple[str, ...] = ()):
        missing = [n for n in needs if n in self.failed_required]
        tag = "[required]" if required else "[info]    "
        if missing:
            line = ("SKIP", name, required, f"needs {', '.join(missing)}")
            if required:
                self.failed_required.add(name)
        else:
            t0 = time.monotonic()
            try:
                detail = fn() or ""
                line = ("PASS", name, required, f"{detail} ({time.monotonic() - t0:.1f}s)")
            except Skip as e:
                line = ("SKIP", name, required, str(e))
                if required:
                    self.failed_required.add(name)
            except Exception as e:  # noqa: BLE001 - every failure is reported as FAIL
                line = ("FAIL", name, required, f"{type(e).__name__}: {e} ({time.monotonic() - t0:.1f}s)")
                if required:
                    self.failed_required.add(name)
        self.results.append(line)
        print(f"{line[0]:4} {tag} {name}: {line[3]}", flush=True)

    def admin(self) -> AdminClient:
        # keep a reference: a destroyed AdminClient fails its pending futures (_DESTROY)
        if getattr(self, "_admin", None) is None:
            self._admin = AdminClient({"bootstrap.servers": self.brokers})
        return self._admin

    def producer(self, **extra) -> Producer:
        conf = {"bootstrap.servers": self.brokers, "acks": "all", "linger.ms": 20}
        conf.update(extra)  # keys with dots: pass as producer(**{"enable.idempotence": True})
        return Producer(conf)

    def consumer(self, group: str | None = None, **extra) -> Consumer:
        conf = {
            "bootstrap.servers": self.brokers,
            "group.id": group or self.group,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            "enable.partition.eof": False,
        }
        conf.update(extra)
        return Consumer(conf)

    def tps(self, offset: int | None = None) -> list[TopicPartition]:
        if offset is None:
            return [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        return [TopicPartition(self.topic, p, offset) for p in range(PARTITIONS)]

    def produce(self, n: int, tag: str, timestamp_base: int | None = None, conf: dict | None = None) -> dict[int, list[int]]:
        """Produce n records round-robin over the partitions; returns partition -> offsets."""
        p = self.producer(**(conf or {}))
        errors: list[str] = []
        offsets: dict[int, list[int]] = {i: [] for i in range(PARTITIONS)}

        def on_delivery(err, msg):
            if err is not None:
                errors.append(str(err))
                return
            key = (msg.partition(), msg.offset())
            if key in self.produced:
                errors.append(f"offset {key} assigned twice")
            self.produced[key] = msg.value()
            self.timestamps[key] = msg.timestamp()[1]
            offsets[msg.partition()].append(msg.offset())

        for i in range(n):
            part = i % PARTITIONS
            value = json.dumps({"run": self.run_id, "tag": tag, "i": i, "p": part}).encode()
            kw = {}
            if timestamp_base is not None:
                kw["timestamp"] = timestamp_base + i * 1000
            p.produce(self.topic, key=f"k{i}".encode(), value=value, partition=part, on_delivery=on_delivery, **kw)
            p.poll(0)
        left = p.flush(30)
        if left:
            raise AssertionError(f"{left} records not delivered within 30 s")
        if errors:
            raise AssertionError(f"delivery errors: {errors[:5]}")
        delivered = sum(len(v) for v in offsets.values())
        if delivered != n:
            raise AssertionError(f"{delivered} of {n} delivery reports")
        return offsets

    def consume(self, c: Consumer, n: int, timeout: float) -> list:
        msgs, errors = [], []
        deadline = time.monotonic() + timeout
        while len(msgs) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                errors.append(str(m.error()))
                continue
            msgs.append(m)
        if errors:
            print(f"     (consumer errors seen: {errors[:3]})", flush=True)
        return msgs

    def verify_msgs(self, msgs) -> None:
        seen = set()
        for m in msgs:
            key = (m.partition(), m.offset())
            if key in seen:
                raise AssertionError(f"duplicate delivery of partition {key[0]} offset {key[1]}")
            seen.add(key)
            if key not in self.produced:
                raise AssertionError(f"unexpected record at partition {key[0]} offset {key[1]}")
            if m.value() != self.produced[key]:
                raise AssertionError(f"value mismatch at {key}: {m.value()!r} != {self.produced[key]!r}")

    def expected_end(self) -> dict[int, int]:
        end = {p: 0 for p in range(PARTITIONS)}
        for p, o in self.produced:
            end[p] = max(end[p], o + 1)
        return end

    def committed(self, c: Consumer) -> dict[int, int]:
        return {tp.partition: tp.offset for tp in c.committed(self.tps(), timeout=10)}

    def restart_broker(self, kill: bool) -> float:
        cmd = ["bash", str(STACK_SH), "restart-broker"] + (["--kill"] if kill else [])
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[1:])} failed: {r.stderr.strip()[-800:]}")
        return time.monotonic() - t0

    # -------------------------------------------------------------- checks

    def run(self, do_restart: bool) -> int:
        print(f"probe_broker: brokers={self.brokers} topic={self.topic} group={self.group}", flush=True)
        self.check("create_topic", True, self.c_create_topic)
        self.check("duplicate_topic_error", True, self.c_duplicate, needs=("create_topic",))
        self.check("produce_acks_all", True, self.c_produce, needs=("create_topic",))
        self.check("idempotent_producer", False, self.c_idempotent, needs=("create_topic",))
        self.check("consume_all_and_commit_sync", True, self.c_consume_commit, needs=("produce_acks_all",))
        self.check("committed_offsets", True, self.c_committed, needs=("consume_all_and_commit_sync",))
        self.check("rebalance_two_members", True, self.c_rebalance_join, needs=("consume_all_and_commit_sync",))
        self.check("rebalance_member_leaves", True, self.c_rebalance_leave, needs=("rebalance_two_members",))
        self.check("member_crash_session_expiry", True, self.c_crash, needs=("create_topic",))
        self.check("resume_from_committed", True, self.c_resume, needs=("committed_offsets",))
        self.check("committed_unset_group", True, self.c_committed_unset, needs=("create_topic",))
        self.check("earliest_offsets", True, self.c_earliest, needs=("produce_acks_all",))
        self.check("high_watermark", False, self.c_watermark, needs=("produce_acks_all",))
        self.check("offsets_for_times", False, self.c_offsets_for_times, needs=("produce_acks_all",))
        self.check("headers_nullkey_large_compressed", False, self.c_features, needs=("create_topic",))
        self.check("snappy_compression", False, self.c_snappy, needs=("create_topic",))
        if do_restart:
            for kill in (False, True):
                sfx = "_sigkill" if kill else ""
                self.check(f"restart_broker{sfx}", True, lambda k=kill: self.c_restart(k),
                           needs=("resume_from_committed",))
                self.check(f"committed_survive_restart{sfx}", True, self.c_committed_after_restart,
                           needs=(f"restart_broker{sfx}",))
                self.check(f"data_survive_restart{sfx}", True, self.c_data_after_restart,
                           needs=(f"restart_broker{sfx}",))
                self.check(f"live_consumer_across_restart{sfx}", True, self.c_live_consumer,
                           needs=(f"restart_broker{sfx}",))
                self.check(f"high_watermark_after_restart{sfx}", False, self.c_watermark,
                           needs=(f"restart_broker{sfx}",))
        self.finish_live()

        req = [r for r in self.results if r[2]]
        info = [r for r in self.results if not r[2]]
        rp = sum(r[0] == "PASS" for r in req)
        ip = sum(r[0] == "PASS" for r in info)
        print(
            f"probe_broker summary: required {rp}/{len(req)} pass, informational {ip}/{len(info)} pass",
            flush=True,
        )
        if self.failed_required:
            print(f"RESULT: FAIL (required checks failed: {', '.join(sorted(self.failed_required))})", flush=True)
            return 1
        print("RESULT: PASS (all required checks passed)", flush=True)
        return 0

    def c_create_topic(self):
        fs = self.admin().create_topics([NewTopic(self.topic, num_partitions=PARTITIONS, replication_factor=1)])
        fs[self.topic].result(timeout=15)
        deadline = time.monotonic() + 10
        while True:
            md = self.admin().list_topics(topic=self.topic, timeout=5)
            t = md.topics.get(self.topic)
            if t is not None and t.error is None and len(t.partitions) == PARTITIONS:
                leaders = {p.leader for p in t.partitions.values()}
                return f"{PARTITIONS} partitions, leaders {sorted(leaders)}, brokers {[(b.host, b.port) for b in md.brokers.values()]}"
            if time.monotonic() > deadline:
                raise AssertionError(f"metadata after create: {t and (t.error, len(t.partitions))}")
            time.sleep(0.2)

    def c_duplicate(self):
        fs = self.admin().create_topics([NewTopic(self.topic, num_partitions=PARTITIONS, replication_factor=1)])
        try:
            fs[self.topic].result(timeout=15)
        except KafkaException as e:
            err = e.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return f"got TOPIC_ALREADY_EXISTS ({err.str()})"
            raise AssertionError(f"wrong error: {err.name()} {err.str()}") from e
        raise AssertionError("second create_topics of the same name succeeded")

    def c_produce(self):
        # explicit CreateTime timestamps, 1 s apart, starting 1 h ago (used by offsets_for_times)
        self.ts_base = int(time.time() * 1000) - 3_600_000
        offs = self.produce(N_RECORDS, "initial", timestamp_base=self.ts_base)
        per = N_RECORDS // PARTITIONS
        for part, o in offs.items():
            if sorted(o) != list(range(per)):
                raise AssertionError(f"partition {part} offsets {sorted(o)[:5]}.. expected 0..{per - 1}")
        return f"{N_RECORDS} records acked, offsets 0..{per - 1} on each of {PARTITIONS} partitions"

    def c_idempotent(self):
        before = self.expected_end()
        offs = self.produce(PARTITIONS, "idempotent", conf={"enable.idempotence": True})
        got = {p: o for p, o in offs.items()}
        for part, o in got.items():
            if o != [before[part]]:
                raise AssertionError(f"partition {part}: offsets {o}, expected [{before[part]}]")
        return "enable.idempotence=true producer delivered one record per partition at the expected offsets"

    def c_consume_commit(self):
        end = self.expected_end()
        total = sum(end.values())
        c = self.consumer()
        self.revoked_a = []
        c.subscribe([self.topic],
                    on_revoke=lambda _c, parts: self.revoked_a.append(sorted(tp.partition for tp in parts)))
        msgs = self.consume(c, total, timeout=60)
        if len(msgs) != total:
            c.close()
            raise AssertionError(f"consumed {len(msgs)} of {total} records in 60 s")
        self.verify_msgs(msgs)
        offsets = {}
        for m in msgs:
            offsets[m.partition()] = max(offsets.get(m.partition(), -1), m.offset() + 1)
        if offsets != end:
            c.close()
            raise AssertionError(f"consumed up to {offsets}, expected {end}")
        res = c.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()], asynchronous=False)
        bad = [tp for tp in res if tp.error is not None]
        if bad:
            raise AssertionError(f"commit errors: {bad}")
        self.member_a = c
        self.commit_expected = offsets
        return f"consumed {total} records (no duplicates, values intact), committed {offsets} synchronously"

    def c_committed(self):
        got = self.committed(self.member_a)
        if got != self.commit_expected:
            raise AssertionError(f"committed() = {got}, expected {self.commit_expected}")
        # and from a different client instance in the same group (not just the local cache)
        c = self.consumer()
        try:
            got2 = self.committed(c)
        finally:
            c.close()
        if got2 != self.commit_expected:
            raise AssertionError(f"committed() from a fresh client = {got2}, expected {self.commit_expected}")
        return f"committed() = {got} (same from a second client)"

    def _assignments(self, consumers, want, timeout, records_ok=False):
        deadline = time.monotonic() + timeout
        stable_since = None
        last = None
        while time.monotonic() < deadline:
            for c in consumers:
                m = c.poll(0.1)
                if m is not None and not m.error() and not records_ok:
                    raise AssertionError(f"unexpected record during rebalance: p{m.partition()} o{m.offset()}")
            sets = [frozenset(tp.partition for tp in c.assignment()) for c in consumers]
            if want(sets):
                if sets != last:
                    stable_since = time.monotonic()
                elif time.monotonic() - stable_since > 2.0:
                    return sets
            else:
                stable_since = None
            last = sets
        raise AssertionError(f"assignments never settled as required; last seen {[sorted(s) for s in last or []]}")

    def c_rebalance_join(self):
        a = self.member_a
        b = self.consumer()
        b.subscribe([self.topic])
        self.member_b = b
        revoked_a: list[list[int]] = self.revoked_a
        allp = frozenset(range(PARTITIONS))

        def split(sets):
            sa, sb = sets
            return sa and sb and not (sa & sb) and (sa | sb) == allp

        t0 = time.monotonic()
        sa, sb = self._assignments([a, b], split, timeout=60)
        # Cooperative: A gives up only what moves to B, and keeps consuming the rest meanwhile.
        if any(set(r) >= allp for r in revoked_a):
            raise AssertionError(f"eager rebalance: A had all partitions revoked ({revoked_a}); A={sorted(sa)} B={sorted(sb)}")
        return (f"A={sorted(sa)} B={sorted(sb)} settled {time.monotonic() - t0 - 2:.1f}s after B subscribed; "
                f"A's revocations {revoked_a}: incremental (cooperative)")

    def c_rebalance_leave(self):
        a, b = self.member_a, self.member_b
        b.close()
        self.member_b = None
        allp = frozenset(range(PARTITIONS))
        t0 = time.monotonic()
        (sa,) = self._assignments([a], lambda sets: sets[0] == allp, timeout=60)
        return f"after B closed, A={sorted(sa)} in {time.monotonic() - t0 - 2:.1f}s"

    def c_crash(self):
        """A member that is SIGKILLed (no LeaveGroup) must be expired after session.timeout.ms so a
        new member gets its partitions -- what happens when the service crashes and restarts."""
        group = f"{self.group}-crash"
        code = (
            "import sys, time\n"
            "from confluent_kafka import Consumer\n"
            "c = Consumer({'bootstrap.servers': sys.argv[1], 'group.id': sys.argv[2],"
            " 'partition.assignment.strategy': 'cooperative-sticky', 'enable.auto.commit': False,"
            " 'session.timeout.ms': 10000, 'heartbeat.interval.ms': 1000})\n"
            "c.subscribe([sys.argv[3]])\n"
            "t = time.time() + 60\n"
            "while not c.assignment() and time.time() < t:\n"
            "    c.poll(0.2)\n"
            "print('ASSIGNED', sorted(tp.partition for tp in c.assignment()), flush=True)\n"
            "while True:\n"
            "    c.poll(0.2)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, self.brokers, group, self.topic],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline().strip()
            if not line.startswith("ASSIGNED ["):
                raise AssertionError(f"crash-member subprocess did not get an assignment: {line!r}")
        finally:
            proc.kill()
            proc.wait()
        t0 = time.monotonic()
        c = self.consumer(group=group)
        try:
            c.subscribe([self.topic])
            allp = frozenset(range(PARTITIONS))
            self._assignments([c], lambda sets: sets[0] == allp, timeout=60, records_ok=True)
        finally:
            c.close()
        return (f"member {line[9:]} SIGKILLed; a new member got all partitions {time.monotonic() - t0 - 2:.1f}s later "
                "(session.timeout.ms=10000)")

    def c_resume(self):
        if getattr(self, "member_b", None) is not None:
            self.member_b.close()
        self.member_a.close()
        before = self.expected_end()
        self.produce(N_MORE, "more")
        c = self.consumer()
        c.subscribe([self.topic])
        msgs = self.consume(c, N_MORE, timeout=60)
        extra = self.consume(c, 1, timeout=3)  # nothing else must arrive
        self.verify_msgs(msgs + extra)
        if len(msgs) != N_MORE or extra:
            c.close()
            raise AssertionError(f"got {len(msgs)}+{len(extra)} records, expected exactly {N_MORE} new ones")
        first = {}
        for m in msgs:
            first.setdefault(m.partition(), m.offset())
        if first != self.commit_expected:
            c.close()
            raise AssertionError(f"first offsets after reopen {first}, expected committed {self.commit_expected}")
        end = self.expected_end()
        res = c.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in end.items()], asynchronous=False)
        bad = [tp for tp in res if tp.error is not None]
        if bad:
            raise AssertionError(f"commit errors: {bad}")
        self.commit_expected = end
        self.live = c  # kept open across the broker restarts
        return f"reopened group resumed at {first} (was committed), read exactly the {N_MORE} new records; committed {end}"

    def c_committed_unset(self):
        c = self.consumer(group=f"{self.group}-never-committed")
        try:
            got = self.committed(c)
        finally:
            c.close()
        if any(v != OFFSET_INVALID for v in got.values()):
            raise AssertionError(f"committed() for a group without commits = {got}, expected {OFFSET_INVALID} (none)")
        return f"no commit -> {OFFSET_INVALID} (OFFSET_INVALID) on every partition, so auto.offset.reset applies"

    def c_features(self):
        """Separate 1-partition topic: record headers, null key, null value, a 900 KB value, and
        batches compressed with zstd / gzip / lz4, read back byte for byte (snappy: own check)."""
        topic = f"{self.topic}-features"
        self.admin().create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=15)
        sent = []  # (key, value, headers)
        for codec in ("none", "zstd", "gzip", "lz4"):
            p = self.producer(**{"compression.type": codec})
            errs = []
            batch = [
                (b"k-" + codec.encode(), f"v-{codec}-{i}".encode() * 20, [("h1", b"x"), ("codec", codec.encode())])
                for i in range(10)
            ]
            if codec == "none":
                batch += [(None, b"null-key", []), (b"tombstone", None, []), (b"big", os.urandom(900 * 1024), [])]
            for k, v, h in batch:
                p.produce(topic, key=k, value=v, headers=h or None, partition=0,
                          on_delivery=lambda err, _m: err and errs.append(str(err)))
            if p.flush(30) or errs:
                raise AssertionError(f"produce with compression.type={codec} failed: {errs[:3]}")
            sent += batch
        c = self.consumer(group=f"{self.group}-features", **{"fetch.max.bytes": 4 * 1024 * 1024})
        try:
            c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            msgs = self.consume(c, len(sent), timeout=30)
        finally:
            c.close()
        if len(msgs) != len(sent):
            raise AssertionError(f"read {len(msgs)} of {len(sent)} records")
        for m, (k, v, h) in zip(msgs, sent):
            got_h = [(hk, hv) for hk, hv in (m.headers() or [])]
            if m.key() != k or m.value() != v or got_h != h:
                raise AssertionError(f"mismatch at offset {m.offset()}: key {m.key()!r} vs {k!r}, "
                                     f"value len {len(m.value() or b'')} vs {len(v or b'')}, headers {got_h} vs {h}")
        return f"{len(sent)} records round-trip (headers, null key, null value, 900 KB value, zstd/gzip/lz4)"

    def c_snappy(self):
        """A snappy-compressed batch on its own topic (it may poison the partition for fetches)."""
        topic = f"{self.topic}-snappy"
        self.admin().create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=15)
        p = self.producer(**{"compression.type": "snappy"})
        errs = []
        for i in range(5):
            p.produce(topic, value=f"snappy-{i}".encode() * 20, partition=0,
                      on_delivery=lambda err, _m: err and errs.append(str(err)))
        if p.flush(30) or errs:
            raise AssertionError(f"produce with snappy failed: {errs[:3]}")
        c = self.consumer(group=f"{self.group}-snappy")
        try:
            c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            msgs = self.consume(c, 5, timeout=10)
        finally:
            c.close()
        if len(msgs) != 5:
            raise AssertionError(f"produce was acked, but fetch returned {len(msgs)} of 5 records in 10 s "
                                 "(broker log: UnexpectedType(\"Snappy\"); every fetch of that partition fails)")
        return "5 snappy records round-trip"

    def c_earliest(self):
        c = self.consumer(group=f"{self.group}-wm")
        try:
            lows = {}
            for tp in self.tps():
                lo, _hi = c.get_watermark_offsets(tp, timeout=10, cached=False)
                lows[tp.partition] = lo
        finally:
            c.close()
        if any(v != 0 for v in lows.values()):
            raise AssertionError(f"low watermarks {lows}, expected 0")
        return f"low watermarks {lows}"

    def c_watermark(self):
        end = self.expected_end()
        c = self.consumer(group=f"{self.group}-wm")
        try:
            got = {}
            for tp in self.tps():
                _lo, hi = c.get_watermark_offsets(tp, timeout=10, cached=False)
                got[tp.partition] = hi
        finally:
            c.close()
        if got != end:
            raise AssertionError(f"high watermarks {got}, expected {end} -- do not trust ListOffsets(latest)")
        return f"high watermarks {got} == records produced"

    def c_offsets_for_times(self):
        c = self.consumer(group=f"{self.group}-oft")
        try:
            problems, seen = [], {}
            per = N_RECORDS // PARTITIONS
            for part in range(PARTITIONS):
                # record k on this partition is i = part + k*PARTITIONS, timestamp ts_base + i*1000
                k = per // 2
                ts = self.ts_base + (part + k * PARTITIONS) * 1000
                (r,) = c.offsets_for_times([TopicPartition(self.topic, part, ts)], timeout=10)
                seen[part] = r.offset
                if r.offset != k:
                    problems.append(f"p{part}: ts of offset {k} -> {r.offset}")
                (r2,) = c.offsets_for_times([TopicPartition(self.topic, part, ts - 500)], timeout=10)
                if r2.offset != k:
                    problems.append(f"p{part}: ts between {k - 1} and {k} -> {r2.offset}")
            future = int(time.time() * 1000) + 3_600_000
            (rf,) = c.offsets_for_times([TopicPartition(self.topic, 0, future)], timeout=10)
            if rf.offset != -1:  # Kafka answers -1 (librdkafka OFFSET_END) when no record is that new
                problems.append(f"future ts -> {rf.offset}, Kafka gives -1 (end)")
        finally:
            c.close()
        if problems:
            raise AssertionError("; ".join(problems))
        return f"timestamp lookups exact ({seen}); future timestamp -> -1"

    def c_restart(self, kill: bool):
        dt = self.restart_broker(kill)
        return f"ops/stack.sh restart-broker{' --kill' if kill else ''} took {dt:.1f}s"

    def c_committed_after_restart(self):
        c = self.consumer()
        try:
            got = self.committed(c)
        finally:
            c.close()
        if got != self.commit_expected:
            raise AssertionError(f"committed after restart = {got}, expected {self.commit_expected}")
        return f"committed() = {got}"

    def c_data_after_restart(self):
        end = self.expected_end()
        total = sum(end.values())
        c = self.consumer(group=f"{self.group}-reader-{uuid.uuid4().hex[:4]}")
        try:
            c.assign(self.tps(OFFSET_BEGINNING))
            msgs = self.consume(c, total, timeout=60)
        finally:
            c.close()
        self.verify_msgs(msgs)
        got = {}
        for m in msgs:
            got[m.partition()] = got.get(m.partition(), 0) + 1
        if len(msgs) != total:
            raise AssertionError(f"read back {len(msgs)} of {total} records ({got})")
        # new writes must continue after the old offsets, not overwrite them
        before = self.expected_end()
        offs = self.produce(N_AFTER_RESTART, "after-restart")
        for part, o in offs.items():
            want = list(range(before[part], before[part] + N_AFTER_RESTART // PARTITIONS))
            if sorted(o) != want:
                raise AssertionError(f"p{part}: new records got offsets {sorted(o)}, expected {want}")
        return f"all {total} records read back intact; new records appended at {before}"

    def c_live_consumer(self):
        """The consumer opened before the restart keeps going: it gets the records produced after
        the restart (exactly once) and can commit them."""
        c = self.live
        want = self.expected_end()
        n = sum(want.values()) - sum(self.commit_expected.values())
        msgs = self.consume(c, n, timeout=90)
        extra = self.consume(c, 1, timeout=3)
        self.verify_msgs(msgs + extra)
        if len(msgs) != n or extra:
            raise AssertionError(f"live consumer got {len(msgs)}+{len(extra)} records after restart, expected {n}")
        res = c.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in want.items()], asynchronous=False)
        bad = [tp for tp in res if tp.error is not None]
        if bad:
            raise AssertionError(f"commit after restart failed: {bad}")
        self.commit_expected = want
        return f"got the {n} new records exactly once and committed {want}"

    def finish_live(self):
        c = getattr(self, "live", None)
        if c is not None:
            c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default=os.environ.get("AEGIS_KAFKA__BROKERS", "127.0.0.1:9092"))
    ap.add_argument("--no-restart", action="store_true", help="skip the checks that restart the broker")
    args = ap.parse_args()
    return Probe(args.brokers).run(do_restart=not args.no_restart)


if __name__ == "__main__":
    sys.exit(main())
