"""Contiguous per-row byte streams with reset masks (the layout of the mLSTM paper's code).

Each of the G global rows of a batch is its own contiguous stream through the corpus:
row g reads bytes ``[g*L//G, (g+1)*L//G)``. Every step advances each row by ``seq_len``,
so an RNN can carry its hidden state from one step to the next. Rank r of W owns the
global rows ``[r*G//W, (r+1)*G//W)``; ranks advance in lockstep, so they agree on data
without communicating and a state saved by any rank restores every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mlstm_trainer.corpus import DOC_SEPARATOR, CorpusError


class ByteSource(Protocol):
    """Random access to the concatenated training bytes (an in-memory Corpus or S3 shards)."""

    name: str

    def __len__(self) -> int: ...

    def window(self, starts: np.ndarray, length: int) -> np.ndarray:
        """uint8 [B, length]: bytes [start, start+length) for each start."""

    def prefetch(self, starts: np.ndarray, length: int) -> None:
        """Hint: these windows will be read soon (sources that fetch over the network start now)."""

_STATE_KEYS = ("epoch", "step_in_epoch", "positions", "global_rows", "world_size", "rank", "corpus_bytes")


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Batch:
    """One training step's bytes for this process's rows."""

    inputs: torch.Tensor
    """int64 [B, T]: bytes at positions p..p+T-1 of each row."""
    targets: torch.Tensor
    """int64 [B, T]: bytes at positions p+1..p+T (the next byte of each input)."""
    reset: torch.Tensor
    """bool [B, T]: zero the state BEFORE input t (a document starts there, or the row restarts)."""
    epoch: int
    """Epoch these bytes belong to (0-based)."""
    tokens: int
    """Number of input bytes, B*T."""


def steps_per_epoch(corpus_bytes: int, global_rows: int, seq_len: int) -> int:
    """Steps until the shortest row is exhausted.

    The ``- 1`` keeps the target of a row's last input inside that row.
    """
    return (corpus_bytes // global_rows - 1) // seq_len


def row_starts(corpus_bytes: int, global_rows: int, rank: int, world_size: int) -> np.ndarray:
    """int64 [B]: first byte of each row owned by ``rank``."""
    first, stop = rank * global_rows // world_size, (rank + 1) * global_rows // world_size
    rows = np.arange(first, stop, dtype=np.int64)
    return rows * corpus_bytes // global_rows


def _check_layout_args(global_rows: int, seq_len: int, rank: int, world_size: int) -> None:
    """Reject layouts that would leave a rank without rows or make empty batches."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if global_rows < world_size:
        raise ValueError(f"global_rows ({global_rows}) must be >= world_size ({world_size}) so every rank has a row")


