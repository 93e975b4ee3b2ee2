"""`mlstm render platform|job`, `mlstm submit`, `status`, `logs`, `delete`, `list`: training on Kubernetes.

Rendering never touches a cluster. The lifecycle commands find the cluster like kubectl (KUBECONFIG
or ~/.kube/config, the current context, --namespace). Bad input fails with one line and exit code 2
before anything is sent; a failed cluster request prints one line and exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mlstm_trainer.config import TrainConfig

from . import jobs
from .chart import ChartError, load_values, render_platform
from .constants import DEFAULT_PLATFORM_RELEASE
from .errors import fail
from .job_options import JobOptions, with_job_options
from .jobspec import JobSpec, JobSpecError, build_train_config
from .k8s_errors import ClusterError
from .kubeconn import Cluster, ConnectError, connect
from .pytorchjob import dump_objects, render_pytorchjob
from .run_progress import describe_progress

CLUSTER_EXIT = 1
TRAINER_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
CLUSTER = "Cluster"

Namespace = Annotated[Optional[str], typer.Option("--namespace", "-n", help="Namespace (default: the kubeconfig context's, else default).", rich_help_panel=CLUSTER)]
Kubeconfig = Annotated[Optional[str], typer.Option(help="Kubeconfig file(s) (default: $KUBECONFIG, else ~/.kube/config).", rich_help_panel=CLUSTER)]
Context = Annotated[Optional[str], typer.Option(help="Kubeconfig context (default: the current one).", rich_help_panel=CLUSTER)]
JobName = Annotated[str, typer.Argument(help="PyTorchJob name.")]

render_app = typer.Typer(help="Print Kubernetes manifests (nothing is sent to a cluster).", no_args_is_help=True)


@render_app.command("platform")
def render_platform_cmd(
    set_values: Annotated[Optional[list[str]], typer.Option("--set", help="Helm --set expression, e.g. podMonitor.labels.release=kps (repeatable).")] = None,
    values: Annotated[Optional[list[Path]], typer.Option("--values", "-f", help="Values YAML file (repeatable; later files win, --set wins over files).")] = None,
    release: Annotated[str, typer.Option(help="Helm release name.")] = DEFAULT_PLATFORM_RELEASE,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Namespace of the release.")] = "default",
) -> None:
    """Render the platform Helm chart with Helm's own engine: the same output as `helm template`."""
    try:
        text = render_platform(load_values(values or [], set_values or []), release=release, namespace=namespace)
    except ChartError as err:
        raise fail(str(err)) from None
    typer.echo(text, nl=False)


def _build(ctx: typer.Context, job: JobOptions, namespace: str) -> tuple[JobSpec, TrainConfig, list[dict[str, Any]]]:
    """JobSpec, trainer config and objects from the options and the trailing trainer flags."""
    try:
        spec = job.to_spec(namespace)
        config = build_train_config(spec, ctx.args)
    except JobSpecError as err:
        raise fail(str(err)) from None
    return spec, config, render_pytorchjob(spec, config)


@render_app.command("job", context_settings=TRAINER_ARGS)
@with_job_options
def render_job(
    ctx: typer.Context,
    job: JobOptions,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Namespace the job will run in.")] = "default",
) -> None:
    """Render a PyTorchJob and its trainer ConfigMap (16 pods x 8 GPUs by default).

    Trainer flags (mlstm train --help) may follow the job options, e.g. --steps 4800 --lr 1e-3.
    """
    _, _, objects = _build(ctx, job, namespace)
    typer.echo(dump_objects(objects), nl=False)


def _connect(namespace: str | None, kubeconfig: str | None, context: str | None) -> Cluster:
    try:
        return connect(kubeconfig=kubeconfig, context=context, namespace=namespace)
    except ConnectError as err:
        raise fail(str(err)) from None


