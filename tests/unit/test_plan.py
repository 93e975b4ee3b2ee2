"""`mlstm plan`: the documented time model, its inputs, and its errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlstm_platform.cli import app
from mlstm_platform.plan import PlanInput, count_parameters, make_plan, measured_tokens_per_s_per_gpu
from mlstm_trainer.model import MLSTM


def test_parameter_count_is_the_real_model_s():
    assert count_parameters(32, 8) == MLSTM(vocab_size=256, embed_dim=8, hidden_size=32).num_parameters()


def test_plan_follows_the_documented_formulas():
    spec = PlanInput(gpus=4, dataset_bytes=1e9, epochs=2, tokens_per_s_per_gpu=1e5, hidden_size=64, embed_dim=8,
                     global_batch=128, seq_len=100, grad_bytes=2, link_gbps=8.0)
    plan = make_plan(spec)
    params = count_parameters(64, 8)
    assert plan.steps == pytest.approx(2e9 / 12800)
    assert plan.compute_seconds_per_step == pytest.approx(12800 / 4e5)
    assert plan.allreduce_seconds_per_step == pytest.approx(1.5 * params * 2 / 1e9)
    assert plan.wall_seconds == pytest.approx(plan.steps * (plan.compute_seconds_per_step + plan.allreduce_seconds_per_step))
    assert plan.gpu_hours == pytest.approx(plan.wall_seconds * 4 / 3600)


def test_single_gpu_has_no_all_reduce():
    plan = make_plan(PlanInput(gpus=1, dataset_bytes=1e6, epochs=1, tokens_per_s_per_gpu=1e4, hidden_size=32, embed_dim=8))
    assert plan.allreduce_seconds_per_step == 0.0


def test_more_gpus_finish_sooner_but_spend_more_on_all_reduce():
    common = dict(dataset_bytes=40e9, epochs=3, tokens_per_s_per_gpu=1e5)
    small, large = make_plan(PlanInput(gpus=8, **common)), make_plan(PlanInput(gpus=128, **common))
    assert large.wall_seconds < small.wall_seconds
    assert large.allreduce_share > small.allreduce_share


def test_measured_throughput_is_per_gpu_median(tmp_path):
    log = tmp_path / "log.jsonl"
    rates = [10.0, 900.0, 1000.0, 1100.0, 1000.0]  # the first (warm-up) record is skipped
    log.write_text("".join(json.dumps({"step": i, "tokens_per_s": 2 * r, "world_size": 2}) + "\n" for i, r in enumerate(rates)))
    assert measured_tokens_per_s_per_gpu(log) == 1000.0


def test_cli_prints_the_verdict():
    result = CliRunner().invoke(app, ["plan", "--gpus", "128", "--dataset-bytes", "40e9", "--epochs", "3",
                                      "--tokens-per-s-per-gpu", "100000"])
    assert result.exit_code == 0, result.output
    assert "86.3 M parameters" in result.output
    assert "fits in 4 hours" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--gpus", "8", "--dataset-bytes", "1e9"], "pass exactly one of", id="no-throughput"),
        pytest.param(["--gpus", "0", "--dataset-bytes", "1e9", "--tokens-per-s-per-gpu", "5"], "--gpus must be > 0", id="zero-gpus"),
        pytest.param(["--gpus", "8", "--dataset-bytes", "1e9", "--measured", "/nonexistent.jsonl"], "--measured /nonexistent.jsonl", id="missing-log"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