class RowStreams:
    """Yields ``Batch``es of this rank's rows; see the module docstring for the layout.

    Attribute ``resharded`` is True after ``load_state_dict`` had to re-derive rows for a
    different layout: the positions moved, so carried RNN states must be reset.
    """

    def __init__(self, corpus: ByteSource, *, global_rows: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 prefetch_steps: int = 0) -> None:
        _check_layout_args(global_rows, seq_len, rank, world_size)
        corpus_bytes = len(corpus)
        self.steps_per_epoch: int = steps_per_epoch(corpus_bytes, global_rows, seq_len)
        if self.steps_per_epoch < 1:
            raise CorpusError(
                f"corpus {corpus.name!r} ({corpus_bytes} bytes) is too small for {global_rows} rows x "
                f"seq_len {seq_len} (each row needs {seq_len + 1} bytes); use a smaller batch or seq_len"
            )
        self.corpus = corpus
        self.global_rows = global_rows
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.step_in_epoch = 0
        self.resharded = False
        self.prefetch_steps = prefetch_steps
        self._starts = row_starts(corpus_bytes, global_rows, rank, world_size)

    @property
    def local_rows(self) -> int:
        """Rows of this rank, B."""
        return int(self._starts.shape[0])

    def _positions(self) -> np.ndarray:
        """int64 [B]: absolute offset of each local row's next input byte."""
        return self._starts + self.step_in_epoch * self.seq_len

    def next_batch(self) -> Batch:
        """The next ``seq_len`` bytes of every local row; rows restart when the epoch ends."""
        starts, T = self._positions(), self.seq_len
        if self.step_in_epoch == 0:
            # The stream (re)starts, possibly mid-document: no valid state to carry in.
            window = self.corpus.window(starts, T + 1)
            before = np.full((len(starts), 1), DOC_SEPARATOR, dtype=np.uint8)
        else:
            # One byte more on the left tells whether the first input starts a document.
            wide = self.corpus.window(starts - 1, T + 2)
            before, window = wide[:, :1], wide[:, 1:]
        # A document starts right after a separator (documents never straddle shards).
        reset = np.concatenate([before, window[:, : T - 1]], axis=1) == DOC_SEPARATOR
        tokens = torch.from_numpy(np.ascontiguousarray(window)).long()
        batch = Batch(
            # contiguous: both are views of one array, and callers flatten them with .view().
            inputs=tokens[:, :-1].contiguous(),
            targets=tokens[:, 1:].contiguous(),
            reset=torch.from_numpy(reset),
            epoch=self.epoch,
            tokens=len(starts) * T,
        )
        # Roll over eagerly so a saved state always names the epoch of the next batch.
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.prefetch_steps:
            ahead = min(self.prefetch_steps, self.steps_per_epoch - self.step_in_epoch)
            self.corpus.prefetch(np.maximum(self._positions() - 1, 0), ahead * T + 2)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Resumable position; plain ints and lists so any checkpoint format can hold it."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "positions": [int(p) for p in self._positions()],
            "global_rows": self.global_rows,
            "world_size": self.world_size,
            "rank": self.rank,
            "corpus_bytes": len(self.corpus),
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``.

        Same layout: exact resume. Different global_rows, world_size or seq_len: keep the
        epoch and the fraction of it already done, and set ``resharded = True``.
        Raises ``CorpusError`` if the state was saved for a corpus of another size.
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"data state is missing keys {missing}; was it saved by RowStreams.state_dict()?")
        corpus_bytes = int(state["corpus_bytes"])
        if corpus_bytes != len(self.corpus):
            raise CorpusError(
                f"data state was saved for a {corpus_bytes}-byte corpus but {self.corpus.name!r} has "
                f"{len(self.corpus)} bytes; resume with the same corpus or start a new run"
            )
        old_rows, old_world = int(state["global_rows"]), int(state["world_size"])
        # seq_len is an optional extra key: a state without it is taken to share ours.
        old_seq_len = int(state.get("seq_len", self.seq_len))
        step = int(state["step_in_epoch"])
        if old_rows < 1 or old_seq_len < 1:
            raise ValueError(f"data state has global_rows={old_rows}, seq_len={old_seq_len}; both must be >= 1")
        old_steps = steps_per_epoch(corpus_bytes, old_rows, old_seq_len)
        if not 0 <= step < old_steps:
            raise ValueError(f"data state step_in_epoch={step} is outside [0, {old_steps})")
        resharded = (old_rows, old_world, old_seq_len) != (self.global_rows, self.world_size, self.seq_len)
        # Floor: a resharded run replays a little of the epoch rather than skipping unseen bytes.
        new_step = step * self.steps_per_epoch // old_steps
        if not resharded and int(state["rank"]) == self.rank:
            self._check_positions([int(p) for p in state["positions"]], new_step)
        self.epoch, self.step_in_epoch, self.resharded = int(state["epoch"]), new_step, resharded

    def _check_positions(self, saved: list[int], step: int) -> None:
        """Positions follow from the step; a mismatch means a hand-edited or foreign state."""
        expected = [int(p) for p in self._starts + step * self.seq_len]
        if saved != expected:
            raise ValueError(f"data state positions {saved[:4]}... do not match step_in_epoch={step}")
