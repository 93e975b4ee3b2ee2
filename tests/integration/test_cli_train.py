"""`mlstm train` and `mlstm sample` through the typer app, as a user types them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlstm_platform.cli import app
from tests.conftest import tiny_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(app, ["train", *tiny_args(folder, "--steps", "3")])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output
    return str(folder)


def test_sample_continues_the_prompt(checkpoint):
    result = CliRunner().invoke(app, ["sample", checkpoint, "--prompt", "The ", "--length", "40", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The ")
    again = CliRunner().invoke(app, ["sample", checkpoint, "--prompt", "The ", "--length", "40", "--seed", "3"])
    assert again.output == result.output  # seeded: the same text twice


def test_sample_at_temperature_zero_is_greedy_and_deterministic(checkpoint):
    outputs = {CliRunner().invoke(app, ["sample", f"{checkpoint}/step-00000003", "--temperature", "0",
                                        "--length", "20", "--seed", str(seed)]).output for seed in (1, 2)}
    assert len(outputs) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["train", "--lr", "-1"], "optim.lr must be > 0, got -1.0", id="train-bad-lr"),
        pytest.param(["train", "--precision", "fp8"], "precision.mode must be one of fp32, fp16, bf16", id="train-bad-precision"),
        pytest.param(["train", "--bogus"], "unrecognized arguments: --bogus", id="train-unknown-flag"),
        pytest.param(["train", "--data", "/nonexistent/text"], "corpus path '/nonexistent/text' does not exist", id="train-missing-data"),
        pytest.param(["sample", "/nonexistent/run"], "no checkpoint found at /nonexistent/run", id="sample-missing"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, [*args, *(["--checkpoint-dir", str(tmp_path)] if args[0] == "train" else [])])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list(tmp_path.iterdir())  # nothing written
