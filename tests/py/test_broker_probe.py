"""The local broker does what the consumer relies on (consumer groups with cooperative
rebalances, synchronous commits, resume from committed, data and offsets surviving a broker
restart), proven with librdkafka (confluent-kafka) by tests/py/probe_broker.py."""
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)


def test_broker_supports_groups_rebalances_commits_and_restarts():
    out = subprocess.run([sys.executable, os.path.join(HERE, "probe_broker.py")], capture_output=True, text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, f"required broker checks failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    for check in ("rebalance", "commit", "restart"):
        assert any(check in line and "PASS" in line for line in out.stdout.splitlines()), f"no passing {check} check:\n{out.stdout}"
