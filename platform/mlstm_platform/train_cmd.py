"""`mlstm train` and `mlstm sample`: the trainer, driven from the platform CLI.

`train` hands its arguments to the trainer's own parser, so the flags, the config file and the
environment variables stay defined in one place (mlstm_trainer.options).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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


def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint folder or a run's checkpoint directory/URL (then its latest).")],
    data: Annotated[Optional[str], typer.Option(help="Dataset URL or text path; default: the data the model was trained on.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate: val or test.")] = "val",
    rows: Annotated[int, typer.Option(min=1, help="Contiguous streams the split is read as.")] = 16,
    max_steps: Annotated[int, typer.Option(min=0, help="Cap on batches; 0 reads the whole split.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Bits per character of a checkpoint on a held-out split."""
    from mlstm_trainer.corpus import CorpusError
    from mlstm_trainer.evaluate import evaluate_checkpoint
    from mlstm_trainer.shards import ManifestError
    from mlstm_trainer.storage import StorageError

    if split not in ("val", "test"):
        raise fail(f"--split must be val or test, got {split!r}")
    try:
        result = evaluate_checkpoint(checkpoint, data=data, split=split, rows=rows, max_steps=max_steps, device=device)
    except (CheckpointError, CorpusError, ManifestError, StorageError) as err:
        raise fail(str(err)) from None
    typer.echo(f"{split} bits per character: {result.bpc:.4f} over {result.chars:,} characters")


def register(app: typer.Typer) -> None:
    app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(train)
    app.command()(sample)
    app.command("eval")(evaluate)
