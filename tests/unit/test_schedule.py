"""The learning-rate schedule is a pure function of the update index."""

from __future__ import annotations

import math

import pytest

from mlstm_trainer.config import OptimConfig
from mlstm_trainer.schedule import LRSchedule, build_schedule, peak_learning_rate


@pytest.mark.parametrize(
    "rule, batch, expected",
    [
        pytest.param("none", 32768, 5e-4, id="none"),
        pytest.param("linear", 256, 1e-3, id="linear-2x"),
        pytest.param("sqrt", 512, 1e-3, id="sqrt-4x"),
        pytest.param("linear", 32768, 3e-3, id="linear-capped"),
        pytest.param("sqrt", 32768, 3e-3, id="sqrt-capped"),
        pytest.param("sqrt", 32, 2.5e-4, id="sqrt-small-batch"),
    ],
)
def test_peak_lr_scales_with_global_batch_and_is_capped(rule, batch, expected):
    assert peak_learning_rate(5e-4, batch, rule, cap=3e-3) == pytest.approx(expected)


def test_warmup_then_linear_decay_to_zero():
    schedule = LRSchedule(peak=1.0, warmup_steps=4, decay_steps=10)
    assert [schedule(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.5)
    assert schedule(14) == 0.0
    assert schedule(1000) == 0.0  # never negative past the end


def test_decay_over_the_run_when_decay_steps_is_zero():
    schedule = build_schedule(OptimConfig(steps=100, warmup_steps=10, decay_steps=0, lr=1e-3, lr_scaling="none"), 128)
    assert schedule.decay_steps == 90
    assert schedule(99) == pytest.approx(1e-3 / 90)
    assert all(schedule(i) >= schedule(i + 1) for i in range(10, 120))


def test_schedule_is_monotone_in_warmup():
    schedule = build_schedule(OptimConfig(steps=50, warmup_steps=20, lr=2e-3, lr_scaling="sqrt"), 512)
    values = [schedule(i) for i in range(20)]
    assert values == sorted(values)
    # sqrt(512 / 128) * 2e-3 = 4e-3, above the 3e-3 cap: warm-up ends at the cap.
    assert math.isclose(values[-1], 3e-3)
