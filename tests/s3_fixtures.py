"""S3 test fixtures: moto's S3 server on a free loopback port, a fresh bucket per test, and an opt-in
real MinIO.

`s3_env` is a dict for subprocesses and `open_store(url, environ=...)`; `s3_environ` puts the same
variables into os.environ for code that reads them from there. `real_s3_env` runs against the
server named by MLSTM_TEST_S3_ENDPOINT and skips the test when it is unset.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

from mlstm_trainer.storage import (
    ACCESS_KEY_ENV,
    ENDPOINT_ENV,
    REGION_ENV,
    SECRET_KEY_ENV,
    S3Settings,
    make_minio_client,
)

REAL_ENDPOINT_ENV = "MLSTM_TEST_S3_ENDPOINT"
REAL_ACCESS_KEY_ENV = "MLSTM_TEST_S3_ACCESS_KEY"
REAL_SECRET_KEY_ENV = "MLSTM_TEST_S3_SECRET_KEY"
TEST_REGION = "us-east-1"


def s3_vars(endpoint: str, access_key: str = "testing", secret_key: str = "testing") -> dict[str, str]:
    """The environment variables the storage layer reads to reach `endpoint`."""
    return {ENDPOINT_ENV: endpoint, ACCESS_KEY_ENV: access_key, SECRET_KEY_ENV: secret_key, REGION_ENV: TEST_REGION}


def _settings(environ: dict[str, str]) -> S3Settings:
    return S3Settings(endpoint=environ[ENDPOINT_ENV], access_key=environ[ACCESS_KEY_ENV],
                      secret_key=environ[SECRET_KEY_ENV], region=environ[REGION_ENV])


def make_bucket(environ: dict[str, str]) -> str:
    """Create a uniquely named bucket on the server `environ` names; returns its name."""
    bucket = f"mlstm-test-{uuid.uuid4().hex[:16]}"
    make_minio_client(_settings(environ)).make_bucket(bucket)
    return bucket


def remove_bucket(environ: dict[str, str], bucket: str) -> None:
    """Delete every object in `bucket`, then the bucket."""
    client = make_minio_client(_settings(environ))
    for item in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, item.object_name)
    client.remove_bucket(bucket)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port, for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; failures would drown in them.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str) -> dict[str, str]:
    """S3 variables for the moto server plus "bucket": a fresh, empty bucket for this test."""
    # moto keeps buckets in memory for the session; a unique name per test is isolation enough.
    environ = s3_vars(s3_server)
    return {**environ, "bucket": make_bucket(environ)}


@pytest.fixture
def s3_environ(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Like `s3_env`, with the variables also set in os.environ for the duration of the test."""
    for name, value in s3_env.items():
        if name != "bucket":
            monkeypatch.setenv(name, value)
    return s3_env


@pytest.fixture
def real_s3_env() -> Iterator[dict[str, str]]:
    """A real S3/MinIO named by MLSTM_TEST_S3_ENDPOINT (keys default to minioadmin), with a fresh bucket
    that is emptied and removed afterwards (a real server keeps what tests leave)."""
    endpoint = os.environ.get(REAL_ENDPOINT_ENV)
    if not endpoint:
        pytest.skip(f"{REAL_ENDPOINT_ENV} is not set; set it (e.g. http://127.0.0.1:9000) to test against a real MinIO")
    environ = s3_vars(endpoint, os.environ.get(REAL_ACCESS_KEY_ENV, "minioadmin"),
                      os.environ.get(REAL_SECRET_KEY_ENV, "minioadmin"))
    bucket = make_bucket(environ)
    yield {**environ, "bucket": bucket}
    remove_bucket(environ, bucket)
