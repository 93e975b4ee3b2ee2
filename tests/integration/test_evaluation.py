"""Validation bits per character: during training, deterministic, and the same on 1 or 2 ranks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlstm_platform.cli import app
from mlstm_trainer.__main__ import main as trainer_main
from mlstm_trainer.evaluate import evaluate_checkpoint
from tests.conftest import tiny_args
from tests.integration.torchrun import read_log, run


def test_validation_is_logged_every_n_steps_and_at_the_end(tmp_path):
    log = tmp_path / "log.jsonl"
    assert trainer_main(tiny_args(tmp_path / "c", "--steps", "25", "--eval-every", "10", "--log-jsonl", str(log))) == 0
    records = read_log(log)
    assert [s for s, r in records.items() if "val_bpc" in r] == [10, 20, 25]
    assert 4.0 < records[25]["val_bpc"] < 8.5  # a barely trained model is near uniform (8 bits)


def test_evaluation_is_deterministic_and_matches_the_training_log(tmp_path):
    log = tmp_path / "log.jsonl"
    assert trainer_main(tiny_args(tmp_path / "c", "--steps", "30", "--eval-every", "30", "--lr", "3e-3",
                                  "--log-jsonl", str(log))) == 0
    first = evaluate_checkpoint(str(tmp_path / "c"))
    second = evaluate_checkpoint(str(tmp_path / "c"))
    assert first == second
    assert first.bpc == pytest.approx(read_log(log)[30]["val_bpc"], rel=1e-6)
    assert first.bpc < 8.0  # 30 steps at lr 3e-3 already beat the uniform 8 bits


def test_two_ranks_report_the_same_validation_as_one_process(tmp_path, trainer_env):
    """The 2-rank run evaluates its final weights with each rank reading half the validation rows;
    one process evaluating that checkpoint reads them all."""
    log = tmp_path / "log.jsonl"
    result = run(tiny_args(tmp_path / "c", "--steps", "12", "--eval-every", "12", "--log-jsonl", str(log)),
                 trainer_env, nproc=2)
    assert result.returncode == 0, result.stderr
    two_ranks = read_log(log)[12]["val_bpc"]
    one_process = evaluate_checkpoint(str(tmp_path / "c"))
    assert one_process.bpc == pytest.approx(two_ranks, rel=1e-5)


def test_eval_command_prints_bpc_and_characters(tmp_path):
    assert trainer_main(tiny_args(tmp_path / "c", "--steps", "2")) == 0
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "c"), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "val bits per character:" in result.output
    assert "over 1,536 characters" in result.output  # 16 rows x 3 batches x 32 characters


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--split", "test"], "has no test split", id="no-test-split"),
        pytest.param(["--split", "train"], "--split must be val or test", id="bad-split"),
    ],
)
def test_eval_command_errors_are_one_line(tmp_path, args, message):
    assert trainer_main(tiny_args(tmp_path / "c", "--steps", "1")) == 0
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "c"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
