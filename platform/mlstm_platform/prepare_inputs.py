"""The documents of `mlstm data prepare`'s inputs, read as a stream.

A plain text file is one document (its raw bytes: the model is byte-level, so text is never
decoded). A JSON-lines file (`.json` or `.jsonl`, the Amazon reviews layout) holds one document
per line, taken from one string field. Either may be gzip-compressed (`.gz`). Directories stand
for the regular files under them, sorted, hidden entries skipped.

Documents holding the separator byte (0x00) are rejected with the file (and line) that holds
them: dropping them silently would change the corpus behind the user's back, and the trainer's
own corpus loader rejects them too. Empty documents are skipped and counted: they carry no text,
and two separators in a row would make an empty document.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mlstm_trainer.corpus import DOC_SEPARATOR, document_files

JSON_SUFFIXES = (".json", ".jsonl")
GZIP_SUFFIX = ".gz"
READ_CHUNK = 8 << 20
SPOOL_IN_MEMORY = 16 << 20
"""A text file up to this size is held in memory while it waits for its shard; larger ones spill to disk."""
PROGRESS_EVERY_LINES = 4096
"""JSON lines between progress updates: asking the file for its position on every line costs a syscall."""

_SEPARATOR = bytes([DOC_SEPARATOR])


class PrepareError(ValueError):
    """Bad input or settings for `mlstm data prepare`; the one-line message says what and where."""


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input file and how to read it (decided by its suffixes)."""

    path: Path
    json_lines: bool
    compressed: bool

    @classmethod
    def from_path(cls, path: Path) -> "InputFile":
        name = path.name.lower()
        compressed = name.endswith(GZIP_SUFFIX)
        if compressed:
            name = name[: -len(GZIP_SUFFIX)]
        return cls(path=path, json_lines=name.endswith(JSON_SUFFIXES), compressed=compressed)


@dataclass(slots=True)
class SpooledDocument:
    """A whole text file's bytes waiting to be written into a shard (memory or a temporary file)."""

    size: int
    file: IO[bytes]

    def chunks(self) -> Iterator[bytes]:
        self.file.seek(0)
        while chunk := self.file.read(READ_CHUNK):
            yield chunk

    def close(self) -> None:
        self.file.close()


Document = bytes | SpooledDocument
"""A JSON line's text is small and stays `bytes`; a text file may be large and is spooled."""


def document_size(doc: Document) -> int:
    return len(doc) if isinstance(doc, bytes) else doc.size


def find_inputs(paths: Sequence[Path]) -> list[InputFile]:
    """The files to read, in order; a directory expands to its files. Raises PrepareError if one is missing."""
    files: list[InputFile] = []
    for path in paths:
        if path.is_dir():
            found = sorted(document_files(path))
            if not found:
                raise PrepareError(f"input directory {path} holds no (non-hidden) files")
            files += (InputFile.from_path(p) for p in found)
        elif path.is_file():
            files.append(InputFile.from_path(path))
        else:
            raise PrepareError(f"input {path} does not exist (or is not a regular file)")
    return files


def read_documents(source: InputFile, text_field: str, advance: Callable[[int], None]) -> Iterator[Document]:
    """Yield the documents of one file, empty ones included (the caller counts and skips them).

    `advance(n)` is told how many bytes of the file on disk (compressed bytes for `.gz`) were consumed,
    so a progress bar over the input sizes ends exactly at 100%.
    """
    try:
        with open(source.path, "rb") as raw:
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if source.compressed else raw
            position = _Position(raw, advance)
            if source.json_lines:
                yield from _json_documents(stream, source.path, text_field, position)
            else:
                yield _spooled_text(stream, source.path, position)
            position.update()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise PrepareError(f"{source.path} is not a readable gzip file ({err or 'truncated'})") from None
    except OSError as err:
        raise PrepareError(f"cannot read {source.path}: {err.strerror or err}") from None


class _Position:
    """Reports how far into the file on disk the reader is, as increments."""

    def __init__(self, raw: IO[bytes], advance: Callable[[int], None]) -> None:
        self.raw, self.advance, self.done = raw, advance, 0

    def update(self) -> None:
        now = self.raw.tell()
        if now > self.done:
            self.advance(now - self.done)
            self.done = now


def _json_documents(stream: IO[bytes], path: Path, field: str, position: _Position) -> Iterator[bytes]:
    for number, line in enumerate(stream, start=1):
        if number % PROGRESS_EVERY_LINES == 0:
            position.update()
        if line.strip():  # blank lines (a trailing newline, say) hold no record
            yield json_text(line, field, f"{path}:{number}")


def json_text(line: bytes, field: str, where: str) -> bytes:
    """The UTF-8 bytes of `field` in one JSON line; `where` (file:line) names it in errors."""
    try:
        # Decoding here skips json's per-call encoding sniffing (a third of its time); -sig drops a BOM.
        record = json.loads(line.decode("utf-8-sig"))
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise PrepareError(f"{where}: not valid JSON ({reason}); JSON-lines files hold one object per line") from None
    if not isinstance(record, dict) or field not in record:
        raise PrepareError(f"{where}: no field {field!r}; choose the text field with --text-field")
    text = record[field]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" decodes from JSON but has no UTF-8
        raise PrepareError(f"{where}: field {field!r} holds an unpaired UTF-16 surrogate, not text") from None
    if _SEPARATOR in data:
        raise PrepareError(
            f"{where}: field {field!r} contains byte {DOC_SEPARATOR:#04x}, which marks document ends; remove it")
    return data


def _spooled_text(stream: IO[bytes], path: Path, position: _Position) -> SpooledDocument:
    # Spooled so that its size is known before it is placed: a document never straddles two shards,
    # and a .gz file's uncompressed size is only known once it has been read.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    size = 0
    while chunk := stream.read(READ_CHUNK):
        at = chunk.find(_SEPARATOR)
        if at >= 0:
            spool.close()
            raise PrepareError(
                f"{path} contains byte {DOC_SEPARATOR:#04x} at offset {size + at} (binary file?); "
                "it marks document ends, so remove it or the file"
            )
        spool.write(chunk)
        size += len(chunk)
        position.update()
    return SpooledDocument(size=size, file=spool)
