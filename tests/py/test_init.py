"""`aegis-audit init` is idempotent and creates what the config says, checked with
confluent-kafka and boto3 (not our own code); `keygen` writes a key the `cryptography`
package reads."""
import stat
import subprocess

from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import BIN, BROKERS
import trail


def test_init_twice_creates_topic_bucket_and_tables(aegis):
    first = aegis.init().stdout
    assert f"topic {aegis.topic}: created with 4 partitions" in first
    assert f"bucket {aegis.bucket}: created with Object Lock" in first
    second = aegis.init().stdout
    assert f"topic {aegis.topic}: exists" in second
    assert f"bucket {aegis.bucket}: exists" in second
    assert f"table {aegis.table}: exists" in second

    metadata = AdminClient({"bootstrap.servers": BROKERS}).list_topics(timeout=20)
    assert len(metadata.topics[aegis.topic].partitions) == 4
    assert aegis.dlq in metadata.topics

    s3 = trail.s3()
    assert s3.get_bucket_versioning(Bucket=aegis.bucket)["Status"] == "Enabled"
    lock = s3.get_object_lock_configuration(Bucket=aegis.bucket)["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"

    ddb = trail.dynamodb()
    table = ddb.describe_table(TableName=aegis.table)["Table"]
    assert {k["AttributeName"]: k["KeyType"] for k in table["KeySchema"]} == {"PK": "HASH", "SK": "RANGE"}
    gsis = {g["IndexName"]: [k["AttributeName"] for k in g["KeySchema"]] for g in table["GlobalSecondaryIndexes"]}
    assert gsis == {"GSI1": ["GSI1PK", "GSI1SK"], "GSI2": ["GSI2PK", "GSI2SK"]}
    chain = ddb.describe_table(TableName=aegis.chain_table)["Table"]
    assert [k["AttributeName"] for k in chain["KeySchema"]] == ["PK"]


def test_config_check_names_bad_key_and_redacts_secrets(aegis):
    out = aegis.run("config", "check")
    assert "secret_access_key = \"<redacted>\"" in out.stdout
    assert 'secret_access_key = "testing"' not in out.stdout
    bad = aegis.run("config", "check", check=False, AEGIS_SEGMENT__MAX_RECORDS="lots")
    assert bad.returncode == 2
    assert "MAX_RECORDS" in bad.stderr.upper() and "error:" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_keygen_writes_an_owner_only_ed25519_key_and_never_replaces_one(tmp_path):
    private, public = tmp_path / "signing.pem", tmp_path / "public.pem"
    args = [BIN, "keygen", "--out", str(private), "--public-out", str(public)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    derived = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert public.read_text() == done.stdout == derived

    # An existing key is never overwritten: the run fails naming the flag, the key unchanged.
    before = private.read_bytes()
    again = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "--out" in again.stderr, again.stderr
    assert private.read_bytes() == before
