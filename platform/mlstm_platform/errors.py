"""One-line errors for the CLI: a message on stderr and exit code 2 for bad usage."""

from __future__ import annotations

import typer

USAGE_EXIT = 2


def fail(message: str, code: int = USAGE_EXIT) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)
