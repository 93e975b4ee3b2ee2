"""Tests for mlstm_trainer.storage without a server: LocalStore, RetryPolicy, S3 settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import urllib3
from minio.error import S3Error, ServerError

from mlstm_trainer.storage import (
    LocalStore,
    ObjectNotFound,
    RetryPolicy,
    S3Settings,
    S3Store,
    StorageError,
    is_transient,
    make_minio_client,
    open_store,
    s3_settings_from_env,
)


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} happened", "/bucket/key", "req", "host")


# --- LocalStore -------------------------------------------------------------------------------


def test_local_put_get_roundtrip_creates_parent_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put("a/b/object.bin", b"0123456789")
    assert store.get("a/b/object.bin") == b"0123456789"
    assert store.size("a/b/object.bin") == 10


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        pytest.param(0, None, b"0123456789", id="whole"),
        pytest.param(3, None, b"3456789", id="from-offset"),
        pytest.param(2, 4, b"2345", id="range"),
        pytest.param(8, 100, b"89", id="past-the-end"),
    ],
)
def test_local_ranged_get(tmp_path: Path, offset: int, length: int | None, expected: bytes) -> None:
    store = LocalStore(tmp_path)
    store.put("object", b"0123456789")
    assert store.get("object", offset, length) == expected


def test_local_put_file_copies_the_file(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3000))
    store = LocalStore(tmp_path / "root")
    store.put_file("copy.bin", source)
    assert store.get("copy.bin") == source.read_bytes()


def test_local_failed_put_keeps_the_old_object_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path)
    store.put("object", b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.put("object", b"new and longer")
    assert store.get("object") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["object"]


def test_local_list_is_sorted_filtered_and_hides_temporaries(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for name in ("shard-000001.bin", "shard-000000.bin", "manifest.json", "sub/shard-000002.bin"):
        store.put(name, b"x")
    (tmp_path / ".shard-000003.bin.tmp123").write_bytes(b"half")  # an interrupted write
    assert store.list() == ["manifest.json", "shard-000000.bin", "shard-000001.bin", "sub/shard-000002.bin"]
    assert store.list("shard-") == ["shard-000000.bin", "shard-000001.bin"]


def test_local_list_of_missing_root_is_empty(tmp_path: Path) -> None:
    assert LocalStore(tmp_path / "absent").list() == []


def test_local_delete_removes_and_tolerates_missing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("object", b"x")
    store.delete("object")
    store.delete("object")
    assert store.size("object") is None and store.list() == []


def test_local_missing_object_is_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ObjectNotFound, match="missing.bin does not exist"):
        store.get("missing.bin")
    assert store.size("missing.bin") is None


def test_open_store_picks_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    environ = {"MLSTM_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    store = open_store("s3://bucket/some/prefix/", environ)
    assert isinstance(store, S3Store)
    assert store.url("manifest.json") == "s3://bucket/some/prefix/manifest.json"


# --- RetryPolicy ------------------------------------------------------------------------------


class Flaky:
    """Fails with `error` `failures` times, then returns "done"."""

    def __init__(self, error: BaseException, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_retry_recovers_from_transient_errors_with_growing_capped_delays() -> None:
    sleeps: list[float] = []
    operation = Flaky(ConnectionRefusedError(111, "Connection refused"), failures=5)
    policy = RetryPolicy(max_seconds=1000, first_delay=1.0, max_delay=4.0)
    assert policy.run("reading s3://b/x", operation, sleep=sleeps.append) == "done"
    assert operation.calls == 6
    # Jitter draws each sleep from [delay/2, delay]; the delay doubles up to max_delay.
    for slept, delay in zip(sleeps, [1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert delay / 2 <= slept <= delay


def test_retry_gives_up_after_max_seconds_naming_the_object() -> None:
    sleeps: list[float] = []
    operation = Flaky(urllib3.exceptions.ProtocolError("Connection aborted."), failures=10**6)
    policy = RetryPolicy(max_seconds=1.0, first_delay=0.2, max_delay=10.0)
    with pytest.raises(StorageError, match=r"reading s3://b/shard-000001.bin failed after retrying for 1s: Connection aborted"):
        policy.run("reading s3://b/shard-000001.bin", operation, sleep=sleeps.append)
    # The next delay (1.6s) would pass the 1s budget: 3 sleeps, 4 attempts, bounded without real time passing.
    assert len(sleeps) == 3 and operation.calls == 4


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(s3_error("NoSuchKey"), id="no-such-key"),
        pytest.param(s3_error("AccessDenied"), id="access-denied"),
        pytest.param(ValueError("bad argument"), id="value-error"),
    ],
)
def test_retry_raises_non_transient_errors_at_once(error: BaseException) -> None:
    sleeps: list[float] = []
    operation = Flaky(error, failures=1)
    with pytest.raises(type(error)):
        RetryPolicy().run("reading s3://b/x", operation, sleep=sleeps.append)
    assert operation.calls == 1 and sleeps == []


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        pytest.param(ConnectionRefusedError(), True, id="refused"),
        pytest.param(TimeoutError(), True, id="timeout"),
        pytest.param(urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"), True, id="urllib3-timeout"),
        pytest.param(ServerError("bad gateway", 502), True, id="5xx"),
        pytest.param(ServerError("client", 404), False, id="4xx-server-error"),
        pytest.param(s3_error("SlowDown"), True, id="slow-down"),
        pytest.param(s3_error("InternalError"), True, id="internal-error"),
        pytest.param(s3_error("NoSuchBucket"), False, id="no-such-bucket"),
        pytest.param(KeyError("x"), False, id="bug"),
    ],
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


# --- S3 settings ------------------------------------------------------------------------------


def test_s3_settings_need_an_endpoint() -> None:
    with pytest.raises(StorageError, match="MLSTM_S3_ENDPOINT is not set"):
        s3_settings_from_env({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})


def test_s3_settings_name_the_missing_keys() -> None:
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY not set"):
        s3_settings_from_env({"MLSTM_S3_ENDPOINT": "http://127.0.0.1:9000"})


def test_s3_settings_read_region_and_hide_keys() -> None:
    settings = s3_settings_from_env({"MLSTM_S3_ENDPOINT": "https://minio:9000", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
                                     "AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_REGION": "eu-west-1"})
    assert (settings.endpoint, settings.region) == ("https://minio:9000", "eu-west-1")
    assert "hunter2" not in repr(settings) and "AKIDEXAMPLE" not in repr(settings)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "ftp://host:21", "http://"])
def test_endpoint_must_be_an_http_url(endpoint: str) -> None:
    with pytest.raises(StorageError, match="is not a URL; use http://host:port"):
        make_minio_client(S3Settings(endpoint=endpoint, access_key="k", secret_key="s"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("s3://", "names no bucket", id="no-bucket"),
        pytest.param("s3://a..b/prefix", "invalid successive characters", id="bad-bucket-name"),
    ],
)
def test_s3_store_rejects_bad_urls(url: str, message: str) -> None:
    settings = S3Settings(endpoint="http://127.0.0.1:9", access_key="k", secret_key="s")
    with pytest.raises(StorageError, match=message):
        S3Store(url, settings)
