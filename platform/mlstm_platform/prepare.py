"""Write a prepared dataset: documents packed into byte shards, uploaded, then `manifest.json`.

The format is `mlstm_trainer.shards`: each document is its bytes plus one separator byte; shards
hold whole documents (a document larger than `shard_bytes` gets a shard of its own) and are named
`shard-NNNNNN.bin` in input order. Splits are assigned once every shard is known, by a seeded
shuffle of the shard indices, so they are deterministic given the inputs, the shard size and the
seed; train shards keep input order in the manifest.

Memory stays bounded: one shard is built at a time in a temporary file, hashed as it is written.

Idempotent re-runs: before uploading a shard, an existing object of the same name and size is
re-hashed (ranged reads) and the upload is skipped when its sha256 matches. Re-hashing, rather
than trusting a checksum kept beside the object, costs a read per unchanged shard but believes
only the bytes actually stored. An existing manifest is deleted just before the first upload
that changes anything, so a reader never pairs an old manifest with new shards; the new manifest
is written last, then shards a previous run left beyond the new count are deleted.
"""

from __future__ import annotations

import hashlib
import random
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from mlstm_trainer.corpus import DOC_SEPARATOR
from mlstm_trainer.shards import MANIFEST_NAME, SPLITS, DatasetManifest, ShardInfo
from mlstm_trainer.storage import LocalStore, ObjectStore, RetryPolicy, S3Store, StorageError, is_s3_url, open_store

from .prepare_inputs import Document, InputFile, PrepareError, SpooledDocument, document_size, find_inputs, read_documents

DEFAULT_SHARD_BYTES = 64 << 20
DEFAULT_TEXT_FIELD = "reviewText"
HASH_CHUNK = 8 << 20
WRITE_BUFFER = 1 << 20
"""Small documents are batched up to this size before they are hashed and written: per-review calls are slow."""
SHARD_NAME_RE = re.compile(r"shard-\d{6}\.bin")
_SIZE_RE = re.compile(r"(\d+)\s*(|k|m|g|t)(?:i?b)?", re.IGNORECASE)
_SEPARATOR = bytes([DOC_SEPARATOR])


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.bin"


def parse_size(text: str) -> int:
    """Bytes from `67108864`, `64M`, `64MiB` or `1g` (binary multiples: k = 1024)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match or int(match.group(1)) < 1:
        raise PrepareError(f"--shard-bytes {text!r} is not a positive size; use bytes or e.g. 64MiB")
    return int(match.group(1)) << (10 * " kmgt".index(match.group(2).lower() or " "))


@dataclass(frozen=True, kw_only=True, slots=True)
class PrepareOptions:
    """How documents become shards and splits."""

    shard_bytes: int = DEFAULT_SHARD_BYTES
    """Target shard size in bytes; shards end at a document boundary at or below it."""
    val_shards: int = 0
    """Shards held out for validation."""
    test_shards: int = 0
    """Shards held out for testing."""
    text_field: str = DEFAULT_TEXT_FIELD
    """The field of a JSON-lines record that holds its document."""
    seed: int = 0
    """Seed of the shuffle that picks the val and test shards."""

    def __post_init__(self) -> None:
        for flag, value, low in (("--shard-bytes", self.shard_bytes, 1), ("--val-shards", self.val_shards, 0),
                                 ("--test-shards", self.test_shards, 0)):
            if value < low:
                raise PrepareError(f"{flag} must be >= {low}, got {value}")
        if not self.text_field:
            raise PrepareError("--text-field must not be empty")


@dataclass(frozen=True, slots=True)
class PackedShard:
    """A finished shard in a local temporary file."""

    path: Path
    bytes: int
    documents: int
    sha256: str


class ShardFile:
    """The shard being filled: a temporary file hashed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] = open(path, "wb")
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self.bytes = 0
        self.documents = 0

    def add(self, doc: Document) -> None:
        if isinstance(doc, SpooledDocument):
            for chunk in doc.chunks():
                self._buffer += chunk
                self._flush()
        else:
            self._buffer += doc
        self._buffer += _SEPARATOR
        self.bytes += document_size(doc) + 1
        self.documents += 1
        if len(self._buffer) >= WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        self._hash.update(self._buffer)
        self._file.write(self._buffer)
        self._buffer.clear()

    def finish(self) -> PackedShard:
        self._flush()
        self._file.close()
        return PackedShard(path=self.path, bytes=self.bytes, documents=self.documents, sha256=self._hash.hexdigest())


