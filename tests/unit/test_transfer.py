"""Sentiment transfer: reading labelled files, batched features, the probe, and the command's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlstm_platform.cli import app
from mlstm_platform.transfer import (
    LabelledTexts,
    TransferError,
    document_bytes,
    encode_labels,
    featurise,
    fit_probe,
    plot_unit_histogram,
    read_labelled,
)
from mlstm_trainer.corpus import DOC_SEPARATOR
from mlstm_trainer.model import MLSTM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Tiny models: one torch thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def labelled(name: str, labels: list[str]) -> LabelledTexts:
    return LabelledTexts(path=Path(name), texts=["x"] * len(labels), labels=labels)


# --- Reading -------------------------------------------------------------------------------------


def test_csv_and_json_lines_read_the_same(tmp_path):
    csv_file = write(tmp_path / "a.csv", 'label,sentence\n1,"Fine, really."\n0,Dull\n')
    rows = [{"label": 1, "sentence": "Fine, really."}, {"label": 0, "sentence": "Dull"}]
    jsonl_file = write(tmp_path / "a.jsonl", "".join(json.dumps(row) + "\n" for row in rows) + "\n")
    for path in (csv_file, jsonl_file):
        data = read_labelled(path)
        assert data.texts == ["Fine, really.", "Dull"] and data.labels == ["1", "0"]


@pytest.mark.parametrize(
    ("labels", "names"),
    [
        pytest.param(["1", "0", "1"], ["0", "1"], id="zero-one"),
        pytest.param(["1", "-1"], ["-1", "1"], id="numeric-order"),
        pytest.param(["pos", "neg"], ["neg", "pos"], id="words"),
    ],
)
def test_labels_map_to_zero_and_one_in_sorted_order(labels, names):
    found, (encoded, other) = encode_labels(labelled("train.csv", labels), labelled("val.csv", labels[:1]))
    assert found == names
    assert encoded.tolist() == [names.index(label) for label in labels]
    assert other.tolist() == [names.index(labels[0])]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param("label,text\n1,good\n", "bad.csv has no 'sentence' column (columns: label, text)", id="missing-column"),
        pytest.param("", "bad.csv is empty", id="empty"),
        pytest.param("label,sentence\n", "bad.csv has no rows", id="header-only"),
        pytest.param("label,sentence\n,good\n", "bad.csv line 2 has no 'label' value", id="blank-label"),
        pytest.param("label,sentence\n0,a\n1,b\n2,c\n", "bad.csv has 3 distinct labels (0, 1, 2); need exactly 2", id="three-labels"),
        pytest.param("label,sentence\n1,a\n1,b\n", "bad.csv has only one label (1); need exactly 2", id="one-label"),
    ],
)
def test_bad_csv_raises_one_line_naming_the_file(tmp_path, content, words):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(TransferError) as caught:
        encode_labels(read_labelled(path))
    assert str(caught.value) == words


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param('{"label": 1}\n', "bad.jsonl line 1 has no 'sentence' key (keys: label)", id="missing-key"),
        pytest.param('{"label": 1, "sentence": "a"}\n[1, 2]\n', "bad.jsonl line 2 is not a JSON object", id="not-an-object"),
        pytest.param("\n\n", "bad.jsonl is empty", id="blank"),
    ],
)
def test_bad_json_lines_raise_one_line(tmp_path, content, words):
    with pytest.raises(TransferError) as caught:
        read_labelled(write(tmp_path / "bad.jsonl", content))
    assert str(caught.value) == words


def test_a_label_unknown_to_train_is_rejected():
    with pytest.raises(TransferError, match=r"^test.csv has label 'maybe', not one of train.csv's labels \(neg, pos\)$"):
        encode_labels(labelled("train.csv", ["pos", "neg"]), labelled("test.csv", ["pos", "maybe"]))


# --- Features ------------------------------------------------------------------------------------


def test_a_text_is_a_fresh_document_of_utf8_bytes():
    assert document_bytes("né") == bytes([DOC_SEPARATOR]) + "né".encode("utf-8")
    assert document_bytes("abcdef", max_chars=2) == bytes([DOC_SEPARATOR]) + b"ab"


@pytest.mark.parametrize(
    ("batch_size", "chunk_len"),
    [pytest.param(3, 4, id="short-chunks"), pytest.param(16, 256, id="one-batch")],
)
def test_batched_features_equal_each_text_run_alone(batch_size, chunk_len):
    torch.manual_seed(0)
    model = MLSTM(embed_dim=8, hidden_size=16).eval()
    texts = ["", "a", "great film", "terrible, awful, dull", "ok", "fine", "naïve but charming ✓", "x" * 37, "same", "also"]
    features = featurise(model, texts, batch_size=batch_size, chunk_len=chunk_len)
    assert features.dtype == np.float32 and features.shape == (len(texts), 16)
    for row, text in enumerate(texts):
        with torch.no_grad():
            _, (_, cell) = model(torch.tensor([list(document_bytes(text))]))
        np.testing.assert_allclose(features[row], cell[0].numpy(), rtol=1e-5, atol=1e-6, err_msg=text)


def test_featurise_reports_progress_per_batch():
    model = MLSTM(embed_dim=4, hidden_size=8).eval()
    seen = []
    featurise(model, ["a", "bb", "ccc", "dddd", "eeeee"], batch_size=2, advance=seen.append)
    assert seen == [2, 2, 1]


# --- Probe ---------------------------------------------------------------------------------------


def synthetic_split(rng: np.random.Generator, n: int, units: int, signal_unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise features, except `signal_unit`, which is the label (+-1) plus a little noise."""
    labels = rng.integers(0, 2, n)
    features = rng.normal(size=(n, units)).astype(np.float32)
    features[:, signal_unit] = (2 * labels - 1) + 0.3 * rng.normal(size=n)
    return features, labels


