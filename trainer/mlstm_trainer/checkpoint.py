"""Checkpoints as `step-{N}/state.pt` objects plus a `latest` pointer, locally or on S3/MinIO.

Each state object is written atomically (a local temporary file renamed into place; a single S3
PUT), and only then is `latest` updated, so a process killed or an S3 server lost mid-write never
leaves a partial checkpoint as the one to resume from. Without a pointer (e.g. it was deleted) the
newest complete `step-N` found by listing is used. The newest K checkpoints are kept.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .storage import ObjectNotFound, ObjectStore, is_s3_url, open_store

STATE_FILE = "state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys of the saved state (one place, so writers and readers agree).
MODEL = "model"
OPTIMIZER = "optimizer"
SCALER = "scaler"
TRAINER = "trainer"  # {step, updates, tokens_seen, skipped}
DATA = "data"  # the streams' cursor, one per rank
HIDDEN = "hidden"  # the per-row recurrent state (h, c), one per rank
RNG = "rng"
CONFIG = "config"


class CheckpointError(ValueError):
    """A checkpoint path does not hold a checkpoint; the message says what to pass instead."""


def should_save(step: int, every: int) -> bool:
    """True when a periodic checkpoint is due after `step` optimizer steps (every=0: never)."""
    return every > 0 and step > 0 and step % every == 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(store: ObjectStore) -> list[tuple[int, str]]:
    """(step, folder name) of every complete checkpoint in `store`, oldest first."""
    found = []
    for name in store.list():
        folder, _, leaf = name.rpartition("/")
        match = _STEP_DIR.match(folder)
        if match and leaf == STATE_FILE:
            found.append((int(match.group(1)), folder))
    return sorted(found)


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run (a directory or an S3 prefix)."""

    def __init__(self, url: str, keep: int = 3, store: ObjectStore | None = None) -> None:
        self.url = url
        self.keep = keep
        self.store = store if store is not None else open_store(url)

    def latest(self) -> str | None:
        """Folder name of the checkpoint to resume from, or None when there is none."""
        try:
            pointed = self.store.get(LATEST).decode().strip()
        except ObjectNotFound:
            pointed = ""
        if pointed and self.store.size(f"{pointed}/{STATE_FILE}") is not None:
            return pointed
        found = list_checkpoints(self.store)
        return found[-1][1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Write `state` as checkpoint `step`, then point `latest` at it, then prune old ones."""
        folder = step_dir_name(step)
        # Serialise to local disk first: a multi-GB state should not sit in memory twice.
        with tempfile.TemporaryDirectory(prefix="mlstm-ckpt-") as tmp:
            local = Path(tmp) / STATE_FILE
            torch.save(state, local)
            self.store.put_file(f"{folder}/{STATE_FILE}", local)
        self.store.put(LATEST, folder.encode())
        self._prune()
        return self.store.url(folder)

    def load(self, folder: str | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        folder = folder or self.latest()
        if folder is None:
            raise CheckpointError(f"no checkpoint found at {self.url}")
        data = self.store.get(f"{folder}/{STATE_FILE}")
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)

    def _prune(self) -> None:
        for _, folder in list_checkpoints(self.store)[: -self.keep]:
            self.store.delete(f"{folder}/{STATE_FILE}")
            if not is_s3_url(self.url):  # S3 has no folders; a local one is left empty
                (Path(self.url) / folder).rmdir()


def split_checkpoint_path(path: str) -> tuple[str, str | None]:
    """(run URL, step folder or None) for a run directory, a step-N folder or its state file."""
    trimmed = path.rstrip("/")
    if trimmed.endswith("/" + STATE_FILE):
        trimmed = trimmed[: -len(STATE_FILE) - 1]
    parent, _, leaf = trimmed.rpartition("/")
    if _STEP_DIR.match(leaf):
        return parent or ".", leaf
    return trimmed, None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint given as a run directory/URL (its latest), a step-N folder or its state file."""
    run, folder = split_checkpoint_path(str(path))
    checkpointer = Checkpointer(run)
    if folder is None:
        folder = checkpointer.latest()
    if folder is None or checkpointer.store.size(f"{folder}/{STATE_FILE}") is None:
        raise CheckpointError(
            f"no checkpoint found at {path}; pass a run's checkpoint directory (e.g. runs/demo-...) or one of its step-N folders"
        )
    return checkpointer.load(folder, map_location=map_location)