class ShardPacker:
    """Packs documents into shards of about `shard_bytes` and hands each finished one to `emit`."""

    def __init__(self, shard_bytes: int, workdir: Path, emit: Callable[[int, PackedShard], None]) -> None:
        self.shard_bytes = shard_bytes
        self.workdir = workdir
        self.emit = emit
        self.count = 0
        self._current: ShardFile | None = None

    def add(self, doc: Document) -> None:
        size = document_size(doc) + 1
        if self._current is not None and self._current.bytes + size > self.shard_bytes:
            self._finish()  # the document would straddle: it starts the next shard instead
        if self._current is None:
            self._current = ShardFile(self.workdir / f"{shard_name(self.count)}.part")
        self._current.add(doc)
        if self._current.bytes >= self.shard_bytes:  # full, or one oversized document alone
            self._finish()

    def close(self) -> None:
        if self._current is not None:
            self._finish()

    def _finish(self) -> None:
        assert self._current is not None
        packed = self._current.finish()
        self._current = None
        self.emit(self.count, packed)
        self.count += 1


def object_sha256(store: ObjectStore, name: str, size: int) -> str:
    """sha256 of a stored object, read in ranged chunks so a large shard never sits in memory."""
    digest = hashlib.sha256()
    for offset in range(0, size, HASH_CHUNK):
        digest.update(store.get(name, offset, min(HASH_CHUNK, size - offset)))
    return digest.hexdigest()


class ShardUploader:
    """Uploads finished shards, skipping those already stored with the same bytes (see module docstring)."""

    def __init__(self, store: ObjectStore, progress: "ProgressBars") -> None:
        self.store = store
        self.progress = progress
        self.shards: list[PackedShard] = []
        self.uploaded = 0
        self.unchanged = 0
        self._manifest_dropped = False

    def __call__(self, index: int, packed: PackedShard) -> None:
        name = shard_name(index)
        self.progress.packed(packed.bytes)
        try:
            if self._is_stored(name, packed):
                self.unchanged += 1
            else:
                self._drop_old_manifest()
                self.store.put_file(name, packed.path)
                self.uploaded += 1
        finally:
            packed.path.unlink(missing_ok=True)
        self.shards.append(packed)
        self.progress.uploaded(packed.bytes)

    def _is_stored(self, name: str, packed: PackedShard) -> bool:
        # The size check is one HEAD; only a same-sized object is worth reading back.
        return self.store.size(name) == packed.bytes and object_sha256(self.store, name, packed.bytes) == packed.sha256

    def _drop_old_manifest(self) -> None:
        # A previous run's manifest must not outlive the shards it describes being overwritten.
        if not self._manifest_dropped:
            self.store.delete(MANIFEST_NAME)
            self._manifest_dropped = True


def assign_splits(count: int, options: PrepareOptions) -> list[str]:
    """The split of each shard index: a seeded shuffle picks val, then test; the rest train."""
    needed = options.val_shards + options.test_shards + 1
    if count < needed:
        raise PrepareError(
            f"the inputs fill {count} shard(s) of up to {options.shard_bytes} bytes, but --val-shards "
            f"{options.val_shards} and --test-shards {options.test_shards} need at least {needed} "
            "(one for train); lower --shard-bytes"
        )
    order = list(range(count))
    random.Random(options.seed).shuffle(order)
    splits = ["train"] * count
    for index in order[: options.val_shards]:
        splits[index] = "val"
    for index in order[options.val_shards : needed - 1]:
        splits[index] = "test"
    return splits


@dataclass(frozen=True, slots=True)
class SplitStats:
    shards: int
    bytes: int
    documents: int


@dataclass(frozen=True, slots=True)
class PrepareReport:
    """What a prepare run wrote; `per_split()` is what the CLI reports."""

    url: str
    manifest: DatasetManifest
    uploaded: int
    """Shards written by this run."""
    unchanged: int
    """Shards already stored with the same bytes, so not uploaded again."""
    empty_documents: int
    """Empty documents skipped (an empty file, an empty text field)."""
    stale_removed: int
    """Shards of an earlier, larger run at this URL that were deleted."""

    def per_split(self) -> dict[str, SplitStats]:
        return {split: SplitStats(shards=len(shards), bytes=sum(s.bytes for s in shards),
                                  documents=sum(s.documents for s in shards))
                for split in SPLITS for shards in [self.manifest.split(split)]}


