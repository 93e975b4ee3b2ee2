"""manifests/: the rendered 128-GPU examples and the default platform chart stay fresh, valid and credential-free."""

from __future__ import annotations

import base64
import re

import pytest
from typer.testing import CliRunner

from mlstm_platform.chart import parse_objects
from mlstm_platform.cli import app
from mlstm_platform.regen_manifests import REDACTED, REGEN_COMMAND, expected_manifests, manifests_dir, stale_manifests
from tests.conftest_k8s import validate_object

FILES = ["job-128gpu-16x8.yaml", "job-128gpu-128x1.yaml", "platform.yaml"]


def test_manifests_are_fresh() -> None:
    stale = stale_manifests()
    assert not stale, f"{', '.join('manifests/' + f for f in stale)} stale; regenerate with: {REGEN_COMMAND}"


@pytest.mark.parametrize("file", FILES)
def test_manifest_objects_validate(file: str) -> None:
    for obj in parse_objects((manifests_dir() / file).read_text(encoding="utf-8")):
        validate_object(obj)


@pytest.mark.parametrize("file, pods, per_pod", [("job-128gpu-16x8.yaml", 16, 8), ("job-128gpu-128x1.yaml", 128, 1)])
def test_job_examples_are_the_128_gpu_run(file: str, pods: int, per_pod: int) -> None:
    job = next(o for o in parse_objects((manifests_dir() / file).read_text()) if o["kind"] == "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"] + replicas["Worker"]["replicas"], job["spec"]["nprocPerNode"]) == (pods, str(per_pod))


@pytest.mark.parametrize("file", FILES[:2])
def test_job_examples_equal_the_cli_command_in_their_header(file: str) -> None:
    text = expected_manifests()[file]
    command = re.search(r"^# Equivalent to: mlstm (.+)$", text, flags=re.MULTILINE).group(1).split()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert text.split("\n", 2)[2] == result.output


def test_platform_example_holds_no_generated_credential() -> None:
    secret = next(o for o in parse_objects((manifests_dir() / "platform.yaml").read_text()) if o["kind"] == "Secret")
    assert set(secret["data"].values()) == {REDACTED}
    assert base64.b64decode(REDACTED) == b"generated-at-install"
