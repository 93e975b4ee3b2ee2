"""Training bytes streamed from a prepared dataset's shards (local directory or S3/MinIO).

The split's shards are concatenated in manifest order into one virtual byte array that
`RowStreams` reads windows from. Shards are fetched whole, with ranged GETs, by a small thread
pool ahead of need (`prefetch`), verified against the manifest's sha256 once fully read, and
dropped once no row needs them any more. A rank's rows are adjacent, so it only ever holds the
few shards its own rows currently sit in.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .corpus import Corpus, CorpusError, holdout_split, load_corpus
from .shards import MANIFEST_NAME, DatasetManifest, ShardInfo, read_manifest
from .storage import ObjectStore, RetryPolicy, StorageError, is_s3_url, open_store


class ShardError(StorageError):
    """A shard does not match its manifest entry (size or checksum) or is missing."""


class ShardSource:
    """Random access to the concatenated shards of one split; see the module docstring."""

    def __init__(self, store: ObjectStore, manifest: DatasetManifest, split: str = "train", *,
                 workers: int = 4, chunk_bytes: int = 8 << 20) -> None:
        self.shards: tuple[ShardInfo, ...] = manifest.split(split)
        if not self.shards:
            raise CorpusError(f"dataset {store.url()} has no {split} shards; prepare it with at least one {split} shard")
        self.store = store
        self.name = f"{store.url()} ({split})"
        self.chunk_bytes = chunk_bytes
        self.offsets = np.cumsum([0, *(s.bytes for s in self.shards)]).astype(np.int64)
        self._resident: dict[int, Future[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-fetch")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def shards_for(self, starts: np.ndarray, length: int) -> set[int]:
        """Indices of the shards that the windows [start, start+length) touch."""
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        last = np.searchsorted(self.offsets, np.minimum(starts + length, len(self)) - 1, side="right") - 1
        return {int(i) for a, b in zip(first, last) for i in range(a, b + 1)}

    def prefetch(self, starts: np.ndarray, length: int) -> None:
        """Start fetching what these windows need; forget shards no window needs."""
        needed = self.shards_for(starts, length)
        with self._lock:
            for index in list(self._resident):
                if index not in needed:
                    self._resident.pop(index).cancel()
            for index in needed:
                self._submit(index)

    def window(self, starts: np.ndarray, length: int) -> np.ndarray:
        """uint8 [B, length] of bytes, blocking on whichever shards are still in flight."""
        needed = sorted(self.shards_for(starts, length))
        with self._lock:
            futures = {index: self._submit(index) for index in needed}
        arrays = {index: future.result() for index, future in futures.items()}  # re-raises fetch errors
        out = np.empty((len(starts), length), dtype=np.uint8)
        for row, start in enumerate(starts.tolist()):
            self._copy(arrays, int(start), out[row])
        return out

    def _copy(self, arrays: dict[int, np.ndarray], start: int, out: np.ndarray) -> None:
        """Fill `out` with bytes from `start`, crossing shard ends where the window does."""
        done = 0
        index = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while done < len(out):
            local = start + done - int(self.offsets[index])
            piece = arrays[index][local : local + len(out) - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            index += 1

    def _submit(self, index: int) -> Future[np.ndarray]:
        # Caller holds the lock. A failed fetch is not cached, so a later call retries it.
        future = self._resident.get(index)
        if future is None or future.cancelled() or (future.done() and future.exception() is not None):
            future = self._pool.submit(self._fetch, self.shards[index])
            self._resident[index] = future
        return future

    def _fetch(self, shard: ShardInfo) -> np.ndarray:
        """Read a whole shard with ranged GETs and check it against the manifest."""
        digest, parts, offset = hashlib.sha256(), [], 0
        while offset < shard.bytes:
            part = self.store.get(shard.name, offset=offset, length=min(self.chunk_bytes, shard.bytes - offset))
            if not part:
                break
            digest.update(part)
            parts.append(part)
            offset += len(part)
        where = self.store.url(shard.name)
        if offset != shard.bytes:
            raise ShardError(f"shard {where} has {offset} bytes, the manifest says {shard.bytes}; re-run `mlstm data prepare`")
        if digest.hexdigest() != shard.sha256:
            raise ShardError(
                f"shard {where} is corrupt: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                f"{shard.sha256[:12]}...; re-run `mlstm data prepare` to rewrite it"
            )
        return np.frombuffer(b"".join(parts), dtype=np.uint8)


def is_prepared_dataset(path: str) -> bool:
    """S3 URLs are always prepared datasets; a local directory is one when it has a manifest."""
    return is_s3_url(path) or (bool(path) and (Path(path) / MANIFEST_NAME).is_file())


def open_source(path: str, split: str = "train", *, val_fraction: float = 0.0, workers: int = 4,
                retry_seconds: float = 120.0, environ: Mapping[str, str] | None = None) -> Corpus | ShardSource | None:
    """The bytes of one split, or None when the data has no such split.

    A prepared dataset (S3 URL, or a directory with a manifest) has train/val/test shards. Plain
    text (a file, a directory, or "" for the embedded text) has train and, when `val_fraction` > 0,
    a held-out val made of its last documents; it has no test split.
    """
    if not is_prepared_dataset(path):
        if split == "test":
            return None
        train, val = holdout_split(load_corpus(path), val_fraction)
        return train if split == "train" else val
    store = open_store(path, environ=environ, retry=RetryPolicy(max_seconds=retry_seconds))
    manifest = read_manifest(store)
    if not manifest.split(split):
        return None
    return ShardSource(store, manifest, split, workers=workers)
