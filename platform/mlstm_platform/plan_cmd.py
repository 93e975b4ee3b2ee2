"""`mlstm plan`: predicted wall clock, GPU-hours and all-reduce share of a run (model in plan.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import fail
from .plan import PlanError, PlanInput, format_duration, make_plan, measured_tokens_per_s_per_gpu


def plan(
    gpus: Annotated[int, typer.Option(help="GPUs in the job.")],
    dataset_bytes: Annotated[float, typer.Option(help="Training bytes per epoch (e.g. 40e9 for 40 GB).")],
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 1.0,
    tokens_per_s_per_gpu: Annotated[Optional[float], typer.Option(help="Measured training throughput of one GPU.")] = None,
    measured: Annotated[Optional[Path], typer.Option(help="A trainer JSONL log (mlstm train --log-jsonl) to take the throughput from.")] = None,
    hidden_size: Annotated[int, typer.Option(help="mLSTM units.")] = 4096,
    embed_dim: Annotated[int, typer.Option(help="Byte embedding width.")] = 64,
    global_batch: Annotated[int, typer.Option(help="Sequences per step across all GPUs.")] = 32768,
    seq_len: Annotated[int, typer.Option(help="Characters per sequence per step.")] = 256,
    precision: Annotated[str, typer.Option(help="fp16 all-reduces 2-byte gradients; fp32/bf16 4-byte.")] = "fp16",
    link_gbps: Annotated[float, typer.Option(help="Interconnect bandwidth per GPU, Gbit/s.")] = 100.0,
    target_hours: Annotated[float, typer.Option(help="The time budget to check against.")] = 4.0,
) -> None:
    """Predict whether a run fits its time budget, before submitting it."""
    if (tokens_per_s_per_gpu is None) == (measured is None):
        raise fail("pass exactly one of --tokens-per-s-per-gpu or --measured")
    try:
        rate = tokens_per_s_per_gpu if tokens_per_s_per_gpu is not None else measured_tokens_per_s_per_gpu(measured)
        spec = PlanInput(gpus=gpus, dataset_bytes=dataset_bytes, epochs=epochs, tokens_per_s_per_gpu=rate,
                         hidden_size=hidden_size, embed_dim=embed_dim, global_batch=global_batch, seq_len=seq_len,
                         grad_bytes=2 if precision == "fp16" else 4, link_gbps=link_gbps, target_hours=target_hours)
        result = make_plan(spec)
    except PlanError as err:
        raise fail(str(err)) from None
    verdict = "fits in" if result.fits else "does NOT fit in"
    typer.echo(f"model            {result.parameters / 1e6:,.1f} M parameters (hidden {hidden_size}, embed {embed_dim})")
    typer.echo(f"work             {result.tokens:.3g} characters = {result.steps:,.0f} steps of {global_batch} x {seq_len}")
    typer.echo(f"throughput       {rate:,.0f} characters/s per GPU x {gpus} GPUs")
    typer.echo(f"per step         compute {result.compute_seconds_per_step * 1000:,.1f} ms + all-reduce "
               f"{result.allreduce_seconds_per_step * 1000:,.1f} ms ({result.allreduce_share:.0%} all-reduce)")
    typer.echo(f"wall clock       {format_duration(result.wall_seconds)} ({result.gpu_hours:,.0f} GPU-hours): "
               f"{verdict} {target_hours:g} hours")


def register(app: typer.Typer) -> None:
    app.command()(plan)
