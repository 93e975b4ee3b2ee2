"""Trainer metrics: every name the issue promises, their values after a step, labels, serving, and MFU."""

from __future__ import annotations

import inspect
import math
import socket
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry

from mlstm_trainer.config import ConfigError, TrainConfig, config_from_dict
from mlstm_trainer.distributed import DistContext
from mlstm_trainer.hardware import PEAK_TFLOPS_ENV, model_flops_utilization, peak_flops, table_peak_flops
from mlstm_trainer.metrics import LABELS, MetricsPortError, NullMetrics, TrainerMetrics
from mlstm_trainer.report import StepStats
from mlstm_trainer.trainer import Trainer

LABEL_VALUES = {"job": "run-a", "rank": "3", "node": "node-7"}
BUILD_LABELS = {"version", "precision", "hidden_size", "world_size"}

# Sample names from the issue (counters as exposed, with _total; the histogram by its _count).
ISSUE_SAMPLES = (
    "mlstm_tokens_total", "mlstm_loss", "mlstm_bits_per_character", "mlstm_validation_bits_per_character",
    "mlstm_step_duration_seconds_count", "mlstm_data_wait_seconds_total", "mlstm_learning_rate",
    "mlstm_loss_scale", "mlstm_grad_norm", "mlstm_overflow_steps_total", "mlstm_step", "mlstm_epoch",
    "mlstm_model_flops_utilization", "mlstm_run_progress_ratio", "mlstm_eta_seconds",
)


def stats(step: int = 1, *, loss: float = 2.0, skipped: int = 0, **overrides: float) -> StepStats:
    values = dict(
        step=step, loss=loss, lr=1e-3, tokens=step * 512, tokens_per_s=1000.0, loss_scale=65536.0, grad_norm=0.5,
        skipped=skipped, epoch=1, world_size=2, step_seconds=0.2, data_wait_seconds=0.01, progress=0.25, eta_seconds=60.0,
    )
    values.update(overrides)
    return StepStats(**values)


@pytest.fixture
def metrics() -> TrainerMetrics:
    return TrainerMetrics(job="run-a", rank=3, node="node-7", registry=CollectorRegistry())


def value(metrics: TrainerMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, LABEL_VALUES)


@pytest.mark.parametrize("name", ISSUE_SAMPLES)
def test_issue_metric_is_exported_with_job_rank_node(metrics, name):
    metrics.record_step(stats(), rank_tokens=256, mfu=0.4)
    metrics.record_validation(1.3)
    assert value(metrics, name) is not None


def test_labels_are_limited_to_job_rank_node(metrics):
    metrics.set_build_info(version="0.1.0", precision="fp16", hidden_size=4096, world_size=128)
    metrics.record_step(stats(), rank_tokens=256, mfu=0.4)
    metrics.record_validation(1.3)
    for family in metrics.registry.collect():
        allowed = set(LABELS) | (BUILD_LABELS if family.name == "mlstm_build_info" else set()) | {"le"}
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample
            assert sample.name.startswith("mlstm_")


def test_documentation_on_every_metric(metrics):
    assert all(family.documentation for family in metrics.registry.collect())


def test_record_step_sets_each_value(metrics):
    metrics.record_step(stats(step=7, loss=math.log(2) * 1.5, epoch=2), rank_tokens=256, mfu=0.31)
    metrics.record_step(stats(step=8, loss=math.log(2) * 1.25, epoch=2, step_seconds=0.3), rank_tokens=256, mfu=0.33)
    assert value(metrics, "mlstm_tokens_total") == 512
    assert value(metrics, "mlstm_loss") == pytest.approx(math.log(2) * 1.25)
    assert value(metrics, "mlstm_bits_per_character") == pytest.approx(1.25)
    assert value(metrics, "mlstm_step_duration_seconds_count") == 2
    assert value(metrics, "mlstm_step_duration_seconds_sum") == pytest.approx(0.5)
    assert value(metrics, "mlstm_data_wait_seconds_total") == pytest.approx(0.02)
    assert value(metrics, "mlstm_learning_rate") == 1e-3
    assert value(metrics, "mlstm_loss_scale") == 65536.0
    assert value(metrics, "mlstm_grad_norm") == 0.5
    assert (value(metrics, "mlstm_step"), value(metrics, "mlstm_epoch")) == (8, 2)
    assert value(metrics, "mlstm_model_flops_utilization") == 0.33
    assert value(metrics, "mlstm_run_progress_ratio") == 0.25
    assert value(metrics, "mlstm_eta_seconds") == 60.0


def test_overflow_counter_counts_new_skips_only(metrics):
    for step, skipped in ((1, 0), (2, 1), (3, 1), (4, 3)):
        metrics.record_step(stats(step=step, skipped=skipped), rank_tokens=1, mfu=None)
    assert value(metrics, "mlstm_overflow_steps_total") == 3


def test_resume_does_not_recount_checkpointed_overflows(metrics):
    metrics.resume_from(5)  # the checkpoint had 5 skipped steps; this process counts from here
    metrics.record_step(stats(step=101, skipped=6), rank_tokens=1, mfu=None)
    assert value(metrics, "mlstm_overflow_steps_total") == 1


