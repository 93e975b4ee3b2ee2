"""The Grafana dashboard operators watch a training run on, built with grafana-foundation-sdk.

The panels are a table of `PanelSpec`s (title, unit, PromQL queries) so tests can walk the same
table the builder does; `build_dashboard()` turns it into Grafana's dashboard JSON as a plain dict
(the Helm chart ships it in a ConfigMap labelled `grafana_dashboard`; `mlstm dashboard export`
writes it to a file).

Every query selects one training job through the `$job` template variable. The trainer's own
`job` label must survive the scrape, so scrape configs set `honor_labels: true` (otherwise
Prometheus renames it to `exported_job`). Metric names come from mlstm_trainer.metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from grafana_foundation_sdk.builders import common as gcommon
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    VariableRefresh,
    VariableSort,
)

UID = "mlstm-training"
TITLE = "mlstm training"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'job="$job"'
"""Label selector every query uses: one job at a time, picked with the `job` variable."""
RATE = "$__rate_interval"
"""Grafana's rate window: at least four scrape intervals, so rate() always has two samples."""


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class PanelSpec:
    """One panel: a time series by default, a single-value stat when `stat` is set."""

    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    stat: bool = False
    width: int = 12
    right_axis: tuple[str, ...] = field(default=())
    """Legends of series drawn as bars on a right-hand axis (counts next to a level)."""


def _rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{SEL}}}[{RATE}]))"


def _quantile(q: float) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate(mlstm_step_duration_seconds_bucket{{{SEL}}}[{RATE}])))"


# (row title, panels). Aggregations: counters are summed over ranks; per-step gauges are the same
# on every rank (lr, loss scale, progress) or a per-rank sample of one global quantity (loss), so
# max/avg over ranks gives the job's value.
ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    ("Throughput", (
        PanelSpec(title="Cluster tokens/s", unit="cps",
                  description="Characters trained on per second by the whole job (all ranks).",
                  queries=(Query(_rate("mlstm_tokens_total"), "tokens/s"),)),
        PanelSpec(title="Tokens/s per rank", unit="cps",
                  description="Characters per second of each rank; a low line is a slow GPU or node.",
                  queries=(Query(_rate("mlstm_tokens_total", by="rank"), "rank {{rank}}"),)),
    )),
    ("Convergence", (
        PanelSpec(title="Training loss", unit="none",
                  description="Cross-entropy of the last step in nats per character, averaged over ranks.",
                  queries=(Query(f"avg(mlstm_loss{{{SEL}}})", "train loss (nats/char)"),)),
        PanelSpec(title="Bits per character", unit="none",
                  description="Training BPC of the last step and validation BPC at the last evaluation.",
                  queries=(Query(f"avg(mlstm_bits_per_character{{{SEL}}})", "train"),
                           Query(f"avg(mlstm_validation_bits_per_character{{{SEL}}})", "validation"))),
    )),
    ("Optimizer", (
        PanelSpec(title="Learning rate", unit="none", width=8,
                  description="Learning rate of the last step (after warm-up, decay and large-batch scaling).",
                  queries=(Query(f"max(mlstm_learning_rate{{{SEL}}})", "learning rate"),)),
        PanelSpec(title="Loss scale and overflows", unit="none", width=8, right_axis=("overflowed steps",),
                  description="fp16 dynamic loss scale, and steps skipped because gradients overflowed.",
                  queries=(Query(f"min(mlstm_loss_scale{{{SEL}}})", "loss scale"),
                           Query(f"max(increase(mlstm_overflow_steps_total{{{SEL}}}[{RATE}]))", "overflowed steps"))),
        PanelSpec(title="Gradient norm", unit="none", width=8,
                  description="Global gradient norm before clipping, last step.",
                  queries=(Query(f"max(mlstm_grad_norm{{{SEL}}})", "grad norm"),)),
    )),
    ("Efficiency", (
        PanelSpec(title="Step time p50 / p99", unit="s", width=8,
                  description="Wall time of one optimizer step over all ranks; p99 far above p50 means stragglers.",
                  queries=(Query(_quantile(0.5), "p50"), Query(_quantile(0.99), "p99"))),
        PanelSpec(title="Data wait share", unit="percentunit", width=8,
                  description="Fraction of step time each rank spends waiting for training data.",
                  queries=(Query(f"{_rate('mlstm_data_wait_seconds_total', by='rank')} / "
                                 f"{_rate('mlstm_step_duration_seconds_sum', by='rank')}", "rank {{rank}}"),)),
        PanelSpec(title="Model FLOPs utilization", unit="percentunit", width=8,
                  description="Model FLOPs per second over the devices' dense peak (needs a known peak).",
                  queries=(Query(f"avg(mlstm_model_flops_utilization{{{SEL}}})", "MFU"),)),
    )),
    ("Progress", (
        PanelSpec(title="Progress", unit="percentunit", width=6, stat=True,
                  description="Fraction of the planned training done.",
                  queries=(Query(f"max(mlstm_run_progress_ratio{{{SEL}}})", "progress"),)),
        PanelSpec(title="ETA", unit="s", width=6, stat=True,
                  description="Time left at the current rate.",
                  queries=(Query(f"max(mlstm_eta_seconds{{{SEL}}})", "time left"),)),
        PanelSpec(title="Step and epoch", unit="none", width=6, stat=True,
                  description="Optimizer steps done and the current epoch over the training data.",
                  queries=(Query(f"max(mlstm_step{{{SEL}}})", "step"), Query(f"max(mlstm_epoch{{{SEL}}})", "epoch"))),
        PanelSpec(title="Ranks reporting", unit="none", width=6, stat=True,
                  description="Ranks whose metrics Prometheus scraped, next to the job's world size.",
                  queries=(Query(f"count(mlstm_step{{{SEL}}})", "reporting"),
                           Query(f"max by (world_size) (mlstm_build_info{{{SEL}}})", "world size {{world_size}}"))),
    )),
)


