"""`mlstm data prepare`: turn text and JSON-lines files into a sharded dataset (local or S3/MinIO)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlstm_trainer.storage import ACCESS_KEY_ENV, ENDPOINT_ENV, SECRET_KEY_ENV, RetryPolicy, StorageError

from .errors import fail
from .prepare import (
    DEFAULT_TEXT_FIELD,
    PrepareError,
    PrepareOptions,
    find_inputs,
    format_report,
    open_output,
    parse_size,
    prepare_dataset,
)

app = typer.Typer(help="Prepared datasets: byte shards plus a manifest, in a local directory or S3/MinIO.",
                  no_args_is_help=True)


@app.command()
def prepare(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="INPUT", show_default=False,
        help="Text files (one document each), JSON-lines files (.json/.jsonl, one document per line), "
             "their .gz forms, or directories of them.")],
    out: Annotated[str, typer.Option("--out", help="Where the dataset goes: s3://bucket/prefix or a local directory.")],
    shard_bytes: Annotated[str, typer.Option(help="Target shard size: bytes, or with a suffix such as 64MiB.")] = "64MiB",
    val_shards: Annotated[int, typer.Option(help="Shards held out for validation.")] = 0,
    test_shards: Annotated[int, typer.Option(help="Shards held out for testing.")] = 0,
    text_field: Annotated[str, typer.Option(help="Field of a JSON-lines record that holds the document.")] = DEFAULT_TEXT_FIELD,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle that picks the val and test shards.")] = 0,
    s3_endpoint: Annotated[Optional[str], typer.Option(
        envvar=ENDPOINT_ENV, show_default=False, help="S3/MinIO URL, http://host:port or https://host:port.")] = None,
    access_key: Annotated[Optional[str], typer.Option(envvar=ACCESS_KEY_ENV, show_default=False, help="S3 access key.")] = None,
    secret_key: Annotated[Optional[str], typer.Option(envvar=SECRET_KEY_ENV, show_default=False, help="S3 secret key.")] = None,
    retry_seconds: Annotated[float, typer.Option(
        min=0.0, help="How long transient S3 errors (refused connections, timeouts, 5xx) are retried.")] = 120.0,
) -> None:
    """Pack documents into shards, upload them, and write manifest.json last.

    Each document becomes its bytes plus a 0x00 separator; documents never straddle shards.

    Re-running with the same inputs uploads nothing: stored shards with the same sha256 are kept.
    """
    environ = _s3_environ(s3_endpoint, access_key, secret_key)
    try:
        options = PrepareOptions(shard_bytes=parse_size(shard_bytes), val_shards=val_shards, test_shards=test_shards,
                                 text_field=text_field, seed=seed)
        find_inputs(inputs)  # a missing input fails before anything touches the store
        store = open_output(out, environ, RetryPolicy(max_seconds=retry_seconds))
        report = prepare_dataset(inputs, store, options, Console(stderr=True))
    except (PrepareError, StorageError) as err:
        raise fail(str(err)) from None
    except OSError as err:  # e.g. a local --out that cannot be written, or a full temporary disk
        raise fail(f"{err.filename or out}: {err.strerror or err}") from None
    typer.echo(format_report(report))


def _s3_environ(endpoint: str | None, access_key: str | None, secret_key: str | None) -> dict[str, str]:
    """os.environ with the S3 flags applied: the flags win, and the storage layer reads one mapping."""
    environ = dict(os.environ)
    for name, value in ((ENDPOINT_ENV, endpoint), (ACCESS_KEY_ENV, access_key), (SECRET_KEY_ENV, secret_key)):
        if value:
            environ[name] = value
    return environ


def register(root: typer.Typer) -> None:
    """Add `mlstm data ...` to the root app."""
    root.add_typer(app, name="data")
