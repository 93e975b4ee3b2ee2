"""Build a TrainConfig from defaults < config file < environment variables < command-line flags.

Each flag maps to one dotted config field and has an environment variable of the same name
(``--hidden-size`` <-> ``MLSTM_HIDDEN_SIZE``), so pods can be configured from their manifest.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, TrainConfig, coerce, config_from_dict, field_doc, field_type, set_dotted

# flag -> dotted config field. The order is the order of `--help`.
FLAGS: dict[str, str] = {
    "--data": "data.path",
    "--batch-size": "data.batch_size",
    "--seq-len": "data.seq_len",
    "--hidden-size": "model.hidden_size",
    "--embed-dim": "model.embed_dim",
    "--steps": "optim.steps",
    "--lr": "optim.lr",
    "--lr-scaling": "optim.lr_scaling",
    "--lr-cap": "optim.lr_cap",
    "--warmup-steps": "optim.warmup_steps",
    "--decay-steps": "optim.decay_steps",
    "--grad-clip": "optim.grad_clip",
    "--precision": "precision.mode",
    "--eval-every": "eval.every",
    "--eval-rows": "eval.rows",
    "--eval-max-steps": "eval.max_steps",
    "--val-fraction": "data.val_fraction",
    "--checkpoint-dir": "checkpoint.dir",
    "--checkpoint-every": "checkpoint.every",
    "--keep-checkpoints": "checkpoint.keep",
    "--metrics-port": "metrics.port",
    "--metrics-host": "metrics.host",
    "--log-jsonl": "metrics.log_jsonl",
    "--log-every": "metrics.log_every",
    "--job-name": "metrics.job",
    "--seed": "seed",
    "--device": "device",
    "--cuda-graphs": "cuda_graphs",
    "--sample-chars": "sample_chars",
    "--retry-seconds": "retry_seconds",
}
CONFIG_ENV = "MLSTM_CONFIG"


def env_name(flag: str) -> str:
    """Environment variable that sets the same field as `flag`."""
    return "MLSTM_" + flag.lstrip("-").replace("-", "_").upper()


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "mlstm train") -> argparse.ArgumentParser:
    """The trainer's flags; every one also settable in the config file and the environment."""
    parser = _OneLineParser(
        prog=prog,
        description="Train a byte-level multiplicative LSTM. Resumes from the latest checkpoint in --checkpoint-dir.",
    )
    parser.add_argument("--config", help=f"YAML or JSON config file (env {CONFIG_ENV}); flags override it")
    for flag, dotted in FLAGS.items():
        # Values stay strings here and are converted with the field's own type, so flags,
        # files and environment variables share one set of conversion and error messages.
        parser.add_argument(flag, dest=dotted, metavar=field_type(dotted).__name__.upper(),
                            help=f"{field_doc(dotted)} [{dotted}; env {env_name(flag)}]")
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a nested dict."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML or JSON file to --config")
    text = file.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {first}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, optim:, ...)")
    return values


def load_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Parse flags and merge them over the environment, the config file and the defaults."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(list(argv))
    config_path = args.config or environ.get(CONFIG_ENV, "")
    config = config_from_dict(read_config_file(config_path)) if config_path else TrainConfig()
    overrides: dict[str, Any] = {}
    for flag, dotted in FLAGS.items():
        raw = getattr(args, dotted)
        source = flag
        if raw is None and env_name(flag) in environ:
            raw, source = environ[env_name(flag)], env_name(flag)
        if raw is not None:
            try:
                set_dotted(overrides, dotted, coerce(raw, field_type(dotted), dotted))
            except ConfigError as err:
                raise ConfigError(f"{err} (from {source})") from None
    return config_from_dict(overrides, base=config)
