"""Tests for mlstm_trainer.corpus: byte layout, embedded corpus, loading files and directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mlstm_trainer.corpus import (
    DOC_SEPARATOR,
    Corpus,
    CorpusError,
    corpus_from_texts,
    embedded_corpus,
    load_corpus,
)


def _documents(corpus: Corpus) -> list[bytes]:
    """Split a corpus back into its documents using doc_starts (separators dropped)."""
    ends = list(corpus.doc_starts[1:]) + [len(corpus)]
    return [corpus.data[start : end - 1].tobytes() for start, end in zip(corpus.doc_starts, ends)]


def test_separator_is_byte_zero() -> None:
    assert DOC_SEPARATOR == 0


def test_corpus_from_texts_layout() -> None:
    corpus = corpus_from_texts(["ab", "", "é"], name="t")
    # The empty text is skipped; "é" is two UTF-8 bytes.
    assert corpus.data.tobytes() == b"ab\x00\xc3\xa9\x00"
    assert corpus.doc_starts.tolist() == [0, 3]
    assert corpus.doc_starts.dtype == np.int64 and corpus.data.dtype == np.uint8
    assert len(corpus) == 6 and corpus.num_documents == 2 and corpus.name == "t"


@pytest.mark.parametrize(
    "texts",
    [
        pytest.param([], id="no-texts"),
        pytest.param(["", ""], id="only-empty-texts"),
        pytest.param(["a\x00b"], id="text-with-separator"),
    ],
)
def test_corpus_from_texts_rejects(texts: list[str]) -> None:
    with pytest.raises(CorpusError, match="'t'"):
        corpus_from_texts(texts, name="t")


def test_corpus_rejects_document_without_separator() -> None:
    data = np.frombuffer(b"ab\x00cd", dtype=np.uint8)
    with pytest.raises(CorpusError, match="separator"):
        Corpus(data=data, doc_starts=np.array([0, 3], dtype=np.int64), name="bad")


def test_embedded_corpus_shape() -> None:
    corpus = embedded_corpus()
    assert len(corpus) > 100_000
    assert corpus.num_documents > 50
    assert corpus.doc_starts[0] == 0
    assert np.all(np.diff(corpus.doc_starts) > 1)
    # Each document is followed by exactly one separator and contains none itself.
    assert np.all(corpus.data[corpus.doc_starts[1:] - 1] == DOC_SEPARATOR)
    assert corpus.data[-1] == DOC_SEPARATOR
    assert int(np.sum(corpus.data == DOC_SEPARATOR)) == corpus.num_documents


def test_embedded_corpus_is_deterministic() -> None:
    first, second = embedded_corpus(), embedded_corpus()
    assert np.array_equal(first.data, second.data)
    assert np.array_equal(first.doc_starts, second.doc_starts)


def test_load_corpus_empty_path_is_embedded() -> None:
    assert np.array_equal(load_corpus("").data, embedded_corpus().data)


def test_load_corpus_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello\n\nworld\xff")  # raw bytes kept: no decoding, blank lines kept
    corpus = load_corpus(str(path))
    assert _documents(corpus) == [b"hello\n\nworld\xff"]
    assert corpus.name == str(path)


def test_load_corpus_directory(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes(b"third")
    (tmp_path / ".hidden.txt").write_bytes(b"skip me")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_bytes(b"skip me too")
    (tmp_path / "empty.txt").write_bytes(b"")
    corpus = load_corpus(str(tmp_path))
    assert _documents(corpus) == [b"first", b"second", b"third"]


def _make_missing(tmp_path: Path) -> Path:
    return tmp_path / "nope"


def _make_empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".only-hidden").write_bytes(b"x")
    return tmp_path / "d"


def _make_nul_file(tmp_path: Path) -> Path:
    (tmp_path / "bin.dat").write_bytes(b"ab\x00cd")
    return tmp_path / "bin.dat"


def _make_empty_file(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path / "empty.txt"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(_make_missing, "does not exist", id="missing-path"),
        pytest.param(_make_empty_dir, "no non-hidden files", id="empty-directory"),
        pytest.param(_make_nul_file, "contains byte 0x00", id="file-with-nul"),
        pytest.param(_make_empty_file, "is empty", id="empty-corpus"),
    ],
)
def test_load_corpus_errors_name_the_path(tmp_path: Path, make: Callable[[Path], Path], words: str) -> None:
    path = make(tmp_path)
    with pytest.raises(CorpusError, match=words) as info:
        load_corpus(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
