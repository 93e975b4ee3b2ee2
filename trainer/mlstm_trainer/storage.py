"""Object storage behind one small interface: a local directory or an S3/MinIO bucket prefix.

Datasets and checkpoints are named by URL: `s3://bucket/prefix` goes to S3 through the `minio`
client (endpoint from MLSTM_S3_ENDPOINT, keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), any
other string is a local directory. Writes are atomic in both: a reader sees a whole object or none.
Transient S3 failures (connection refused, timeouts, 5xx) are retried with exponential backoff for
a bounded time, then reported in one line naming the object.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

T = TypeVar("T")
ENDPOINT_ENV = "MLSTM_S3_ENDPOINT"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
REGION_ENV = "AWS_REGION"


class StorageError(RuntimeError):
    """An object could not be read or written; the message names it and what went wrong."""


class ObjectNotFound(StorageError):
    """The named object does not exist."""


class ObjectStore(Protocol):
    """The operations datasets and checkpoints need; names are relative to the store's root."""

    def url(self, name: str = "") -> str: ...
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...
    def put(self, name: str, data: bytes) -> None: ...
    def put_file(self, name: str, path: Path) -> None: ...
    def size(self, name: str) -> int | None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, name: str) -> None: ...


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


@dataclass(frozen=True, slots=True)
class S3Settings:
    """How to reach the S3 service; never logged (the keys are secrets)."""

    endpoint: str
    """`http://host:port` or `https://host:port`."""
    access_key: str
    secret_key: str
    region: str | None = None

    def __repr__(self) -> str:  # keep keys out of tracebacks and logs
        return f"S3Settings(endpoint={self.endpoint!r})"


def s3_settings_from_env(environ: Mapping[str, str] | None = None) -> S3Settings:
    environ = os.environ if environ is None else environ
    endpoint = environ.get(ENDPOINT_ENV, "")
    if not endpoint:
        raise StorageError(f"{ENDPOINT_ENV} is not set; set it to the S3/MinIO URL, e.g. http://127.0.0.1:9000")
    missing = [name for name in (ACCESS_KEY_ENV, SECRET_KEY_ENV) if not environ.get(name)]
    if missing:
        raise StorageError(f"{' and '.join(missing)} not set; export the S3 access key pair to reach {endpoint}")
    return S3Settings(endpoint=endpoint, access_key=environ[ACCESS_KEY_ENV], secret_key=environ[SECRET_KEY_ENV],
                      region=environ.get(REGION_ENV) or None)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff (with jitter) for transient failures, bounded by total time."""

    max_seconds: float = 120.0
    first_delay: float = 0.2
    max_delay: float = 10.0

    def run(self, what: str, operation: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        deadline = time.monotonic() + self.max_seconds
        delay = self.first_delay
        while True:
            try:
                return operation()
            except Exception as err:  # noqa: BLE001 - classified right below
                if not is_transient(err):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"{what} failed after retrying for {self.max_seconds:.0f}s: {describe(err)}") from None
                sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.max_delay)


def is_transient(err: BaseException) -> bool:
    """Connection problems, timeouts and server-side (5xx) errors are worth retrying."""
    if isinstance(err, ServerError):
        return err.status_code >= 500
    if isinstance(err, S3Error):
        return err.code in ("InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout")
    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, InvalidResponseError))


def describe(err: BaseException) -> str:
    """One line for an exception, without urllib3's nested reprs."""
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        err = err.reason
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) < 200 else text[:197] + "..."


class LocalStore:
    """A directory; writes go to a temporary file first and are renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def url(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self.root / name, "rb") as handle:
                handle.seek(offset)
                return handle.read() if length is None else handle.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url(name)} does not exist") from None

    def put(self, name: str, data: bytes) -> None:
        self._atomic_write(name, lambda handle: handle.write(data))

    def put_file(self, name: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._atomic_write(name, lambda handle: _copy(source, handle))

    def _atomic_write(self, name: str, write: Callable) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, name: str) -> int | None:
        path = self.root / name
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if n.startswith(prefix) and not Path(n).name.startswith("."))

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


def _copy(source, target) -> None:
    while chunk := source.read(8 << 20):
        target.write(chunk)


class S3Store:
    """A bucket prefix on S3/MinIO. Single PUTs are atomic, so no temporary names are needed."""

    def __init__(self, url: str, settings: S3Settings, retry: RetryPolicy | None = None) -> None:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise StorageError(f"{url} names no bucket; use s3://bucket/prefix")
        try:
            check_bucket_name(parsed.netloc)
        except ValueError as err:  # minio raises it from every call; say it once, up front
            raise StorageError(f"{url}: {err}") from None
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.retry = retry or RetryPolicy()
        self.client = make_minio_client(settings)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(name)}".rstrip("/")

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, self._key(name), offset=offset, length=length or 0)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"reading {self.url(name)}", read)

    def put(self, name: str, data: bytes) -> None:
        import io

        self._call(f"writing {self.url(name)}",
                   lambda: self.client.put_object(self.bucket, self._key(name), io.BytesIO(data), len(data)))

    def put_file(self, name: str, path: Path) -> None:
        self._call(f"writing {self.url(name)}", lambda: self.client.fput_object(self.bucket, self._key(name), str(path)))

    def size(self, name: str) -> int | None:
        try:
            return self._call(f"checking {self.url(name)}", lambda: self.client.stat_object(self.bucket, self._key(name)).size)
        except ObjectNotFound:
            return None

    def list(self, prefix: str = "") -> list[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        objects = self._call(
            f"listing {self.url(prefix)}",
            lambda: list(self.client.list_objects(self.bucket, prefix=self._key(prefix), recursive=True)),
        )
        return sorted(o.object_name[start:] for o in objects)

    def delete(self, name: str) -> None:
        self._call(f"deleting {self.url(name)}", lambda: self.client.remove_object(self.bucket, self._key(name)))

    def ensure_bucket(self) -> None:
        if not self._call(f"checking bucket {self.bucket}", lambda: self.client.bucket_exists(self.bucket)):
            self._call(f"creating bucket {self.bucket}", lambda: self.client.make_bucket(self.bucket))

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return self.retry.run(what, operation)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(f"{what}: {err.code} ({self.url()})") from None
            if err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"{what}: {err.code}; check {ACCESS_KEY_ENV}/{SECRET_KEY_ENV}") from None
            raise StorageError(f"{what}: {err.code}: {err.message}") from None


def make_minio_client(settings: S3Settings) -> Minio:
    parsed = urlparse(settings.endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"{ENDPOINT_ENV}={settings.endpoint!r} is not a URL; use http://host:port or https://host:port")
    # Our own RetryPolicy bounds the total time; urllib3 must not retry underneath it.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60), maxsize=16,
        retries=urllib3.Retry(total=0, connect=0, read=0, redirect=3, status=0, raise_on_status=False),
    )
    return Minio(parsed.netloc, access_key=settings.access_key, secret_key=settings.secret_key,
                 secure=parsed.scheme == "https", region=settings.region, http_client=http)


def open_store(url: str, environ: Mapping[str, str] | None = None, retry: RetryPolicy | None = None) -> ObjectStore:
    """The store a URL names: `s3://bucket/prefix` or a local directory path."""
    if is_s3_url(url):
        return S3Store(url, s3_settings_from_env(environ), retry)
    return LocalStore(url)
