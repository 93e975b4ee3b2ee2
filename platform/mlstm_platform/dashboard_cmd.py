"""`mlstm dashboard export`: write the Grafana dashboard JSON for training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import fail

app = typer.Typer(help="The Grafana dashboard for training runs.", no_args_is_help=True)


@app.command()
def export(
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="File to write; without it the JSON goes to standard output."),
    ] = None,
) -> None:
    """Write the Grafana dashboard (JSON) that shows a training job's Prometheus metrics."""
    # Imported here: grafana-foundation-sdk is a platform extra, and `mlstm train` must not need it.
    try:
        from .dashboard import dashboard_json
    except ImportError as err:
        raise fail(f"{err.name} is not installed; install the platform extra: pip install 'mlstm-platform[platform]'") from None
    text = dashboard_json()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as err:
        raise fail(f"cannot write {output}: {err.strerror}") from None
    typer.echo(f"wrote dashboard to {output}", err=True)


def register(root: typer.Typer) -> None:
    """Add `mlstm dashboard ...` to the root app."""
    root.add_typer(app, name="dashboard")
