"""Config dataclasses, the config file, environment variables and flags, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from mlstm_trainer.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from mlstm_trainer.options import env_name, load_config


def test_defaults_round_trip_through_a_dict():
    config = TrainConfig()
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "values, message",
    [
        pytest.param({"optim": {"lr": -1}}, "optim.lr must be > 0, got -1.0", id="negative-lr"),
        pytest.param({"data": {"batch_size": 0}}, "data.batch_size must be > 0, got 0", id="zero-batch"),
        pytest.param({"precision": {"mode": "fp8"}}, "precision.mode must be one of fp32, fp16, bf16, got 'fp8'", id="precision"),
        pytest.param({"optim": {"lr_scaling": "cube"}}, "optim.lr_scaling must be one of none, linear, sqrt", id="scaling"),
        pytest.param({"model": {"hidden": 5}}, "model.hidden is not a known setting", id="unknown-key"),
        pytest.param({"model": {"hidden_size": "big"}}, "model.hidden_size must be int, got 'big'", id="wrong-type"),
        pytest.param({"model": 3}, "model must be a mapping", id="section-not-mapping"),
        pytest.param({"metrics": {"port": 70000}}, "metrics.port must be in 0..65535", id="port-range"),
        pytest.param({"checkpoint": {"keep": 0}}, "checkpoint.keep must be >= 1", id="keep"),
        pytest.param({"device": "tpu"}, "device must be one of auto, cpu, cuda", id="device"),
    ],
)
def test_invalid_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_precedence_defaults_file_env_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model:\n  hidden_size: 96\n  embed_dim: 8\noptim:\n  lr: 0.01\n  steps: 7\n")
    env = {"MLSTM_EMBED_DIM": "16", "MLSTM_STEPS": "9"}
    config = load_config(["--config", str(config_file), "--steps", "11"], environ=env)
    assert config.model.hidden_size == 96  # from the file
    assert config.optim.lr == 0.01  # from the file
    assert config.model.embed_dim == 16  # env beats the file
    assert config.optim.steps == 11  # the flag beats env and file
    assert config.data.seq_len == TrainConfig().data.seq_len  # untouched default


def test_json_config_and_config_from_env(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"precision": {"mode": "bf16"}, "seed": 7}))
    config = load_config([], environ={"MLSTM_CONFIG": str(config_file)})
    assert config.precision.mode == "bf16"
    assert config.seed == 7


def test_every_flag_has_an_env_var_of_the_same_name():
    assert env_name("--hidden-size") == "MLSTM_HIDDEN_SIZE"
    assert env_name("--log-jsonl") == "MLSTM_LOG_JSONL"


@pytest.mark.parametrize(
    "argv, env, message",
    [
        pytest.param(["--lr", "-1"], {}, "optim.lr must be > 0, got -1.0", id="flag"),
        pytest.param(["--lr", "fast"], {}, "optim.lr must be float, got 'fast' (from --lr)", id="flag-type"),
        pytest.param([], {"MLSTM_BATCH_SIZE": "x"}, "data.batch_size must be int, got 'x' (from MLSTM_BATCH_SIZE)", id="env-type"),
        pytest.param(["--config", "/nonexistent.yaml"], {}, "config file /nonexistent.yaml not found", id="missing-file"),
    ],
)
def test_bad_flags_and_env(argv, env, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv, environ=env)
    assert message in str(err.value)


def test_broken_yaml_is_one_line(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(config_file)], environ={})
    assert str(err.value).startswith(f"config file {config_file} is not valid YAML")
    assert "\n" not in str(err.value)
