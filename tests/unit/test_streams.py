"""Tests for mlstm_trainer.streams: row layout, reset masks, epochs, ranks and resumable state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlstm_trainer.corpus import Corpus, CorpusError, corpus_from_texts
from mlstm_trainer.streams import Batch, RowStreams

# Documents of uneven lengths so that document starts land at varied offsets inside batches.
_DOC_LENGTHS = (5, 13, 2, 21, 8, 34, 3, 17)


@pytest.fixture(name="corpus")
def fixture_corpus() -> Corpus:
    """111 bytes in 8 documents; every byte value varies so misplaced slices are detected."""
    texts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(n)) for i, n in enumerate(_DOC_LENGTHS)]
    return corpus_from_texts(texts, name="tiny")


def _batches(streams: RowStreams, count: int) -> list[Batch]:
    return [streams.next_batch() for _ in range(count)]


def _assert_same(left: Batch, right: Batch) -> None:
    assert torch.equal(left.inputs, right.inputs)
    assert torch.equal(left.targets, right.targets)
    assert torch.equal(left.reset, right.reset)
    assert left.epoch == right.epoch and left.tokens == right.tokens


def _expected_positions(corpus: Corpus, global_rows: int, seq_len: int, step: int) -> np.ndarray:
    """[G, T] absolute input offsets at a step, derived straight from the documented layout."""
    starts = np.array([g * len(corpus) // global_rows for g in range(global_rows)])
    return starts[:, None] + step * seq_len + np.arange(seq_len)


def test_batch_shapes_and_types(corpus: Corpus) -> None:
    batch = RowStreams(corpus, global_rows=3, seq_len=4).next_batch()
    assert batch.inputs.shape == batch.targets.shape == batch.reset.shape == (3, 4)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    assert batch.reset.dtype == torch.bool
    assert batch.tokens == 12 and batch.epoch == 0


def test_steps_per_epoch_formula(corpus: Corpus) -> None:
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    assert streams.steps_per_epoch == (len(corpus) // 3 - 1) // 4 == 9


def test_rows_read_contiguous_bytes_from_row_starts(corpus: Corpus) -> None:
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    batches = _batches(streams, streams.steps_per_epoch)
    data = torch.from_numpy(corpus.data.copy()).long()
    for step, batch in enumerate(batches):
        positions = torch.from_numpy(_expected_positions(corpus, 3, 4, step))
        assert torch.equal(batch.inputs, data[positions])
        assert torch.equal(batch.targets, data[positions + 1])
    for previous, current in zip(batches, batches[1:]):
        # Each row continues exactly where it stopped: the last target is the next first input.
        assert torch.equal(current.inputs[:, 0], previous.targets[:, -1])


def test_reset_marks_document_starts_and_epoch_restarts(corpus: Corpus) -> None:
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    doc_starts = set(corpus.doc_starts.tolist())
    steps = streams.steps_per_epoch
    batches = _batches(streams, steps + 2)
    for index, batch in enumerate(batches):
        step = index % steps
        positions = _expected_positions(corpus, 3, 4, step)
        expected = np.vectorize(lambda p: p in doc_starts)(positions)
        expected[:, 0] |= step == 0
        assert batch.reset.numpy().tolist() == expected.tolist(), f"batch {index}"
    # Guard against a vacuous pass: some document starts fall inside batches, past t=0.
    assert any(batch.reset[:, 1:].any() for batch in batches)


def test_epoch_advances_and_rows_restart(corpus: Corpus) -> None:
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    first = streams.next_batch()
    rest = _batches(streams, streams.steps_per_epoch - 1)
    assert all(batch.epoch == 0 for batch in rest)
    again = streams.next_batch()
    assert again.epoch == 1
    assert torch.equal(again.inputs, first.inputs)
    assert bool(again.reset[:, 0].all())


@pytest.mark.parametrize(
    ("global_rows", "world_size"),
    [
        pytest.param(4, 2, id="even-split"),
        pytest.param(3, 2, id="uneven-split"),
        pytest.param(5, 5, id="one-row-per-rank"),
    ],
)
def test_ranks_partition_the_single_process_batch(corpus: Corpus, global_rows: int, world_size: int) -> None:
    seq_len = 3
    single = RowStreams(corpus, global_rows=global_rows, seq_len=seq_len)
    ranks = [
        RowStreams(corpus, global_rows=global_rows, seq_len=seq_len, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert sum(streams.local_rows for streams in ranks) == global_rows
    for _ in range(single.steps_per_epoch + 2):  # crosses an epoch boundary
        whole = single.next_batch()
        parts = [streams.next_batch() for streams in ranks]
        for field in ("inputs", "targets", "reset"):
            assert torch.equal(torch.cat([getattr(part, field) for part in parts]), getattr(whole, field))
        assert {part.epoch for part in parts} == {whole.epoch}


def test_state_dict_contents(corpus: Corpus) -> None:
    streams = RowStreams(corpus, global_rows=4, seq_len=3, rank=1, world_size=2)
    _batches(streams, 2)
    state = streams.state_dict()
    # Rank 1 of 2 owns global rows 2 and 3; each has advanced 2 steps of 3 bytes.
    row_starts = [2 * len(corpus) // 4, 3 * len(corpus) // 4]
    assert state["positions"] == [start + 6 for start in row_starts]
    assert {key: state[key] for key in ("epoch", "step_in_epoch", "global_rows", "world_size", "rank")} == {
        "epoch": 0,
        "step_in_epoch": 2,
        "global_rows": 4,
        "world_size": 2,
        "rank": 1,
    }
    assert state["corpus_bytes"] == len(corpus)


@pytest.mark.parametrize(
    "consumed",
    [
        pytest.param(0, id="fresh"),
        pytest.param(3, id="mid-epoch"),
        pytest.param(8, id="last-step-of-epoch"),
        pytest.param(9, id="epoch-boundary"),
        pytest.param(13, id="second-epoch"),
    ],
)
@pytest.mark.parametrize("fresh_object", [pytest.param(False, id="same-object"), pytest.param(True, id="new-object")])
def test_state_round_trip_resumes_exactly(corpus: Corpus, consumed: int, fresh_object: bool) -> None:
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    _batches(streams, consumed)
    state = streams.state_dict()
    expected = _batches(streams, 12)
    resumed = RowStreams(corpus, global_rows=3, seq_len=4) if fresh_object else streams
    resumed.load_state_dict(state)
    assert resumed.resharded is False
    for want, got in zip(expected, _batches(resumed, 12)):
        _assert_same(want, got)


def test_state_from_another_rank_restores_this_rank(corpus: Corpus) -> None:
    # Ranks advance in lockstep, so rank 0's saved state is enough to resume rank 1.
    rank0 = RowStreams(corpus, global_rows=4, seq_len=3, rank=0, world_size=2)
    rank1 = RowStreams(corpus, global_rows=4, seq_len=3, rank=1, world_size=2)
    _batches(rank0, 5)
    _batches(rank1, 5)
    restored = RowStreams(corpus, global_rows=4, seq_len=3, rank=1, world_size=2)
    restored.load_state_dict(rank0.state_dict())
    assert restored.resharded is False
    _assert_same(restored.next_batch(), rank1.next_batch())


@pytest.mark.parametrize(
    ("new_layout", "expected_step"),
    [
        # Saved at step 6 of 9 (G=3, T=4). The same fraction of the new epoch, floored.
        pytest.param({"global_rows": 2, "seq_len": 4}, 6 * 13 // 9, id="fewer-rows"),
        pytest.param({"global_rows": 3, "seq_len": 2}, 6 * 18 // 9, id="shorter-seq-len"),
        pytest.param({"global_rows": 3, "seq_len": 4, "rank": 1, "world_size": 3}, 6, id="more-ranks"),
    ],
)
def test_resharding_keeps_epoch_fraction(corpus: Corpus, new_layout: dict[str, int], expected_step: int) -> None:
    saved = RowStreams(corpus, global_rows=3, seq_len=4)
    _batches(saved, saved.steps_per_epoch + 6)
    resumed = RowStreams(corpus, **new_layout)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.resharded is True
    assert resumed.state_dict()["epoch"] == 1
    assert resumed.state_dict()["step_in_epoch"] == expected_step
    batch = resumed.next_batch()
    assert batch.epoch == 1
    rows, seq_len = new_layout["global_rows"], new_layout["seq_len"]
    first_row = new_layout.get("rank", 0) * rows // new_layout.get("world_size", 1)
    start = first_row * len(corpus) // rows + expected_step * seq_len
    assert batch.inputs[0].tolist() == corpus.data[start : start + seq_len].tolist()


def test_exact_load_clears_resharded(corpus: Corpus) -> None:
    other = RowStreams(corpus, global_rows=2, seq_len=4)
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    streams.load_state_dict(other.state_dict())
    assert streams.resharded is True
    streams.load_state_dict(RowStreams(corpus, global_rows=3, seq_len=4).state_dict())
    assert streams.resharded is False


def test_state_from_different_corpus_is_rejected(corpus: Corpus) -> None:
    state = RowStreams(corpus, global_rows=3, seq_len=4).state_dict()
    state["corpus_bytes"] += 1
    with pytest.raises(CorpusError, match="same corpus"):
        RowStreams(corpus, global_rows=3, seq_len=4).load_state_dict(state)


def test_tampered_positions_are_rejected(corpus: Corpus) -> None:
    streams = RowStreams(corpus, global_rows=3, seq_len=4)
    state = streams.state_dict()
    state["positions"][0] += 1
    with pytest.raises(ValueError, match="positions"):
        streams.load_state_dict(state)
    assert streams.state_dict()["positions"][0] == 0  # a failed load leaves the stream untouched


@pytest.mark.parametrize(
    ("global_rows", "seq_len"),
    [
        pytest.param(1, 111, id="seq-len-fills-corpus"),
        pytest.param(12, 9, id="too-many-rows"),
    ],
)
def test_too_small_corpus(corpus: Corpus, global_rows: int, seq_len: int) -> None:
    with pytest.raises(CorpusError, match="too small.*'tiny'|'tiny'.*too small") as info:
        RowStreams(corpus, global_rows=global_rows, seq_len=seq_len)
    assert "smaller batch or seq_len" in str(info.value)


def test_largest_fitting_seq_len_is_accepted(corpus: Corpus) -> None:
    # 111 bytes in one row: 110 inputs, each with its next byte as target.
    batch = RowStreams(corpus, global_rows=1, seq_len=110).next_batch()
    assert batch.targets[0, -1].item() == corpus.data[-1]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"global_rows": 3, "seq_len": 0}, id="zero-seq-len"),
        pytest.param({"global_rows": 0, "seq_len": 4}, id="zero-rows"),
        pytest.param({"global_rows": 3, "seq_len": 4, "rank": 2, "world_size": 2}, id="rank-out-of-range"),
        pytest.param({"global_rows": 1, "seq_len": 4, "rank": 0, "world_size": 2}, id="fewer-rows-than-ranks"),
    ],
)
def test_invalid_layout_is_rejected(corpus: Corpus, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RowStreams(corpus, **kwargs)
