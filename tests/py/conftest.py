"""Fixtures for integration tests against the real local stack (ops/stack.sh).

Each test gets fresh names (topic, group, bucket, tables) passed to the aegis-audit binary as
AEGIS_* overrides of config/local.toml, so tests never see each other's data.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("AEGIS_BIN", os.path.join(REPO, "target", "debug", "aegis-audit"))
BROKERS = os.environ.get("AEGIS_TEST_BROKERS", "127.0.0.1:9092")


@pytest.fixture(scope="session", autouse=True)
def stack_is_up():
    out = subprocess.run(["bash", os.path.join(REPO, "ops", "stack.sh"), "status"], capture_output=True, text=True)
    assert out.returncode == 0, f"local stack is not up (run `bash ops/stack.sh up`):\n{out.stdout}{out.stderr}"
    assert os.path.exists(BIN), f"{BIN} not built (run `cargo build`)"


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768+), so an outgoing connection can't take it
    between the pick and the consumer's bind."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def make_signing_key(folder) -> tuple[str, str]:
    """An Ed25519 digest key made with Python's `cryptography` (PKCS#8 PEM), and its public key."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = Path(folder) / "digest-key.pem", Path(folder) / "digest-public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(private), str(public)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory):
    return make_signing_key(tmp_path_factory.mktemp("keys"))


class Aegis:
    """One test's isolated names and helpers to run the binary with them."""

    def __init__(self, tmp_path, signing_key: tuple[str, str], partitions: int = 4):
        tag = uuid.uuid4().hex[:10]
        self.tmp = tmp_path
        self.topic = f"it-{tag}"
        self.dlq = f"it-{tag}.dlq"
        self.group = f"it-{tag}"
        self.bucket = f"it-{tag}"
        self.table = f"it-{tag}-index"
        self.chain_table = f"it-{tag}-chain"
        self.prefix = "trail"
        self.partitions = partitions
        self.metrics_port = free_port()
        self.logs = []
        self.signing_key, self.public_key = signing_key

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update({
            "AEGIS_CONFIG": os.path.join(REPO, "config", "local.toml"),
            "AEGIS_KAFKA__BROKERS": BROKERS,
            "AEGIS_KAFKA__TOPIC": self.topic,
            "AEGIS_KAFKA__DEAD_LETTER_TOPIC": self.dlq,
            "AEGIS_KAFKA__GROUP_ID": self.group,
            "AEGIS_KAFKA__PARTITIONS": str(self.partitions),
            "AEGIS_S3__BUCKET": self.bucket,
            "AEGIS_S3__PREFIX": self.prefix,
            "AEGIS_DYNAMODB__TABLE": self.table,
            "AEGIS_DYNAMODB__CHAIN_TABLE": self.chain_table,
            "AEGIS_SEGMENT__MAX_RECORDS": "300",
            "AEGIS_SEGMENT__MAX_AGE_MS": "1000",
            "AEGIS_METRICS__LISTEN": f"127.0.0.1:{self.metrics_port}",
            "AEGIS_RETRY__MAX_BACKOFF_MS": "2000",
            "AEGIS_DIGEST__SIGNING_KEY_FILE": self.signing_key,
            "AEGIS_DIGEST__INTERVAL_MS": "1500",
            "RUST_LOG": "info,rdkafka=warn",
        })
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *args, timeout=120, check=True, **extra) -> subprocess.CompletedProcess:
        out = subprocess.run([BIN, *args], env=self.env(**extra), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"aegis-audit {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr[-4000:]}")
        return out

    def start(self, *args, **extra) -> subprocess.Popen:
        log = open(self.tmp / f"consumer-{len(self.logs)}.log", "w")
        self.logs.append(log.name)
        return subprocess.Popen([BIN, *args], env=self.env(**extra), stdout=log, stderr=subprocess.STDOUT)

    def consume_until_idle(self, idle=4.0, timeout=180, **extra) -> str:
        """Runs the consumer until it has been idle `idle` seconds; returns its log."""
        proc = self.start("run", "--exit-when-idle", str(idle), **extra)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            with open(self.logs[-1]) as f:
                tail = f.read()[-3000:]
            raise AssertionError(f"consumer did not finish within {timeout}s; log {self.logs[-1]} ends:\n{tail}")
        with open(self.logs[-1]) as f:
            log = f.read()
        assert code == 0, f"consumer exited {code}:\n{log[-4000:]}"
        return log

    def init(self):
        return self.run("init")

    def verify(self, *args, **extra) -> dict:
        """`aegis-audit verify --json` against the test's bucket, with the test's public key."""
        out = self.run("verify", "--json", "--public-key", self.public_key, *args, check=False, timeout=600, **extra)
        assert out.returncode in (0, 1), f"verify exited {out.returncode}: {out.stderr[-2000:]}"
        report = json.loads(out.stdout)
        assert (out.returncode == 0) == report["ok"]
        return report


