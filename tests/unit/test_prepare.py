"""Unit tests for the pieces of `mlstm data prepare`: sizes, splits, packing, JSON lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlstm_platform.prepare import PackedShard, PrepareOptions, ShardPacker, assign_splits, parse_size
from mlstm_platform.prepare_inputs import InputFile, PrepareError, json_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("4096", 4096, id="bytes"),
        pytest.param("64MiB", 64 << 20, id="MiB"),
        pytest.param("64M", 64 << 20, id="M"),
        pytest.param("1g", 1 << 30, id="lower-g"),
        pytest.param("8 KB", 8 << 10, id="KB-binary"),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "64XB", "", "1.5M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(PrepareError, match="--shard-bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [("shard_bytes", 0), ("val_shards", -1), ("test_shards", -2), ("text_field", "")],
)
def test_options_name_the_bad_flag(field: str, value: object) -> None:
    flag = "--" + field.replace("_", "-")
    with pytest.raises(PrepareError, match=flag):
        PrepareOptions(**{field: value})


@pytest.mark.parametrize(
    ("name", "json_lines", "compressed"),
    [
        ("notes.txt", False, False),
        ("book", False, False),
        ("notes.TXT.gz", False, True),
        ("Books_5.json", True, False),
        ("reviews.jsonl", True, False),
        ("reviews.json.gz", True, True),
        ("reviews.jsonl.GZ", True, True),
    ],
)
def test_input_kind_by_suffix(name: str, json_lines: bool, compressed: bool) -> None:
    source = InputFile.from_path(Path(name))
    assert (source.json_lines, source.compressed) == (json_lines, compressed)


def test_splits_are_deterministic_and_sized() -> None:
    options = PrepareOptions(val_shards=2, test_shards=3, seed=7)
    splits = assign_splits(20, options)
    assert splits == assign_splits(20, options)
    assert (splits.count("val"), splits.count("test"), splits.count("train")) == (2, 3, 15)
    others = {tuple(assign_splits(20, PrepareOptions(val_shards=2, test_shards=3, seed=s))) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_splits_need_a_train_shard() -> None:
    with pytest.raises(PrepareError, match=r"fill 3 shard\(s\).*need at least 4.*lower --shard-bytes"):
        assign_splits(3, PrepareOptions(val_shards=2, test_shards=1))
    assert assign_splits(1, PrepareOptions()) == ["train"]


def pack(docs: list[bytes], shard_bytes: int, tmp_path: Path) -> list[bytes]:
    """Shard contents the packer produces for `docs`."""
    shards: list[bytes] = []

    def emit(index: int, packed: PackedShard) -> None:
        assert index == len(shards)
        shards.append(packed.path.read_bytes())
        assert packed.bytes == len(shards[-1]) and packed.documents == shards[-1].count(0)

    packer = ShardPacker(shard_bytes, tmp_path, emit)
    for doc in docs:
        packer.add(doc)
    packer.close()
    return shards


def test_packer_fills_shards_without_straddling(tmp_path: Path) -> None:
    shards = pack([b"aaaa", b"bbb", b"cc", b"d", b"eeeeee"], shard_bytes=9, tmp_path=tmp_path)
    assert shards == [b"aaaa\0bbb\0", b"cc\0d\0", b"eeeeee\0"]


def test_packer_gives_an_oversized_document_its_own_shard(tmp_path: Path) -> None:
    shards = pack([b"ab", b"x" * 20, b"cd"], shard_bytes=8, tmp_path=tmp_path)
    assert shards == [b"ab\0", b"x" * 20 + b"\0", b"cd\0"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param(b'{"reviewText": "ok"', "f.json:3: not valid JSON", id="truncated"),
        pytest.param(b"\xff\xfe{}", "f.json:3: not valid JSON", id="not-utf8"),
        pytest.param(b'{"summary": "x"}', "f.json:3: no field 'reviewText'; choose the text field with --text-field",
                     id="missing-field"),
        pytest.param(b'["reviewText"]', "no field 'reviewText'", id="not-an-object"),
        pytest.param(b'{"reviewText": 5}', "field 'reviewText' is int, not a string", id="not-a-string"),
        pytest.param(b'{"reviewText": "a\\u0000b"}', "contains byte 0x00", id="separator"),
        pytest.param(b'{"reviewText": "\\ud800"}', "unpaired UTF-16 surrogate", id="surrogate"),
    ],
)
def test_json_text_errors_name_file_and_line(line: bytes, message: str) -> None:
    with pytest.raises(PrepareError, match=message):
        json_text(line, "reviewText", "f.json:3")


def test_json_text_is_utf8() -> None:
    assert json_text('{"reviewText": "café ☕", "overall": 5}\n'.encode(), "reviewText", "f:1") == "café ☕".encode()
