"""How far a running job is, read from rank 0's /metrics through the API server's pod proxy.

`mlstm status` needs no Prometheus: the trainer's own counters give the rate. Tokens/s is rank 0's
characters over its time spent in steps, times the world size (every rank steps in lockstep), i.e.
the average since that process started; ETA and progress are the trainer's own gauges.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .constants import METRICS_PORT


@dataclass(frozen=True, slots=True)
class Progress:
    """Rank 0's view of the run; a field is None when the trainer has not reported it yet."""

    step: float | None = None
    tokens_per_second: float | None = None
    progress: float | None = None
    eta_seconds: float | None = None
    bits_per_character: float | None = None


def _samples(text: str) -> dict[str, tuple[float, dict[str, str]]]:
    """Last sample value and labels per sample name."""
    samples: dict[str, tuple[float, dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = (sample.value, dict(sample.labels))
    return samples


def parse_progress(text: str) -> Progress:
    """Progress from a Prometheus text exposition of one trainer process."""
    samples = _samples(text)

    def value(name: str) -> float | None:
        return samples[name][0] if name in samples else None

    tokens, busy = value("mlstm_tokens_total"), value("mlstm_step_duration_seconds_sum")
    world = samples.get("mlstm_build_info", (0.0, {}))[1].get("world_size")
    rate = None
    if tokens is not None and busy and world and world.isdigit():
        rate = tokens / busy * int(world)
    return Progress(step=value("mlstm_step"), tokens_per_second=rate, progress=value("mlstm_run_progress_ratio"),
                    eta_seconds=value("mlstm_eta_seconds"), bits_per_character=value("mlstm_bits_per_character"))


def scrape_progress(core, namespace: str, pod: str, *, timeout: float = 5.0) -> Progress:  # noqa: ANN001 - CoreV1Api
    """GET /metrics of local rank 0 in `pod` through the API server (no port-forward needed)."""
    text = core.connect_get_namespaced_pod_proxy_with_path(
        f"{pod}:{METRICS_PORT}", namespace, "metrics", _request_timeout=timeout)
    return parse_progress(text if isinstance(text, str) else str(text))


def format_duration(seconds: float) -> str:
    """e.g. 3h 05m, 12m 30s, 45s."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_rate(rate: float) -> str:
    """Tokens per second with an SI suffix, e.g. 2.31M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.2f}{suffix}"
    return f"{rate:.0f}"


def describe_progress(progress: Progress) -> str:
    """One line for `mlstm status`."""
    parts = []
    if progress.step is not None:
        parts.append(f"step {progress.step:.0f}")
    if progress.tokens_per_second is not None:
        parts.append(f"{format_rate(progress.tokens_per_second)} tokens/s")
    if progress.bits_per_character is not None:
        parts.append(f"{progress.bits_per_character:.3f} bits/char")
    if progress.progress is not None:
        parts.append(f"{progress.progress:.1%} done")
    if progress.eta_seconds is not None:
        parts.append(f"ETA {format_duration(progress.eta_seconds)}")
    return ", ".join(parts) if parts else "no training steps reported yet"
