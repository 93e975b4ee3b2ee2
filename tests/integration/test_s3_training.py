"""Training from shards on a loopback S3 server (moto): prepare -> manifest -> stream -> train -> checkpoint."""

from __future__ import annotations

import json

import pytest
from moto.server import ThreadedMotoServer

from mlstm_trainer.checkpoint import Checkpointer
from mlstm_trainer.storage import S3Store, s3_settings_from_env
from tests.conftest import tiny_args
from tests.integration.torchrun import read_log, run, start, wait_for_step
from tests.s3_fixtures import make_bucket, s3_vars


def write_corpus(folder, documents: int = 60) -> list[str]:
    """Real English text (Python's own pydoc topics), one file per topic."""
    from pydoc_data.topics import topics

    folder.mkdir()
    paths = []
    for index, key in enumerate(sorted(topics)[:documents]):
        path = folder / f"{index:03d}.txt"
        path.write_text(topics[key], encoding="utf-8")
        paths.append(str(path))
    return paths


def prepare(paths: list[str], url: str, env: dict[str, str], *extra: str) -> None:
    from typer.testing import CliRunner

    from mlstm_platform.cli import app

    result = CliRunner().invoke(app, ["data", "prepare", *paths, "--out", url, "--shard-bytes", "64KiB", *extra], env=env)
    assert result.exit_code == 0, result.output


@pytest.fixture
def dataset(tmp_path, s3_env):
    env = {k: v for k, v in s3_env.items() if k != "bucket"}
    url = f"s3://{s3_env['bucket']}/pydoc"
    prepare(write_corpus(tmp_path / "text"), url, env, "--val-shards", "1")
    return url, env


def test_train_from_s3_shards_and_checkpoint_to_s3(tmp_path, dataset, trainer_env):
    url, env = dataset
    bucket = url.split("/")[2]
    log = tmp_path / "log.jsonl"
    result = run(tiny_args(f"s3://{bucket}/run", "--data", url, "--steps", "30", "--log-jsonl", str(log)), trainer_env | env)
    assert result.returncode == 0, result.stderr
    records = read_log(log)
    assert sorted(records) == list(range(1, 31))
    assert records[30]["loss"] < records[1]["loss"]
    store = S3Store(f"s3://{bucket}/run", s3_settings_from_env(env))
    assert Checkpointer(store.url(), store=store).latest() == "step-00000030"
    assert store.get("latest") == b"step-00000030"


def test_corrupt_shard_stops_with_a_line_naming_it(tmp_path, dataset, trainer_env):
    url, env = dataset
    store = S3Store(url, s3_settings_from_env(env))
    manifest = json.loads(store.get("manifest.json"))
    victim = next(s for s in manifest["shards"] if s["split"] == "train")
    data = bytearray(store.get(victim["name"]))
    data[10] ^= 0xFF
    store.put(victim["name"], bytes(data))
    result = run(tiny_args(tmp_path / "c", "--data", url, "--steps", "5"), trainer_env | env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"shard {url}/{victim['name']} is corrupt" in lines[0]


def test_unknown_manifest_version_is_refused(tmp_path, dataset, trainer_env):
    url, env = dataset
    store = S3Store(url, s3_settings_from_env(env))
    manifest = json.loads(store.get("manifest.json"))
    store.put("manifest.json", json.dumps({**manifest, "format_version": 99}).encode())
    result = run(tiny_args(tmp_path / "c", "--data", url, "--steps", "5"), trainer_env | env)
    assert result.returncode == 2
    assert "has format_version 99, this trainer reads 1" in result.stderr


def test_s3_server_lost_mid_run_fails_clearly_and_keeps_latest(tmp_path, trainer_env):
    """A server of our own that we stop mid-run; moto keeps its buckets in this process, so a second
    server started afterwards shows what the first one held when it went away."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = s3_vars(f"http://{host}:{port}")
    bucket = make_bucket(env)
    log = tmp_path / "log.jsonl"
    args = tiny_args(f"s3://{bucket}/run", "--steps", "100000", "--checkpoint-every", "5", "--retry-seconds", "2",
                     "--log-jsonl", str(log))
    proc = start(args, trainer_env | env)
    try:
        wait_for_step(log, 6, proc)
    finally:
        server.stop()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr  # one line, no traceback
    # Which write meets the dead server is a race: the state object, the `latest` pointer or the
    # pruning listing. Each is retried and reported the same way, naming the run's objects.
    assert "failed after retrying for 2s" in errors[0] and f"s3://{bucket}/run" in errors[0]

    second = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    second.start()
    try:
        host, port = second.get_host_and_port()
        store = S3Store(f"s3://{bucket}/run", s3_settings_from_env(s3_vars(f"http://{host}:{port}")))
        latest = Checkpointer(store.url(), store=store).latest()
        assert latest is not None and int(latest.split("-")[1]) % 5 == 0
        assert Checkpointer(store.url(), store=store).load(latest)["trainer"]["step"] == int(latest.split("-")[1])
        assert max(read_log(log)) > int(latest.split("-")[1])  # it trained past the last good checkpoint
    finally:
        second.stop()


def test_prepare_train_and_resume_against_a_real_minio(tmp_path, real_s3_env, trainer_env):
    """Opt-in (MLSTM_TEST_S3_ENDPOINT): the same path as above against a real MinIO/S3 server."""
    env = {k: v for k, v in real_s3_env.items() if k != "bucket"}
    url = f"s3://{real_s3_env['bucket']}/pydoc"
    prepare(write_corpus(tmp_path / "text", documents=20), url, env)
    run_url = f"s3://{real_s3_env['bucket']}/run"
    first = run(tiny_args(run_url, "--data", url, "--steps", "3", "--eval-every", "0"), trainer_env | env)
    assert first.returncode == 0, first.stderr
    again = run(tiny_args(run_url, "--data", url, "--steps", "5", "--eval-every", "0"), trainer_env | env)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {run_url}/step-00000003 at step 3" in again.stderr