def panel_specs() -> Iterator[PanelSpec]:
    """Every panel of the dashboard, in order."""
    for _, panels in ROWS:
        yield from panels


def _targets(spec: PanelSpec) -> list[prometheus.Dataquery]:
    targets = []
    for ref, query in zip("ABCDEFGH", spec.queries):
        target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref)
        # Stats show the latest value: an instant query; graphs ask for the whole range.
        targets.append(target.instant() if spec.stat else target.range())
    return targets


def _panel(spec: PanelSpec, panel_id: int) -> gdash.Panel:
    """Build one panel from its spec."""
    if spec.stat:
        # The latest non-null value: a finished run keeps showing where it stopped.
        reduce = gcommon.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
        panel = stat.Panel().graph_mode(common.BigValueGraphMode.NONE).reduce_options(reduce)
    else:
        legend = (
            gcommon.VizLegendOptions().show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM)
        )
        # All series in the tooltip, highest first: with one line per rank the outlier is on top.
        tooltip = gcommon.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        panel = timeseries.Panel().fill_opacity(10).line_width(1).legend(legend).tooltip(tooltip)
        for legend in spec.right_axis:
            panel = panel.override_by_name(legend, [
                DynamicConfigValue(id_val="custom.axisPlacement", value=common.AxisPlacement.RIGHT.value),
                DynamicConfigValue(id_val="custom.drawStyle", value=common.GraphDrawStyle.BARS.value),
                DynamicConfigValue(id_val="unit", value="none"),
            ])
    return (
        panel.id(panel_id).title(spec.title).description(spec.description).unit(spec.unit)
        .datasource(DATASOURCE).targets(_targets(spec)).height(8).span(spec.width)
    )


def _variables() -> list[Any]:
    """`datasource` (any Prometheus) and `job` (training jobs that publish build info)."""
    datasource = gdash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    job = (
        gdash.QueryVariable("job").label("Job").datasource(DATASOURCE)
        .query("label_values(mlstm_build_info, job)")
        # Jobs come and go: list them again whenever the time range changes.
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
    )
    return [datasource, job]


def dashboard_builder() -> gdash.Dashboard:
    """The dashboard as a grafana-foundation-sdk builder."""
    builder = (
        gdash.Dashboard(TITLE).uid(UID).tags(["mlstm", "training"]).editable()
        .description("Throughput, convergence and efficiency of byte-level mLSTM training jobs.")
        .time("now-6h", "now").refresh("30s").tooltip(DashboardCursorSync.CROSSHAIR)
        .variables(_variables())
    )
    # Stable ids keep links to single panels (?viewPanel=N) working across exports.
    next_id = 1
    for row_title, panels in ROWS:
        builder = builder.with_row(gdash.Row(row_title).id(next_id))
        next_id += 1
        for spec in panels:
            builder = builder.with_panel(_panel(spec, next_id))
            next_id += 1
    return builder


def build_dashboard() -> dict[str, Any]:
    """Grafana's dashboard JSON model as a plain dict (JSON-ready)."""
    return json.loads(json.dumps(dashboard_builder().build(), cls=JSONEncoder))


def dashboard_json(indent: int = 2) -> str:
    """The dashboard as the text of a JSON file."""
    return json.dumps(build_dashboard(), indent=indent, sort_keys=True) + "\n"


def dashboard_queries(model: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(panel title, PromQL expression, instant?) for every target of an exported dashboard,
    including panels nested in collapsed rows."""
    for panel in model.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner.get("title", ""), target["expr"], bool(target.get("instant"))