def test_the_probe_finds_the_unit_that_carries_the_label():
    rng = np.random.default_rng(0)
    train, val, test = (synthetic_split(rng, n, units=32, signal_unit=7) for n in (300, 100, 100))
    result = fit_probe(train, val, test)
    assert result.top_unit == 7
    assert result.test_accuracy > 0.95 and result.top_unit_accuracy > 0.95
    assert 1 <= result.nonzero_weights <= 32 and result.top_unit_weight > 0


def test_plot_writes_a_png(tmp_path):
    values = np.array([-1.0, -0.5, 0.5, 1.0], dtype=np.float32)
    target = tmp_path / "plots" / "unit.png"
    plot_unit_histogram(values, np.array([0, 0, 1, 1]), ["neg", "pos"], 3, target)
    assert target.read_bytes().startswith(PNG_MAGIC)


# --- The command's errors (the files are checked before the checkpoint loads) --------------------


def good_files(tmp_path: Path) -> list[str]:
    rows = "label,sentence\n1,good\n0,bad\n"
    return [arg for split in ("train", "val", "test") for arg in (f"--{split}", str(write(tmp_path / f"{split}.csv", rows)))]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param("label,text\n1,good\n", "test.csv has no 'sentence' column", id="missing-column"),
        pytest.param("label,sentence\n0,a\n1,b\n2,c\n", "test.csv has 3 distinct labels", id="non-binary"),
        pytest.param("", "test.csv is empty", id="empty"),
    ],
)
def test_command_rejects_a_bad_file_in_one_line(tmp_path, content, words):
    args = good_files(tmp_path)
    write(tmp_path / "test.csv", content)
    result = CliRunner().invoke(app, ["transfer", str(tmp_path / "no-checkpoint"), *args])
    assert result.exit_code == 2
    assert result.stdout == "" and result.stderr.startswith("error: ") and words in result.stderr
    assert result.stderr.count("\n") == 1


def test_command_rejects_a_missing_file(tmp_path):
    args = good_files(tmp_path)
    args[args.index("--val") + 1] = str(tmp_path / "missing.csv")
    result = CliRunner().invoke(app, ["transfer", str(tmp_path / "no-checkpoint"), *args])
    assert result.exit_code == 2 and "missing.csv" in result.stderr and result.stderr.count("\n") == 1


def test_command_rejects_a_path_without_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["transfer", str(tmp_path / "nothing-here"), *good_files(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no checkpoint found at") and result.stderr.count("\n") == 1


def test_command_rejects_an_unknown_device(tmp_path):
    result = CliRunner().invoke(app, ["transfer", str(tmp_path), *good_files(tmp_path), "--device", "tpu"])
    assert result.exit_code == 2 and "--device must be one of cpu, cuda" in result.stderr
