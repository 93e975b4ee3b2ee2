"""`mlstm transfer`: sentiment transfer from a checkpoint's cell state (a linear probe and its top unit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlstm_trainer.checkpoint import CheckpointError

from .errors import fail

DEVICES = ("cpu", "cuda")


def transfer(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder or a run's checkpoint directory (then its latest checkpoint).")],
    train: Annotated[Path, typer.Option(help="Labelled training texts: CSV with 'label' and 'sentence' columns, or JSON lines.")],
    val: Annotated[Path, typer.Option(help="Labelled validation texts; they choose the regularisation strength.")],
    test: Annotated[Path, typer.Option(help="Labelled test texts; the accuracies reported are on these.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Texts run through the model at once.")] = 64,
    max_chars: Annotated[Optional[int], typer.Option(min=1, help="Keep only the first N bytes of each text.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Save a histogram of the top unit's values by label (PNG).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Fit an L1 logistic regression on the model's cell state and find its top ("sentiment") unit."""
    if device not in DEVICES:
        raise fail(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    # Imported here: scikit-learn and matplotlib are the `transfer` extra, which `mlstm train` must not need.
    try:
        from .transfer import TransferError, run_transfer
    except ImportError as err:
        raise fail(f"{err.name} is not installed; install the transfer extra: pip install 'mlstm-platform[transfer]'") from None
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda but no CUDA GPU is available; use --device cpu")
    try:
        report = run_transfer(
            checkpoint, train=train, val=val, test=test, device=device, batch_size=batch_size, max_chars=max_chars, plot=plot
        )
    except (TransferError, CheckpointError) as err:
        raise fail(str(err)) from None
    except OSError as err:  # the plot's folder or file cannot be written
        raise fail(f"cannot write {err.filename}: {err.strerror}") from None
    _print_report(report)


def _print_report(report) -> None:
    """The numbers as aligned `name  value` lines: easy to read and to grep."""
    probe, counts = report.probe, report.counts
    rows = [
        ("accuracy (all units)", f"{probe.test_accuracy:.2%}"),
        ("accuracy (top unit)", f"{probe.top_unit_accuracy:.2%}"),
        ("top unit", f"{probe.top_unit} (weight {probe.top_unit_weight:+.3f} on the standardised unit)"),
        ("C chosen", f"{probe.c:g} (validation accuracy {probe.val_accuracy:.2%})"),
        ("non-zero weights", f"{probe.nonzero_weights} of {report.hidden_size}"),
        ("texts", f"train {counts['train']}, val {counts['val']}, test {counts['test']}"),
        ("labels", f"{report.labels[0]} -> 0, {report.labels[1]} -> 1"),
    ]
    if report.plot is not None:
        rows.append(("plot", str(report.plot)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name:<{width}}  {value}")


def register(app: typer.Typer) -> None:
    """Add `mlstm transfer` to the root app."""
    app.command()(transfer)
