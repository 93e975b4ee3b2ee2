"""Shared fixtures: tiny training settings that run in seconds on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The loopback S3 server (moto) fixtures live in their own module.
pytest_plugins = ["tests.s3_fixtures"]


def tiny_args(checkpoint_dir: Path | str, *extra: str) -> list[str]:
    """Trainer flags for a model small enough to train a few dozen steps in seconds."""
    return [
        "--hidden-size", "64", "--embed-dim", "16", "--batch-size", "8", "--seq-len", "32",
        "--checkpoint-dir", str(checkpoint_dir), "--metrics-port", "0", "--device", "cpu", *extra,
    ]


@pytest.fixture
def trainer_env() -> dict[str, str]:
    """Environment for trainer subprocesses: unbuffered, and no inherited MLSTM_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSTM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: on a busy 2-core machine OpenMP's thread hand-offs cost far more than the math."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
