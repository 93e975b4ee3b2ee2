"""`mlstm transfer` end to end: a tiny checkpoint trained here, synthetic labelled files, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlstm_platform.cli import app
from mlstm_trainer.__main__ import main as trainer_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GOOD = ["a great film", "wonderful and warm", "great fun", "loved it, great"]
BAD = ["a dull mess", "awful", "boring and dull", "hated it, awful"]


# Tiny models: one torch thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 32-unit model after two steps: untrained, but a real checkpoint the command must load."""
    folder = tmp_path_factory.mktemp("transfer-ckpt")
    args = ["--hidden-size", "32", "--embed-dim", "8", "--batch-size", "4", "--seq-len", "16", "--steps", "2",
            "--checkpoint-dir", str(folder), "--metrics-port", "0", "--device", "cpu",
            "--eval-every", "0"]  # no validation pass: only the checkpoint is needed
    assert trainer_main(args) == 0
    return folder


def rows(repeat: int) -> list[dict]:
    """Positive and negative texts, varied by a counter so no two texts are the same."""
    return [
        {"label": label, "sentence": f"{text} #{i}"}
        for i in range(repeat)
        for label, texts in (("pos", GOOD), ("neg", BAD))
        for text in texts
    ]


def write_split(folder: Path, name: str, data: list[dict], fmt: str) -> Path:
    path = folder / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
    else:
        lines = ["label,sentence"] + [f'{row["label"]},"{row["sentence"]}"' for row in data]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", [pytest.param("csv", id="csv"), pytest.param("jsonl", id="json-lines")])
def test_transfer_reports_the_probe_and_plots_the_top_unit(tmp_path, checkpoint, fmt):
    files = {name: write_split(tmp_path, name, rows(n), fmt) for name, n in (("train", 5), ("val", 2), ("test", 2))}
    plot = tmp_path / "unit.png"
    args = ["transfer", str(checkpoint), "--train", str(files["train"]), "--val", str(files["val"]),
            "--test", str(files["test"]), "--batch-size", "7", "--max-chars", "40", "--plot", str(plot)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for words in ("accuracy (all units)", "accuracy (top unit)", "top unit", "C chosen", "non-zero weights",
                  "of 32", "train 40, val 16, test 16", "neg -> 0, pos -> 1"):
        assert words in result.stdout, words
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_transfer_rejects_non_binary_labels_in_one_line(tmp_path, checkpoint):
    data = rows(2)
    data[0]["label"] = "meh"
    args = ["transfer", str(checkpoint), "--train", str(write_split(tmp_path, "train", data, "csv")),
            "--val", str(write_split(tmp_path, "val", rows(1), "csv")), "--test", str(write_split(tmp_path, "test", rows(1), "csv"))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr == "error: train.csv has 3 distinct labels (meh, neg, pos); need exactly 2\n"
