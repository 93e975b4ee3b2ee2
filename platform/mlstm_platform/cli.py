"""The `mlstm` command: one typer app, one sub-command module per concern."""

from __future__ import annotations

import typer

from . import dashboard_cmd, data_cmd, k8s_cmd, plan_cmd, train_cmd, transfer_cmd

app = typer.Typer(
    name="mlstm",
    help="Train byte-level multiplicative LSTMs, locally or as a Kubeflow PyTorchJob on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_cmd.register(app)
k8s_cmd.register(app)
dashboard_cmd.register(app)
data_cmd.register(app)
transfer_cmd.register(app)
plan_cmd.register(app)


def main() -> None:
    app()
