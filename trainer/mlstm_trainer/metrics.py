"""Prometheus metrics of a training process, and a null object for processes that do not report.

Names follow Prometheus conventions: `mlstm_` prefix, base units, `_total` counters. Labels are
limited to job, rank and node. Recording is a handful of in-memory updates per step, so the
training step never waits on a scrape; values never include credentials or training text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .report import StepStats

LABELS = ("job", "rank", "node")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsPortError(OSError):
    """The metrics port could not be bound."""


class TrainerMetrics:
    """The trainer's metrics in a registry of their own (tests pass a fresh CollectorRegistry)."""

    def __init__(self, *, job: str, rank: int, node: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"job": job, "rank": str(rank), "node": node}
        self._labels = labels

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry).labels(**labels)

        self.tokens = counter("mlstm_tokens", "Characters (bytes) trained on by this rank.")
        self.loss = gauge("mlstm_loss", "Training loss of the last step, nats per character.")
        self.bpc = gauge("mlstm_bits_per_character", "Training loss of the last step, bits per character.")
        # Validation BPC and MFU are exported only once known: a default 0 would read as a perfect
        # model or an idle device on the dashboard.
        self._val_bpc = Gauge(
            "mlstm_validation_bits_per_character", "Validation bits per character at the last evaluation.", LABELS, registry=self.registry
        )
        self.step_duration = Histogram(
            "mlstm_step_duration_seconds", "Wall time of one optimizer step.", LABELS, buckets=STEP_BUCKETS, registry=self.registry
        ).labels(**labels)
        self.data_wait = counter("mlstm_data_wait_seconds", "Time spent waiting for training data.")
        self.lr = gauge("mlstm_learning_rate", "Learning rate of the last step.")
        self.loss_scale = gauge("mlstm_loss_scale", "Current fp16 loss scale (1 without loss scaling).")
        self.grad_norm = gauge("mlstm_grad_norm", "Global gradient norm before clipping, last step.")
        self.overflows = counter("mlstm_overflow_steps", "Steps skipped because fp16 gradients overflowed.")
        self.step = gauge("mlstm_step", "Optimizer steps done.")
        self.epoch = gauge("mlstm_epoch", "Current epoch over the training data.")
        self._mfu = Gauge(
            "mlstm_model_flops_utilization", "Model FLOPs per second over the device's dense peak (exported when the peak is known).",
            LABELS, registry=self.registry,
        )
        self.progress = gauge("mlstm_run_progress_ratio", "Fraction of the planned training done.")
        self.eta = gauge("mlstm_eta_seconds", "Estimated time left at the current rate.")
        self._build_info = Gauge(
            "mlstm_build_info", "Constant 1, labelled with the run's version and shape.",
            [*LABELS, "version", "precision", "hidden_size", "world_size"], registry=self.registry,
        )
        self._last_skipped = 0

    def set_build_info(self, *, version: str, precision: str, hidden_size: int, world_size: int) -> None:
        """Publish the constant `mlstm_build_info` series describing this run."""
        self._build_info.labels(
            **self._labels, version=version, precision=precision, hidden_size=str(hidden_size), world_size=str(world_size)
        ).set(1)

    def record_step(self, stats: StepStats, *, rank_tokens: int, mfu: float | None) -> None:
        """Update every per-step metric from one step's stats."""
        self.tokens.inc(rank_tokens)
        self.loss.set(stats.loss)
        self.bpc.set(stats.bpc)
        self.step_duration.observe(stats.step_seconds)
        self.data_wait.inc(stats.data_wait_seconds)
        self.lr.set(stats.lr)
        self.loss_scale.set(stats.loss_scale)
        self.grad_norm.set(stats.grad_norm)
        # StepStats carries the run's running total; the counter wants this process's increment.
        self.overflows.inc(max(0, stats.skipped - self._last_skipped))
        self._last_skipped = stats.skipped
        self.step.set(stats.step)
        self.epoch.set(stats.epoch)
        self.progress.set(stats.progress)
        self.eta.set(stats.eta_seconds)
        if mfu is not None:
            self._mfu.labels(**self._labels).set(mfu)

    def resume_from(self, skipped: int) -> None:
        """Counters start at zero in a new process; skip the overflows a checkpoint already counted."""
        self._last_skipped = skipped

    def record_validation(self, bpc: float) -> None:
        """Publish the bits per character of an evaluation on held-out text."""
        self._val_bpc.labels(**self._labels).set(bpc)

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port from a daemon thread."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise MetricsPortError(
                f"metrics.port {port} on {host} cannot be used ({err.strerror}); pass --metrics-port 0 to turn metrics off or pick a free port"
            ) from None


class NullMetrics:
    """Metrics of a process that does not report: every call does nothing, so the loop never branches."""

    def set_build_info(self, **_: object) -> None: ...

    def record_step(self, stats: StepStats, *, rank_tokens: int, mfu: float | None) -> None: ...

    def resume_from(self, skipped: int) -> None: ...

    def record_validation(self, bpc: float) -> None: ...

    def serve(self, host: str, port: int) -> None: ...
