"""Load training text as one byte array with document boundaries.

Format (shared with the shards written by ``mlstm data prepare``): every document
is its raw bytes followed by one ``DOC_SEPARATOR`` byte, all concatenated. The
model is byte-level, so files are never decoded; they are only checked for the
separator byte, which would otherwise fake a document boundary.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DOC_SEPARATOR: int = 0x00
"""Byte that ends every document. Byte 0 never occurs in UTF-8 text."""

EMBEDDED_CORPUS_NAME = "embedded:pydoc_data.topics"
"""Name of the corpus used when no path is given."""


class CorpusError(ValueError):
    """A corpus cannot be loaded or is unusable; the message says how to fix it."""


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Corpus:
    """Documents concatenated as bytes, each followed by ``DOC_SEPARATOR``.

    ``eq=False`` because comparing numpy arrays element-wise has no single truth value.
    """

    data: np.ndarray
    """uint8 [L]: all documents concatenated, each followed by ``DOC_SEPARATOR``."""
    doc_starts: np.ndarray
    """int64 [D]: strictly increasing offsets where each document begins; the first is 0."""
    name: str
    """Human-readable source description (a path, or ``EMBEDDED_CORPUS_NAME``)."""

    def __post_init__(self) -> None:
        _check_layout(self.data, self.doc_starts, self.name)

    def __len__(self) -> int:
        """Number of bytes, separators included."""
        return int(self.data.shape[0])

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return int(self.doc_starts.shape[0])

    def window(self, starts: np.ndarray, length: int) -> np.ndarray:
        """uint8 [B, length]: bytes [start, start+length) for each start (one numpy gather)."""
        return self.data[starts[:, None] + np.arange(length, dtype=np.int64)]

    def prefetch(self, starts: np.ndarray, length: int) -> None:
        """Everything is in memory already."""


def _check_layout(data: np.ndarray, doc_starts: np.ndarray, name: str) -> None:
    """Reject arrays that break the format, so shard readers fail loudly, not silently."""
    if data.dtype != np.uint8 or data.ndim != 1:
        raise CorpusError(f"corpus {name!r}: data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
    if doc_starts.dtype != np.int64 or doc_starts.ndim != 1:
        raise CorpusError(f"corpus {name!r}: doc_starts must be a 1-D int64 array, got {doc_starts.dtype}")
    if data.size == 0 or doc_starts.size == 0:
        raise CorpusError(f"corpus {name!r} is empty; add at least one non-empty document")
    if doc_starts[0] != 0 or np.any(np.diff(doc_starts) <= 1) or doc_starts[-1] >= data.size - 1:
        raise CorpusError(f"corpus {name!r}: doc_starts must start at 0 and hold non-empty documents")
    # Each document must end with the separator: the byte before every later start, and the last byte.
    ends = np.append(doc_starts[1:] - 1, data.size - 1)
    if np.any(data[ends] != DOC_SEPARATOR):
        raise CorpusError(f"corpus {name!r}: a document is not followed by the separator byte {DOC_SEPARATOR:#04x}")


def corpus_from_bytes(documents: Iterable[bytes], name: str) -> Corpus:
    """Build a corpus from raw documents; empty documents are skipped (they hold no text).

    Raises ``CorpusError`` if a document contains ``DOC_SEPARATOR`` or all are empty.
    """
    pieces: list[bytes] = []
    lengths: list[int] = []
    separator = bytes([DOC_SEPARATOR])
    for index, doc in enumerate(documents):
        if not doc:
            continue
        if separator in doc:
            raise CorpusError(
                f"corpus {name!r}: document {index} contains byte {DOC_SEPARATOR:#04x}, "
                "which marks document ends; remove it"
            )
        pieces += (doc, separator)
        lengths.append(len(doc) + 1)
    if not lengths:
        raise CorpusError(f"corpus {name!r} is empty; add at least one non-empty document")
    # np.frombuffer shares the joined bytes, which are immutable: the array is read-only for free.
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    doc_starts = np.concatenate(([0], np.cumsum(lengths[:-1]))).astype(np.int64)
    return Corpus(data=data, doc_starts=doc_starts, name=name)


def corpus_from_texts(texts: Iterable[str], name: str) -> Corpus:
    """Build a corpus with one document per string, encoded as UTF-8."""
    return corpus_from_bytes((text.encode("utf-8") for text in texts), name)


def embedded_corpus() -> Corpus:
    """Python's own help topics, one document per topic, sorted by key.

    Ships with every CPython, so smoke tests and demos need no download.
    """
    from pydoc_data.topics import topics

    return corpus_from_texts((topics[key] for key in sorted(topics)), EMBEDDED_CORPUS_NAME)


def load_corpus(path: str) -> Corpus:
    """Load ``path``: ``""`` is the embedded corpus, a file is one document, and a directory
    holds one document per regular file (recursive, sorted by path, hidden entries skipped).
    """
    if path == "":
        return embedded_corpus()
    root = Path(path)
    if not root.exists():
        raise CorpusError(
            f"corpus path {path!r} does not exist; pass an existing file or directory, or '' for the embedded corpus"
        )
    if root.is_dir():
        files = sorted(document_files(root))
        if not files:
            raise CorpusError(f"corpus directory {path!r} has no non-hidden files; add text files to it")
    else:
        files = [root]
    return corpus_from_bytes(_read_documents(files), path)


def document_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``, skipping hidden files and directories (e.g. ``.git``)."""
    # os.walk with followlinks=False: a symlinked directory cannot loop or escape the corpus.
    for directory, subdirs, names in os.walk(root, followlinks=False):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            candidate = Path(directory, name)
            if not name.startswith(".") and candidate.is_file():
                yield candidate


def _read_documents(files: list[Path]) -> Iterator[bytes]:
    """Bytes of each file; a separator byte is reported with the file's path."""
    separator = bytes([DOC_SEPARATOR])
    for file in files:
        data = file.read_bytes()
        if separator in data:
            raise CorpusError(
                f"corpus file {str(file)!r} contains byte {DOC_SEPARATOR:#04x} (binary file?); "
                "remove the byte or the file"
            )
        yield data


def holdout_split(corpus: Corpus, fraction: float) -> tuple[Corpus, Corpus | None]:
    """(train, val): the documents in the last `fraction` of the bytes are held out for validation.

    The cut falls on a document start, so both parts keep the format. A single document, or a
    fraction of 0, holds nothing out (val is None).
    """
    cut_at = int(len(corpus) * (1.0 - fraction))
    later = corpus.doc_starts[corpus.doc_starts >= cut_at]
    if fraction <= 0 or later.size == 0 or later[0] == 0:
        return corpus, None
    cut = int(later[0])
    train = Corpus(data=corpus.data[:cut], doc_starts=corpus.doc_starts[corpus.doc_starts < cut], name=corpus.name)
    val = Corpus(data=corpus.data[cut:], doc_starts=later - cut, name=f"{corpus.name} (held-out val)")
    return train, val