def submit(
    ctx: typer.Context,
    job: JobOptions,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Create the job's ConfigMap and PyTorchJob through the training operator.

    Takes the options of `mlstm render job`; trainer flags (mlstm train --help) may follow.
    """
    _build(ctx, job, namespace or "default")  # bad options fail here, before the kubeconfig is even read
    cluster = _connect(namespace, kubeconfig, context)
    spec, _, objects = _build(ctx, job, cluster.namespace)
    try:
        jobs.submit(cluster, objects)
    except ClusterError as err:
        raise fail(str(err), CLUSTER_EXIT) from None
    typer.echo(f"created PyTorchJob {spec.name} in namespace {cluster.namespace}: "
               f"{spec.pods} pods x {spec.gpus_per_pod} {'CPU ranks' if spec.cpu_only else 'GPUs'} = {spec.gpus}")
    typer.echo(f"next: mlstm status {spec.name} -n {cluster.namespace}    mlstm logs {spec.name} -n {cluster.namespace} --follow")


def _print_status(status: jobs.JobStatus) -> None:
    typer.echo(f"PyTorchJob {status.name} in {status.namespace}: {status.state} "
               f"({status.pods} pods x {status.gpus_per_pod} ranks = {status.pods * status.gpus_per_pod})")
    if status.conditions:
        typer.echo("conditions:")
        for c in status.conditions:
            typer.echo(f"  {c.type:<11} {c.status:<6} {c.reason:<28} {c.time:<26} {c.message}".rstrip())
    typer.echo("replicas:")
    for r in status.replicas:
        typer.echo(f"  {r.replica_type:<7} {r.desired} desired, {r.active} active, {r.succeeded} succeeded, {r.failed} failed")
    phases: dict[str, int] = {}
    for phase in status.pod_phases.values():
        phases[phase] = phases.get(phase, 0) + 1
    summary = ", ".join(f"{count} {phase}" for phase, count in sorted(phases.items())) or "none yet"
    typer.echo(f"pods: {summary}")
    if status.progress is not None:
        typer.echo(f"progress (rank 0): {describe_progress(status.progress)}")
    elif status.progress_note:
        typer.echo(status.progress_note)


def status(name: JobName, namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Conditions, replica states and, while rank 0 runs, its tokens/s, progress and ETA."""
    cluster = _connect(namespace, kubeconfig, context)
    try:
        _print_status(jobs.get_status(cluster, name))
    except ClusterError as err:
        raise fail(str(err), CLUSTER_EXIT) from None


def logs(
    name: JobName,
    rank: Annotated[int, typer.Option(help="Global rank whose pod's log to show (its pod runs ranks p*GPUs-per-pod ...).")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Print the training log of the pod that runs a rank (rank 0, the master, by default)."""
    cluster = _connect(namespace, kubeconfig, context)
    try:
        for chunk in jobs.stream_logs(cluster, name, rank=rank, follow=follow):
            typer.echo(chunk, nl=False)
    except ClusterError as err:
        raise fail(str(err), CLUSTER_EXIT) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def delete(name: JobName, namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """Delete a PyTorchJob (its pods go with it) and its trainer ConfigMap; checkpoints stay in S3."""
    cluster = _connect(namespace, kubeconfig, context)
    try:
        jobs.delete(cluster, name)
    except ClusterError as err:
        raise fail(str(err), CLUSTER_EXIT) from None
    typer.echo(f"deleted PyTorchJob {name} and its ConfigMap in namespace {cluster.namespace}")


def list_jobs(namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None) -> None:
    """List the PyTorchJobs of a namespace with their state and size."""
    cluster = _connect(namespace, kubeconfig, context)
    try:
        summaries = jobs.list_jobs(cluster)
    except ClusterError as err:
        raise fail(str(err), CLUSTER_EXIT) from None
    if not summaries:
        typer.echo(f"no PyTorchJobs in namespace {cluster.namespace}")
        return
    width = max(len("NAME"), *(len(s.name) for s in summaries))
    typer.echo(f"{'NAME':<{width}}  {'STATE':<10}  {'PODS':>4}  {'GPUS':>4}  AGE")
    for s in summaries:
        typer.echo(f"{s.name:<{width}}  {s.state:<10}  {s.pods:>4}  {s.gpus:>4}  {s.age}")


def register(app: typer.Typer) -> None:
    """Add `render` (platform, job) and the job lifecycle commands to the `mlstm` app."""
    app.add_typer(render_app, name="render")
    app.command(context_settings=TRAINER_ARGS)(with_job_options(submit))
    app.command()(status)
    app.command()(logs)
    app.command()(delete)
    app.command("list")(list_jobs)