@pytest.fixture
def aegis(tmp_path, signing_key):
    a = Aegis(tmp_path, signing_key)
    yield a
    for path in a.logs:
        with open(path) as f:
            tail = f.read()[-3000:]
        print(f"--- {path}\n{tail}")


# --- independent producer ------------------------------------------------------------------

ENVS = ["prod", "staging", "dev"]


def make_event(i: int, rng: random.Random, kind: str | None = None, decision_id: str | None = None, day_offset: int = 0) -> dict:
    kind = kind or rng.choices(["decision", "override", "safety_flag"], [80, 12, 8])[0]
    user = f"user-{rng.randrange(20):03d}"
    when = datetime.now(timezone.utc) - timedelta(days=day_offset, seconds=rng.randrange(600))
    event = {
        "decision_id": decision_id or f"dec-{i:06d}",
        "event_type": kind,
        "occurred_at": when.isoformat().replace("+00:00", "Z"),
        "environment": rng.choice(ENVS),
        "user_id": user,
        "session_id": f"{user}-s{rng.randrange(3)}",
        "action": rng.choice(["approve", "deny", "escalate"]),
        "policy_version": "policy-1.2",
        "model_version": "model-7",
        "request_id": f"req-{i:06d}",
        "metadata": {"i": i, "note": "x" * rng.randrange(200)},
    }
    if kind in ("decision", "safety_flag"):
        event["confidence_score"] = round(rng.random(), 3)
    if kind == "override":
        event.update(reviewer_id=f"rev-{rng.randrange(5)}", override_reason="manual review", original_action=event["action"])
    if kind == "safety_flag":
        event.update(safety_category="pii_leak", severity=rng.choice(["low", "high"]))
    return event


def produce(topic: str, payloads: list[bytes], partitions: int | None = None, keys: list[str] | None = None,
            brokers: str = BROKERS) -> list[tuple[int, int, bytes]]:
    """Produces with librdkafka (confluent-kafka), acks=all; returns (partition, offset, payload)."""
    producer = Producer({"bootstrap.servers": brokers, "acks": "all", "linger.ms": 5})
    delivered, errors = [], []

    def report(err, msg):
        if err:
            errors.append(err)
        else:
            delivered.append((msg.partition(), msg.offset(), msg.value()))

    for i, payload in enumerate(payloads):
        kwargs = {}
        if partitions:
            kwargs["partition"] = i % partitions
        if keys:
            kwargs["key"] = keys[i]
        while True:
            try:
                producer.produce(topic, payload, on_delivery=report, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(60)
    assert not errors, errors
    assert len(delivered) == len(payloads)
    return delivered


def committed_offsets(group: str, topic: str, partitions: int, brokers: str = BROKERS) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def stack_service_argv(name: str) -> list[str]:
    """The command line of the service `ops/stack.sh` started as `name` (from its pid file), not
    just any process of that name."""
    stack_dir = os.environ.get("AEGIS_STACK_DIR", os.path.join(REPO, ".stack"))
    with open(os.path.join(stack_dir, "run", f"{name}.pid")) as f:
        pid = f.read().split()[0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [arg.decode() for arg in f.read().split(b"\0") if arg]


@contextlib.contextmanager
def private_broker(folder):
    """A tansu broker of the test's own (the stack's binary, SQLite storage in `folder`) for what
    the shared one cannot take: tansu 0.6 deletes every topic of the broker on DeleteTopics
    (README). Yields its bootstrap address."""
    tansu = stack_service_argv("broker")[0]
    assert os.path.basename(tansu) == "tansu", f"the stack's broker is not tansu: {tansu}"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(os.path.join(folder, "private-broker.log"), "w")
    proc = subprocess.Popen([tansu, "broker", "--cluster-id", "aegis-private", "--listener-url", url,
                             "--advertised-listener-url", url, "--storage-engine", "sqlite://tansu.db"],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RUST_LOG": "warn", "NO_COLOR": "1"})
    brokers = f"127.0.0.1:{port}"
    try:
        admin = AdminClient({"bootstrap.servers": brokers})

        def answers():
            try:
                return admin.list_topics(timeout=2) is not None
            except Exception:  # noqa: BLE001 - not listening yet
                return False
        wait_for(answers, timeout=30, what=f"the private broker on {brokers}")
        yield brokers
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def http(aegis, path):
    """(status, body) of a GET on the consumer's metrics port; (None, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{aegis.metrics_port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def wait_for(predicate, timeout=60.0, interval=0.5, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
