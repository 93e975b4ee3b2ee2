"""S3Store against a real S3-protocol server: moto on loopback, and an opt-in real MinIO."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from mlstm_trainer.storage import ObjectNotFound, RetryPolicy, S3Store, StorageError, open_store


def store_for(env: dict[str, str], prefix: str = "data/set", **kwargs) -> S3Store:
    store = open_store(f"s3://{env['bucket']}/{prefix}", env, **kwargs)
    assert isinstance(store, S3Store)
    return store


def exercise(store: S3Store, tmp_path: Path) -> None:
    """put/get (ranged)/size/list/put_file/delete: the operations datasets and checkpoints use."""
    payload = os.urandom(100_000)
    store.put("shard-000000.bin", payload)
    assert store.get("shard-000000.bin") == payload
    assert store.get("shard-000000.bin", 1000, 500) == payload[1000:1500]
    assert store.get("shard-000000.bin", 99_990) == payload[99_990:]
    assert store.size("shard-000000.bin") == len(payload)

    source = tmp_path / "file.bin"
    source.write_bytes(b"from a file")
    store.put_file("sub/file.bin", source)
    store.put("manifest.json", b"{}")
    assert store.list() == ["manifest.json", "shard-000000.bin", "sub/file.bin"]
    assert store.list("shard-") == ["shard-000000.bin"]

    store.delete("shard-000000.bin")
    assert store.size("shard-000000.bin") is None
    assert store.list() == ["manifest.json", "sub/file.bin"]


def test_s3_store_operations(s3_env: dict[str, str], tmp_path: Path) -> None:
    exercise(store_for(s3_env), tmp_path)


def test_s3_store_without_prefix(s3_env: dict[str, str]) -> None:
    store = store_for(s3_env, prefix="")
    store.put("top.bin", b"abc")
    assert store.url("top.bin") == f"s3://{s3_env['bucket']}/top.bin"
    assert store.list() == ["top.bin"] and store.get("top.bin", 1) == b"bc"


def test_prefixes_do_not_see_each_other(s3_env: dict[str, str]) -> None:
    store_for(s3_env, prefix="one").put("x", b"1")
    store_for(s3_env, prefix="one-two").put("y", b"2")
    assert store_for(s3_env, prefix="one").list() == ["x"]


def test_missing_object_is_named(s3_env: dict[str, str]) -> None:
    store = store_for(s3_env)
    with pytest.raises(ObjectNotFound, match=rf"reading s3://{s3_env['bucket']}/data/set/absent.bin: NoSuchKey"):
        store.get("absent.bin")


def test_missing_bucket_is_not_found_and_can_be_created(s3_env: dict[str, str]) -> None:
    env = {**s3_env, "bucket": f"mlstm-new-{uuid.uuid4().hex[:12]}"}
    store = store_for(env)
    with pytest.raises(ObjectNotFound, match="NoSuchBucket"):
        store.get("x")
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    store.put("x", b"1")
    assert store.get("x") == b"1"


def test_s3_environ_sets_os_environ(s3_environ: dict[str, str]) -> None:
    store = open_store(f"s3://{s3_environ['bucket']}/p")  # no environ: read from os.environ
    store.put("x", b"1")
    assert store.list() == ["x"]


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_fails_after_bounded_retry(s3_env: dict[str, str]) -> None:
    env = {**s3_env, "MLSTM_S3_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    store = store_for(env, retry=RetryPolicy(max_seconds=1.0, first_delay=0.05))
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"reading s3://.*/data/set/shard-000007.bin failed after retrying.*refused"):
        store.get("shard-000007.bin")
    assert time.monotonic() - started < 5  # bounded by max_seconds, not urllib3's own retries


def test_real_minio(real_s3_env: dict[str, str], tmp_path: Path) -> None:
    """Opt-in: MLSTM_TEST_S3_ENDPOINT=http://127.0.0.1:9000 (keys MLSTM_TEST_S3_ACCESS_KEY/SECRET_KEY)."""
    exercise(store_for(real_s3_env), tmp_path)
