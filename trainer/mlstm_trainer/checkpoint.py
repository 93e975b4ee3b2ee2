"""Checkpoints in `step-{N}/` folders, written atomically, the newest K kept.

A checkpoint is written into a hidden temporary folder and renamed into place, so a process killed
mid-write never leaves a half-written `step-N` behind; the latest checkpoint is found by parsing
the folder names, so there is no pointer file to get out of step.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys of the saved state (one place, so writers and readers agree).
MODEL = "model"
OPTIMIZER = "optimizer"
SCALER = "scaler"
TRAINER = "trainer"  # {step, updates, tokens_seen, skipped, epoch}
DATA = "data"  # the streams' cursor
HIDDEN = "hidden"  # the per-row recurrent state (h, c)
RNG = "rng"
CONFIG = "config"


class CheckpointError(ValueError):
    """A checkpoint path does not hold a checkpoint; the message says what to pass instead."""


def should_save(step: int, every: int) -> bool:
    """True when a periodic checkpoint is due after `step` optimizer steps (every=0: never)."""
    return every > 0 and step > 0 and step % every == 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, its state file, or a run directory (then its latest checkpoint)."""
    target = Path(path)
    if target.is_file() and target.name == STATE_FILE:
        return target.parent
    if (target / STATE_FILE).is_file():
        return target
    latest = latest_checkpoint(target)
    if latest is None:
        raise CheckpointError(
            f"no checkpoint found at {path}; pass a run's checkpoint directory (e.g. runs/demo-...) or one of its step-N folders"
        )
    return latest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the saved state of a checkpoint (see `resolve_checkpoint` for what `path` may be)."""
    folder = resolve_checkpoint(path)
    return torch.load(folder / STATE_FILE, map_location=map_location, weights_only=False)


class Checkpointer:
    """Saves and finds checkpoints of one run in a local directory."""

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` as checkpoint `step` atomically, then prune old checkpoints."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / step_dir_name(step)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.directory))
        try:
            with open(staging / STATE_FILE, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self._prune()
        return final

    def _prune(self) -> None:
        for _, folder in list_checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(folder, ignore_errors=True)
