"""Checkpoints: atomic step folders, the `latest` pointer, pruning, and path resolution."""

from __future__ import annotations

import pytest
import torch

from mlstm_trainer.checkpoint import (
    CheckpointError,
    Checkpointer,
    list_checkpoints,
    load_checkpoint,
    should_save,
    split_checkpoint_path,
)


@pytest.mark.parametrize(
    "step, every, expected",
    [
        pytest.param(100, 100, True, id="due"),
        pytest.param(101, 100, False, id="not-due"),
        pytest.param(0, 100, False, id="step-zero"),
        pytest.param(100, 0, False, id="disabled"),
    ],
)
def test_should_save(step, every, expected):
    assert should_save(step, every) is expected


def test_save_keeps_the_newest_and_points_latest_at_it(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    for step in (5, 10, 15):
        checkpointer.save(step, {"step": step, "weights": torch.full((3,), float(step))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000010", "step-00000015"]
    assert (tmp_path / "latest").read_text() == "step-00000015"
    assert checkpointer.latest() == "step-00000015"
    assert load_checkpoint(tmp_path)["step"] == 15
    assert torch.equal(load_checkpoint(tmp_path / "step-00000010")["weights"], torch.full((3,), 10.0))


def test_half_written_checkpoints_are_ignored(tmp_path):
    Checkpointer(str(tmp_path), keep=3).save(1, {"step": 1})
    # What a process killed mid-write leaves behind: a temporary file and a step folder without state.
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / ".state.pt.abc").write_bytes(b"partial")
    (tmp_path / "step-00000003").mkdir()
    assert Checkpointer(str(tmp_path)).latest() == "step-00000001"
    assert list_checkpoints(Checkpointer(str(tmp_path)).store) == [(1, "step-00000001")]


def test_pointer_to_a_missing_checkpoint_falls_back_to_listing(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    checkpointer.save(4, {"step": 4})
    (tmp_path / "latest").write_text("step-00000009")
    assert checkpointer.latest() == "step-00000004"


def test_failed_write_leaves_latest_untouched(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    checkpointer.save(2, {"step": 2})
    with pytest.raises(Exception):
        checkpointer.save(4, {"unpicklable": lambda: None})
    assert checkpointer.latest() == "step-00000002"
    assert not (tmp_path / "step-00000004" / "state.pt").exists()


@pytest.mark.parametrize(
    "path, expected",
    [
        pytest.param("runs/a", ("runs/a", None), id="run-dir"),
        pytest.param("runs/a/step-00000010", ("runs/a", "step-00000010"), id="step-folder"),
        pytest.param("runs/a/step-00000010/state.pt", ("runs/a", "step-00000010"), id="state-file"),
        pytest.param("s3://bucket/run/step-00000002/", ("s3://bucket/run", "step-00000002"), id="s3-step"),
        pytest.param("s3://bucket/run", ("s3://bucket/run", None), id="s3-run"),
    ],
)
def test_split_checkpoint_path(path, expected):
    assert split_checkpoint_path(path) == expected


def test_load_names_the_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint found at {tmp_path}"):
        load_checkpoint(tmp_path)