@dataclass
class ProgressBars:
    """Reading and uploading bars on stderr; rich turns them off when stderr is not a terminal."""

    input_bytes: int
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _progress: Progress = field(init=False)
    _upload_total: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        columns = (TextColumn("{task.description:<9}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        self._progress = Progress(*columns, console=self.console, 
                                  disable=self.console.quiet or not self.console.is_terminal)
        self._read = self._progress.add_task("reading", total=self.input_bytes)
        # Upload's total grows as shards are packed: the shard count is only known at the end.
        self._upload = self._progress.add_task("uploading", total=0)
        self._upload_total = 0

    def __enter__(self) -> "ProgressBars":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def read(self, n: int) -> None:
        self._progress.advance(self._read, n)

    def packed(self, n: int) -> None:
        self._upload_total += n
        self._progress.update(self._upload, total=self._upload_total)

    def uploaded(self, n: int) -> None:
        self._progress.advance(self._upload, n)


def open_output(url: str, environ: Mapping[str, str] | None = None, retry: RetryPolicy | None = None) -> ObjectStore:
    """The store `--out` names, checked before any input is read: the bucket exists (it is created
    if missing) and the credentials work, or the local path is not a file."""
    if "://" in url and not is_s3_url(url):
        raise PrepareError(f"--out {url!r}: unsupported URL scheme; use s3://bucket/prefix or a local directory")
    store = open_store(url, environ, retry)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    elif isinstance(store, LocalStore) and store.root.exists() and not store.root.is_dir():
        raise PrepareError(f"--out {url} is a file; name a directory (it is created if missing)")
    return store


def prepare_dataset(inputs: Sequence[Path], store: ObjectStore, options: PrepareOptions,
                    console: Console | None = None) -> PrepareReport:
    """Read `inputs`, upload their shards to `store`, write the manifest last; see the module docstring.

    Progress bars go to `console` when it is a terminal (none by default).
    Raises PrepareError for bad input (naming the file, and line for JSON) and StorageError when the
    store fails; either way no manifest is written.
    """
    sources = find_inputs(inputs)
    progress = ProgressBars(sum(s.path.stat().st_size for s in sources), console or Console(quiet=True))
    uploader = ShardUploader(store, progress)
    with progress, tempfile.TemporaryDirectory(prefix="mlstm-prepare-") as workdir:
        packer = ShardPacker(options.shard_bytes, Path(workdir), uploader)
        empty = _pack_inputs(sources, options.text_field, packer, progress)
        packer.close()
    if not uploader.shards:
        raise PrepareError(f"the inputs hold no documents ({empty} empty); nothing to prepare")
    splits = assign_splits(len(uploader.shards), options)
    manifest = DatasetManifest(seed=options.seed, shards=tuple(
        ShardInfo(name=shard_name(i), split=split, bytes=p.bytes, documents=p.documents, sha256=p.sha256)
        for i, (p, split) in enumerate(zip(uploader.shards, splits))))
    store.put(MANIFEST_NAME, manifest.to_json().encode("utf-8"))  # last: it marks the dataset complete
    return PrepareReport(url=store.url(), manifest=manifest, uploaded=uploader.uploaded, unchanged=uploader.unchanged,
                         empty_documents=empty, stale_removed=_remove_stale_shards(store, len(uploader.shards)))


def _pack_inputs(sources: Sequence[InputFile], text_field: str, packer: ShardPacker, progress: ProgressBars) -> int:
    """Feed every non-empty document to `packer`; returns how many empty ones were skipped."""
    empty = 0
    for source in sources:
        for doc in read_documents(source, text_field, progress.read):
            try:
                if document_size(doc) == 0:
                    empty += 1
                else:
                    packer.add(doc)
            finally:
                if isinstance(doc, SpooledDocument):
                    doc.close()
    return empty


def _remove_stale_shards(store: ObjectStore, count: int) -> int:
    """Delete `shard-NNNNNN.bin` objects beyond `count` (left by an earlier run); the new manifest is in place."""
    keep = {shard_name(i) for i in range(count)}
    stale = [n for n in store.list("shard-") if SHARD_NAME_RE.fullmatch(n) and n not in keep]
    for name in stale:
        store.delete(name)
    return len(stale)


def format_report(report: PrepareReport) -> str:
    """Lines the CLI prints: totals per split, then what was uploaded."""
    lines = [f"prepared {report.url} (seed {report.manifest.seed})",
             f"  {'split':<5} {'shards':>8} {'bytes':>17} {'documents':>13}"]
    for split, stats in report.per_split().items():
        lines.append(f"  {split:<5} {stats.shards:>8,} {stats.bytes:>17,} {stats.documents:>13,}")
    lines.append(f"uploaded {report.uploaded} shards, {report.unchanged} unchanged (already stored)")
    if report.empty_documents:
        lines.append(f"skipped {report.empty_documents} empty documents")
    if report.stale_removed:
        lines.append(f"removed {report.stale_removed} stale shards left by an earlier run")
    return "\n".join(lines)