@pytest.mark.parametrize("name", ["mlstm_validation_bits_per_character", "mlstm_model_flops_utilization"])
def test_unknown_values_are_absent_not_zero(metrics, name):
    # No evaluation yet / no known peak: the series is missing, so no panel shows a fake 0.
    metrics.record_step(stats(), rank_tokens=1, mfu=None)
    assert value(metrics, name) is None


def test_build_info_carries_the_run_shape(metrics):
    metrics.set_build_info(version="0.1.0", precision="fp16", hidden_size=4096, world_size=128)
    labels = {**LABEL_VALUES, "version": "0.1.0", "precision": "fp16", "hidden_size": "4096", "world_size": "128"}
    assert metrics.registry.get_sample_value("mlstm_build_info", labels) == 1


def test_null_metrics_accepts_every_call_of_trainer_metrics():
    public = [n for n, f in inspect.getmembers(TrainerMetrics, inspect.isfunction) if not n.startswith("_")]
    for name in public:
        assert inspect.signature(getattr(NullMetrics, name)).parameters.keys() <= inspect.signature(
            getattr(TrainerMetrics, name)).parameters.keys() | {"_"}, name
    null = NullMetrics()
    null.set_build_info(version="0", precision="fp32", hidden_size=1, world_size=1)
    null.record_step(stats(), rank_tokens=1, mfu=None)
    null.record_validation(1.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_exposes_metrics_over_http(metrics):
    port = free_port()
    metrics.serve("127.0.0.1", port)
    metrics.record_step(stats(), rank_tokens=256, mfu=None)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert 'mlstm_tokens_total{job="run-a",node="node-7",rank="3"} 256.0' in text


def test_serve_on_a_busy_port_is_a_one_line_error(metrics):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(MetricsPortError, match=r"metrics\.port \d+ .*--metrics-port"):
            metrics.serve("127.0.0.1", busy.getsockname()[1])


@pytest.mark.parametrize(
    "device, precision, tflops",
    [
        pytest.param("NVIDIA H100 80GB HBM3", "bf16", 989.4, id="h100-sxm-bf16"),
        pytest.param("NVIDIA H100 PCIe", "fp16", 756.0, id="h100-pcie"),
        pytest.param("NVIDIA H200", "fp32", 66.9, id="h200-fp32"),
        pytest.param("NVIDIA A100-SXM4-80GB", "fp16", 312.0, id="a100"),
        pytest.param("Tesla V100-SXM2-16GB", "fp16", 125.0, id="v100-sxm2"),
        pytest.param("Tesla V100-PCIE-16GB", "fp32", 14.0, id="v100-pcie-fp32"),
        pytest.param("NVIDIA L40S", "bf16", 362.0, id="l40s-not-l4"),
        pytest.param("NVIDIA GeForce GTX 1080", "fp16", None, id="unknown"),
    ],
)
def test_peak_table(device, precision, tflops):
    expected = None if tflops is None else tflops * 1e12
    assert table_peak_flops(device, precision) == expected


def test_cpu_peak_is_unknown_without_override(monkeypatch):
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    assert peak_flops(torch.device("cpu"), "fp32") is None


def test_peak_override_from_environment(monkeypatch):
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "0.5")
    assert peak_flops(torch.device("cpu"), "fp32") == 0.5e12


@pytest.mark.parametrize("bad", ["fast", "0", "-3"])
def test_bad_peak_override_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(PEAK_TFLOPS_ENV, bad)
    with pytest.raises(ConfigError, match=PEAK_TFLOPS_ENV):
        peak_flops(torch.device("cpu"), "fp32")


def test_mfu_is_model_flops_over_peak():
    assert model_flops_utilization(6e9, 1000.0, 1e13) == pytest.approx(0.6)
    assert model_flops_utilization(6e9, 1000.0, None) is None
    assert model_flops_utilization(6e9, 0.0, 1e13) is None


def test_trainer_feeds_metrics_and_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "0.01")
    config = config_from_dict({
        "model": {"hidden_size": 32, "embed_dim": 8}, "data": {"batch_size": 2, "seq_len": 16},
        "optim": {"steps": 3}, "checkpoint": {"dir": str(tmp_path)}, "device": "cpu",
    }, base=TrainConfig())
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), node="node-7")
    metrics = TrainerMetrics(job="run-a", rank=0, node="node-7", registry=CollectorRegistry())
    trainer = Trainer(config, ctx, metrics=metrics)
    seen: list[StepStats] = []
    record_step = metrics.record_step
    monkeypatch.setattr(metrics, "record_step", lambda s, **kw: (seen.append(s), record_step(s, **kw)))
    trainer.train(show_progress=False)
    labels = {"job": "run-a", "rank": "0", "node": "node-7"}
    assert metrics.registry.get_sample_value("mlstm_tokens_total", labels) == 3 * 2 * 16
    expected_mfu = trainer.model.flops_per_token() * seen[-1].tokens_per_s / 0.01e12
    assert metrics.registry.get_sample_value("mlstm_model_flops_utilization", labels) == pytest.approx(expected_mfu)
