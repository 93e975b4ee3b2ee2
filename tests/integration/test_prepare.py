"""`mlstm data prepare` end to end: text, JSON lines and .gz inputs to a local directory and to S3 (moto)."""

from __future__ import annotations

import gzip
import re
import socket
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlstm_platform.cli import app
from mlstm_platform.prepare import PrepareOptions, prepare_dataset
from mlstm_trainer.shards import MANIFEST_NAME, DatasetManifest, has_manifest, read_manifest
from mlstm_trainer.storage import ObjectStore, StorageError, open_store

SHARD_BYTES = 300


@dataclass
class Target:
    """Where a test prepares to: the --out URL, the environment the CLI runs with, and the store."""

    url: str
    env: dict[str, str]
    store: ObjectStore


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "local":
        url = str(tmp_path / "dataset")
        return Target(url, {}, open_store(url))
    s3_env = request.getfixturevalue("s3_env")
    env = {k: v for k, v in s3_env.items() if k != "bucket"}
    url = f"s3://{s3_env['bucket']}/corpora/reviews"
    return Target(url, env, open_store(url, env))


def reviews(count: int, start: int = 0) -> list[str]:
    return [f"Review {i}: {'great ' * (i % 7)}café ☕ {'!' * (i % 3)}" for i in range(start, start + count)]


