"""`mlstm train` and `mlstm sample`: the trainer, driven from the platform CLI.

`train` hands its arguments to the trainer's own parser, so the flags, the config file and the
environment variables stay defined in one place (mlstm_trainer.options).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlstm_trainer.__main__ import main as trainer_main
from mlstm_trainer.checkpoint import CheckpointError
from mlstm_trainer.options import build_parser

from .errors import fail


def train(ctx: typer.Context) -> None:
    """Train an mLSTM (all flags: mlstm train --help). Resumes from the latest checkpoint in --checkpoint-dir."""
    if "--help" in ctx.args or "-h" in ctx.args:
        typer.echo(build_parser().format_help())
        raise typer.Exit(0)
    raise typer.Exit(trainer_main(ctx.args))


def sample(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder or a run's checkpoint directory (then its latest checkpoint).")],
    prompt: Annotated[str, typer.Option(help="Text the sample continues.")] = "",
    length: Annotated[int, typer.Option(min=1, help="Characters (bytes) to generate.")] = 300,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 always picks the likeliest byte.")] = 0.8,
    seed: Annotated[int, typer.Option(help="Random seed of the sampler.")] = 0,
) -> None:
    """Generate text from a trained checkpoint."""
    from mlstm_trainer.sampling import load_model, sample_text

    try:
        model = load_model(checkpoint)
    except CheckpointError as err:
        raise fail(str(err)) from None
    typer.echo(prompt + sample_text(model, prompt=prompt, length=length, temperature=temperature, seed=seed))


def register(app: typer.Typer) -> None:
    app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(train)
    app.command()(sample)
