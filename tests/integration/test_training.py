"""The trainer end to end on the CPU: it learns, mixed precision tracks fp32, and it resumes exactly."""

from __future__ import annotations

import signal

import pytest

from mlstm_trainer.__main__ import main as trainer_main
from tests.conftest import tiny_args
from tests.integration.torchrun import read_log, run, start, wait_for_step


def mean_loss(log: dict[int, dict], last: int) -> float:
    steps = sorted(log)[-last:]
    return sum(log[s]["loss"] for s in steps) / len(steps)


def test_loss_falls_well_below_uniform(tmp_path):
    log_path = tmp_path / "log.jsonl"
    args = tiny_args(tmp_path / "ckpt", "--hidden-size", "128", "--steps", "250", "--lr", "3e-3",
                     "--lr-scaling", "none", "--log-jsonl", str(log_path))
    assert trainer_main(args) == 0
    log = read_log(log_path)
    assert sorted(log) == list(range(1, 251))
    first, final = log[1]["bpc"], mean_loss(log, 20) / 0.6931471805599453
    assert first == pytest.approx(8.0, abs=0.3)  # uniform over 256 bytes at initialisation
    assert final < 4.0, f"bits per character only fell to {final:.2f}"  # half of uniform
    assert log[250]["tokens"] == 250 * 8 * 32
    assert log[250]["skipped"] == 0


@pytest.mark.parametrize("precision", [pytest.param("fp16", id="fp16"), pytest.param("bf16", id="bf16")])
def test_mixed_precision_tracks_fp32(tmp_path, precision):
    losses = {}
    for mode in ("fp32", precision):
        log_path = tmp_path / f"{mode}.jsonl"
        args = tiny_args(tmp_path / mode, "--steps", "60", "--lr", "3e-3", "--lr-scaling", "none",
                         "--precision", mode, "--log-jsonl", str(log_path))
        assert trainer_main(args) == 0
        log = read_log(log_path)
        losses[mode] = mean_loss(log, 10)
        if mode == "fp16":
            assert log[60]["loss_scale"] >= 1.0
    assert losses["fp32"] < 5.0  # it learned something in 60 steps (uniform is 5.55 nats)
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.03)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    """A loss scale of 2^126 overflows fp16 gradients: each such step is skipped and counted."""
    config = tmp_path / "overflow.yaml"
    config.write_text("precision:\n  mode: fp16\n  init_scale: 8.5e37\n")
    log_path = tmp_path / "log.jsonl"
    assert trainer_main(["--config", str(config), *tiny_args(tmp_path / "c", "--steps", "3", "--log-jsonl", str(log_path))]) == 0
    log = read_log(log_path)
    assert log[1]["skipped"] == 1
    assert log[2]["loss_scale"] == log[1]["loss_scale"] / 2 or log[2]["skipped"] == 1


def test_sigkill_and_restart_reproduces_the_uninterrupted_losses(tmp_path, trainer_env):
    steps = ["--steps", "40", "--checkpoint-every", "10"]
    straight = tmp_path / "straight.jsonl"
    done = run(tiny_args(tmp_path / "a", *steps, "--log-jsonl", str(straight)), trainer_env)
    assert done.returncode == 0, done.stderr

    resumed = tmp_path / "resumed.jsonl"
    args = tiny_args(tmp_path / "b", *steps, "--log-jsonl", str(resumed))
    proc = start(args, trainer_env)
    wait_for_step(resumed, 15, proc, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_log(resumed))
    assert killed_at < 40, "the run finished before it could be killed"
    restarted = run(args, trainer_env)
    assert restarted.returncode == 0, restarted.stderr
    assert "resumed from" in restarted.stderr + restarted.stdout

    expected, got = read_log(straight), read_log(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    for step in expected:
        assert got[step]["loss"] == expected[step]["loss"], f"step {step} differs after resume"
        assert got[step]["lr"] == expected[step]["lr"]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, trainer_env):
    log_path = tmp_path / "log.jsonl"
    proc = start(tiny_args(tmp_path / "c", "--steps", "100000", "--checkpoint-every", "0", "--log-jsonl", str(log_path)),
                 trainer_env)
    wait_for_step(log_path, 3, proc, timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    last = max(read_log(log_path))
    assert (tmp_path / "c" / f"step-{last:08d}" / "state.pt").is_file()


def test_resume_with_another_model_shape_is_refused(tmp_path, capsys):
    assert trainer_main(tiny_args(tmp_path / "c", "--steps", "2")) == 0
    capsys.readouterr()
    assert trainer_main(tiny_args(tmp_path / "c", "--steps", "4", "--hidden-size", "32")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.hidden_size is 32 but the checkpoint" in err
    assert len(err.splitlines()) == 1