def write_jsonl(path: Path, texts: list[str], field: str = "reviewText") -> None:
    lines = "".join(json.dumps({field: t, "overall": 5}) + "\n" for t in texts)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(lines)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[list[Path], list[bytes]]:
    """Four inputs, one of each kind, and the documents they hold in order (empty ones dropped)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    plain, packed = folder / "a.txt", folder / "b.txt.gz"
    plain.write_bytes(b"A plain text document.\nIt has two lines.\n")
    packed.write_bytes(gzip.compress("Ein komprimiertes Dokument: äöü.".encode()))
    first, second = reviews(30), reviews(20, start=30)
    write_jsonl(folder / "c.jsonl", first[:10] + [""] + first[10:])  # the empty review is skipped
    write_jsonl(folder / "d.json.gz", second)
    paths = [plain, packed, folder / "c.jsonl", folder / "d.json.gz"]
    docs = [plain.read_bytes(), gzip.decompress(packed.read_bytes())] + [t.encode() for t in first + second]
    return paths, docs


def run_cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["data", "prepare", *args], env=env)


def prepare_cli(target: Target, paths: list[Path], *extra: str):
    result = run_cli(*map(str, paths), "--out", target.url, "--shard-bytes", str(SHARD_BYTES), *extra, env=target.env)
    assert result.exit_code == 0, result.output
    return result


def test_shards_hold_the_documents_and_match_the_manifest(target: Target, inputs) -> None:
    paths, docs = inputs
    result = prepare_cli(target, paths)
    manifest = read_manifest(target.store)
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.bin" for i in range(len(manifest.shards))]
    contents = [target.store.get(s.name) for s in manifest.shards]
    for shard, data in zip(manifest.shards, contents):
        assert (shard.bytes, shard.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert shard.documents == data.count(0) and data.endswith(b"\0")  # whole documents only
        assert len(data) <= SHARD_BYTES and shard.split == "train"
    assert b"".join(contents) == b"".join(d + b"\0" for d in docs)
    assert sorted(target.store.list()) == sorted([MANIFEST_NAME, *(s.name for s in manifest.shards)])
    totals = f"train {len(contents):>8,} {sum(map(len, contents)):>17,} {len(docs):>13,}"
    assert totals in result.stdout and "skipped 1 empty documents" in result.stdout


def test_splits_are_deterministic_given_the_seed(target: Target, inputs, tmp_path: Path) -> None:
    paths, _ = inputs
    prepare_cli(target, paths, "--val-shards", "2", "--test-shards", "1", "--seed", "3")
    first = read_manifest(target.store)
    assert [len(first.split(s)) for s in ("val", "test")] == [2, 1] and first.seed == 3
    again = open_store(str(tmp_path / "again"))
    prepare_dataset(paths, again, PrepareOptions(shard_bytes=SHARD_BYTES, val_shards=2, test_shards=1, seed=3))
    assert read_manifest(again) == first
    splits = {tuple(s.split for s in manifest_for(paths, tmp_path / f"seed{seed}", seed).shards) for seed in range(6)}
    assert len(splits) > 1


def manifest_for(paths: list[Path], out: Path, seed: int) -> DatasetManifest:
    options = PrepareOptions(shard_bytes=SHARD_BYTES, val_shards=2, test_shards=1, seed=seed)
    return prepare_dataset(paths, open_store(str(out)), options).manifest


def test_rerun_uploads_nothing(target: Target, inputs) -> None:
    paths, _ = inputs
    prepare_cli(target, paths)
    shards = len(read_manifest(target.store).shards)
    recorder = Recording(target.store)
    report = prepare_dataset(paths, recorder, PrepareOptions(shard_bytes=SHARD_BYTES))
    assert (report.uploaded, report.unchanged) == (0, shards)
    assert recorder.writes == [("put", MANIFEST_NAME)]  # the manifest is rewritten, no shard is
    assert f"uploaded 0 shards, {shards} unchanged" in prepare_cli(target, paths).stdout


def test_changed_input_reuploads_only_changed_shards_and_drops_stale_ones(target: Target, inputs) -> None:
    paths, docs = inputs
    prepare_cli(target, paths)
    before = read_manifest(target.store).shards
    write_jsonl(paths[3], reviews(5, start=30))  # the last input shrinks
    report = prepare_dataset(paths, target.store, PrepareOptions(shard_bytes=SHARD_BYTES))
    after = report.manifest.shards
    assert len(after) < len(before) and report.stale_removed == len(before) - len(after)
    assert report.unchanged >= 1 and report.uploaded + report.unchanged == len(after)
    assert sorted(target.store.list()) == sorted([MANIFEST_NAME, *(s.name for s in after)])
    assert b"".join(target.store.get(s.name) for s in after) == b"".join(d + b"\0" for d in docs[:-15])


class Recording:
    """An ObjectStore that records writes and can fail the N-th shard upload."""

    def __init__(self, store: ObjectStore, fail_upload: int | None = None) -> None:
        self.store, self.fail_upload, self.writes = store, fail_upload, []

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def put(self, name: str, data: bytes) -> None:
        self.writes.append(("put", name))
        self.store.put(name, data)

    def put_file(self, name: str, path: Path) -> None:
        if len(self.writes) == self.fail_upload:
            raise StorageError(f"writing {self.store.url(name)} failed after retrying for 1s: Connection refused")
        self.writes.append(("put_file", name))
        self.store.put_file(name, path)

    def delete(self, name: str) -> None:
        self.writes.append(("delete", name))
        self.store.delete(name)


def test_manifest_is_written_last(target: Target, inputs) -> None:
    recorder = Recording(target.store)
    prepare_dataset(inputs[0], recorder, PrepareOptions(shard_bytes=SHARD_BYTES))
    assert recorder.writes[-1] == ("put", MANIFEST_NAME)
    assert [w for w in recorder.writes if w[1] == MANIFEST_NAME] == [("delete", MANIFEST_NAME), ("put", MANIFEST_NAME)]


def test_failure_mid_run_leaves_no_manifest(target: Target, inputs) -> None:
    paths, _ = inputs
    prepare_cli(target, paths)  # a complete dataset is there ...
    write_jsonl(paths[2], reviews(30, start=100))  # ... then its inputs change and the upload fails midway
    with pytest.raises(StorageError):
        prepare_dataset(paths, Recording(target.store, fail_upload=3), PrepareOptions(shard_bytes=SHARD_BYTES))
    assert not has_manifest(target.store)  # the old manifest no longer matches the shards, so it is gone


def test_bad_input_midway_leaves_no_manifest(target: Target, inputs) -> None:
    paths, _ = inputs
    paths[3].write_bytes(gzip.compress(b'{"reviewText": "fine"}\n{broken\n'))
    result = run_cli(*map(str, paths), "--out", target.url, "--shard-bytes", str(SHARD_BYTES), env=target.env)
    assert result.exit_code == 2
    assert result.stderr == f"error: {paths[3]}:2: not valid JSON (Expecting property name enclosed in double quotes); " \
                            "JSON-lines files hold one object per line\n"
    assert target.store.list("shard-") and not has_manifest(target.store)


def test_too_few_shards_for_the_splits(target: Target, inputs) -> None:
    result = run_cli(*map(str, inputs[0]), "--out", target.url, "--val-shards", "1", env=target.env)
    assert result.exit_code == 2
    assert "fill 1 shard(s) of up to 67108864 bytes" in result.stderr and "lower --shard-bytes" in result.stderr
    assert not has_manifest(target.store)


def test_directory_input_and_text_field(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ignored")
    write_jsonl(folder / "x.jsonl", ["one", "two"], field="text")
    (folder / "y.txt").write_text("three")
    out = tmp_path / "out"
    result = run_cli(str(folder), "--out", str(out), "--text-field", "text")
    assert result.exit_code == 0, result.output
    assert open_store(str(out)).get("shard-000000.bin") == b"one\0two\0three\0"


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


SECRET = "s3cr3t-never-printed"


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        pytest.param(lambda d: [str(d / "absent.txt"), "--out", str(d / "o")], r"input .*absent\.txt does not exist",
                     id="missing-input"),
        pytest.param(lambda d: [str(d / "a.txt"), "--out", "gs://bucket/x"], "unsupported URL scheme", id="bad-scheme"),
        pytest.param(lambda d: [str(d / "a.txt"), "--out", "s3://"], "names no bucket", id="no-bucket"),
        pytest.param(lambda d: [str(d / "a.txt"), "--out", str(d / "a.txt")], "is a file; name a directory",
                     id="out-is-a-file"),
        pytest.param(lambda d: [str(d / "r.jsonl"), "--out", str(d / "o"), "--text-field", "body"],
                     r"r\.jsonl:1: no field 'body'", id="missing-field"),
        pytest.param(lambda d: [str(d / "nul.txt"), "--out", str(d / "o")], r"nul\.txt contains byte 0x00 at offset 3",
                     id="separator-byte"),
        pytest.param(lambda d: [str(d / "a.txt"), "--out", str(d / "o"), "--shard-bytes", "lots"],
                     "--shard-bytes 'lots' is not a positive size", id="bad-size"),
        pytest.param(lambda d: [str(d / "a.txt"), "--out", "s3://bucket/x", "--s3-endpoint", closed_port_url(),
                                "--retry-seconds", "0.5"],
                     r"checking bucket bucket failed after retrying.*Connection refused", id="s3-unreachable"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, make_args, message: str) -> None:
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "r.jsonl").write_text('{"reviewText": "x"}\n')
    (tmp_path / "nul.txt").write_bytes(b"abc\0def")
    env = {"MLSTM_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": SECRET}
    result = run_cli(*make_args(tmp_path), env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert re.search(message, result.stderr), result.stderr
    assert SECRET not in result.output and result.stdout == ""
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()


def test_flags_override_the_environment(s3_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    wrong = {"MLSTM_S3_ENDPOINT": closed_port_url(), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    url = f"s3://{s3_env['bucket']}/flags"
    result = run_cli(str(tmp_path / "a.txt"), "--out", url, "--s3-endpoint", s3_env["MLSTM_S3_ENDPOINT"],
                     "--access-key", "testing", "--secret-key", SECRET, "--retry-seconds", "1", env=wrong)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert read_manifest(open_store(url, s3_env)).shards[0].bytes == 5


def test_prepare_creates_a_missing_bucket(s3_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    env = {k: v for k, v in s3_env.items() if k != "bucket"}
    url = f"s3://{s3_env['bucket']}-new/x"
    assert run_cli(str(tmp_path / "a.txt"), "--out", url, env=env).exit_code == 0
    assert has_manifest(open_store(url, env))


def test_real_minio(real_s3_env: dict[str, str], inputs) -> None:
    """Opt-in: MLSTM_TEST_S3_ENDPOINT names a real MinIO."""
    env = {k: v for k, v in real_s3_env.items() if k != "bucket"}
    target = Target(f"s3://{real_s3_env['bucket']}/ds", env, open_store(f"s3://{real_s3_env['bucket']}/ds", env))
    paths, docs = inputs
    prepare_cli(target, paths)
    manifest = read_manifest(target.store)
    assert b"".join(target.store.get(s.name) for s in manifest.shards) == b"".join(d + b"\0" for d in docs)
