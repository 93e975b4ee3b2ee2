"""Typed training configuration: one dataclass per concern, validated where it is built.

The same dataclasses are the single source of truth for the trainer's flags, its YAML/JSON config
file, its environment variables and (in the platform) the ConfigMap rendered into each pod.
Every check names the dotted field it rejects, e.g. ``optim.lr must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16")
LR_SCALING_RULES = ("none", "linear", "sqrt")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the field."""


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule}, got {value!r}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape of the byte-level multiplicative LSTM."""

    vocab_size: int = 256
    """Size of the input/output alphabet; 256 for raw bytes."""
    embed_dim: int = 64
    """Width of the byte embedding fed to the mLSTM."""
    hidden_size: int = 256
    """mLSTM units (the paper uses 4096; the embedded default is laptop-sized)."""

    def __post_init__(self) -> None:
        _require(self.vocab_size == 256, "model.vocab_size", "must be 256 (byte-level model)", self.vocab_size)
        _require(self.embed_dim > 0, "model.embed_dim", "must be > 0", self.embed_dim)
        _require(self.hidden_size > 0, "model.hidden_size", "must be > 0", self.hidden_size)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training bytes come from and how they are cut into batches."""

    path: str = ""
    """A text file, a directory of text files, or empty for Python's embedded pydoc text."""
    batch_size: int = 32
    """Rows (independent byte streams) per process; the global batch is this times the world size."""
    seq_len: int = 128
    """Characters per row per step (truncated back-propagation length)."""
    val_fraction: float = 0.05
    """For plain-text data: the share of bytes (whole documents at the end) held out for validation."""
    prefetch_steps: int = 64
    """How many steps ahead shards of a prepared dataset are fetched in the background."""
    fetch_workers: int = 4
    """Threads fetching shards from S3/MinIO."""

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "data.batch_size", "must be > 0", self.batch_size)
        _require(self.seq_len > 0, "data.seq_len", "must be > 0", self.seq_len)
        _require(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)", self.val_fraction)
        _require(self.prefetch_steps >= 0, "data.prefetch_steps", "must be >= 0", self.prefetch_steps)
        _require(self.fetch_workers > 0, "data.fetch_workers", "must be > 0", self.fetch_workers)


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Adam, clipping and the large-batch learning-rate schedule."""

    steps: int = 600
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    lr: float = 3e-3
    """Base learning rate for a global batch of 128 sequences, before scaling."""
    lr_scaling: str = "none"
    """How the base LR grows with the global batch: none, linear or sqrt (of global_batch / 128)."""
    lr_cap: float = 3e-3
    """Upper bound on the scaled learning rate (large batches diverge above it)."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to the peak LR over this many steps."""
    decay_steps: int = 0
    """Linear decay to zero over this many steps after warm-up; 0 decays over the rest of the run."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.999
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam denominator epsilon."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, "optim.steps", "must be > 0", self.steps)
        _require(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _require(self.lr_scaling in LR_SCALING_RULES, "optim.lr_scaling", f"must be one of {', '.join(LR_SCALING_RULES)}", self.lr_scaling)
        _require(self.lr_cap > 0, "optim.lr_cap", "must be > 0", self.lr_cap)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _require(self.decay_steps >= 0, "optim.decay_steps", "must be >= 0", self.decay_steps)
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0", self.grad_clip)
        _require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)", self.beta1)
        _require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)", self.beta2)
        _require(self.eps > 0, "optim.eps", "must be > 0", self.eps)


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    """Numeric format of the forward/backward pass and fp16 loss scaling."""

    mode: str = "fp32"
    """fp32, fp16 (autocast + dynamic loss scaling, fp32 master weights) or bf16 (autocast, no scaler)."""
    init_scale: float = 2.0**16
    """Initial fp16 loss scale."""
    growth_interval: int = 1000
    """Clean fp16 steps after which the loss scale doubles (it halves on every overflow)."""

    def __post_init__(self) -> None:
        _require(self.mode in PRECISIONS, "precision.mode", f"must be one of {', '.join(PRECISIONS)}", self.mode)
        _require(self.init_scale > 0, "precision.init_scale", "must be > 0", self.init_scale)
        _require(self.growth_interval > 0, "precision.growth_interval", "must be > 0", self.growth_interval)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Validation bits per character during training."""

    every: int = 100
    """Evaluate on the validation split every this many steps and at the end; 0 turns it off."""
    rows: int = 16
    """Global rows (contiguous streams) of the validation split; fixed so any world size gets the same number."""
    max_steps: int = 0
    """Cap on validation batches per evaluation; 0 evaluates the whole split."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0", self.every)
        _require(self.rows > 0, "eval.rows", "must be > 0", self.rows)
        _require(self.max_steps >= 0, "eval.max_steps", "must be >= 0", self.max_steps)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how often training state is saved (and resumed from)."""

    dir: str = "runs/default"
    """Directory or s3://bucket/prefix holding step-N checkpoints; training resumes from the latest one."""
    every: int = 200
    """Save every this many steps (and always at the end and on SIGTERM); 0 saves only then."""
    keep: int = 3
    """Number of most recent checkpoints kept; older ones are deleted."""

    def __post_init__(self) -> None:
        _require(bool(self.dir), "checkpoint.dir", "must not be empty", self.dir)
        _require(self.every >= 0, "checkpoint.every", "must be >= 0", self.every)
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1", self.keep)


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """What the trainer reports while it runs."""

    port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 turns it off."""
    host: str = "127.0.0.1"
    """Address the metrics endpoint binds to (0.0.0.0 inside a pod)."""
    log_jsonl: str = ""
    """Append one JSON object per optimizer step to this file; empty turns it off."""
    log_every: int = 10
    """Refresh the progress display every this many steps."""
    job: str = "local"
    """Job name: the `job` label on every metric (the PyTorchJob name in a cluster)."""

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "metrics.port", "must be in 0..65535", self.port)
        _require(self.log_every > 0, "metrics.log_every", "must be > 0", self.log_every)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything one training process needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    seed: int = 1234
    """Seed for parameter initialisation and sampling."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    cuda_graphs: bool = False
    """Replay the mLSTM's forward and backward time loops as CUDA graphs (CUDA only; not yet measured on a GPU)."""
    sample_chars: int = 0
    """Characters to sample from the model at the end of training (0 = none)."""
    retry_seconds: float = 120.0
    """How long transient S3 errors (refused, 5xx, timeouts) on data or checkpoints are retried before stopping."""
    dist_timeout_seconds: float = 300.0
    """How long a collective waits for a lost rank before the job fails (and restarts from its checkpoint)."""

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}", self.device)
        _require(self.sample_chars >= 0, "sample_chars", "must be >= 0", self.sample_chars)
        _require(self.retry_seconds >= 0, "retry_seconds", "must be >= 0", self.retry_seconds)
        _require(self.dist_timeout_seconds > 0, "dist_timeout_seconds", "must be > 0", self.dist_timeout_seconds)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-ready) of a config."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a config from a nested dict, starting from `base` (default: the defaults).

    Unknown keys and values of the wrong type fail with a ConfigError naming the dotted field.
    """
    return _build(TrainConfig, values, base if base is not None else TrainConfig(), prefix="")


def _build(cls: type, values: dict[str, Any], base: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]} is not a known setting (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        current = getattr(base, name)
        if name not in values:
            kwargs[name] = current
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], values[name], current, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(values[name], hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def coerce(value: Any, kind: type, name: str) -> Any:
    """Convert a value read from a file, flag or environment variable to the field's type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}")


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `value` at `a.b.c` in a nested dict, creating the intermediate mappings."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[leaf] = value


def field_type(dotted: str) -> type:
    """Python type of a dotted config field, e.g. ``optim.lr`` -> float."""
    cls: type = TrainConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[leaf]


def field_doc(dotted: str) -> str:
    """The one-line docstring written under a config field (used as flag help)."""
    import ast
    import inspect

    cls: type = TrainConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == leaf:
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                return str(after.value.value)
    return ""
