"""The Grafana dashboard: the panels the issue lists, the `job` variable, metric names, and the export command."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from mlstm_platform.cli import app
from mlstm_platform.dashboard import UID, build_dashboard, dashboard_queries
from mlstm_trainer.metrics import TrainerMetrics


@pytest.fixture(scope="module")
def model() -> dict:
    return build_dashboard()


def panels(model: dict) -> list[dict]:
    return [p for p in model["panels"] if p["type"] != "row"]


def queries_of(model: dict, title: str) -> list[str]:
    return [expr for t, expr, _ in dashboard_queries(model) if t == title]


@pytest.mark.parametrize(
    "title, needle",
    [
        pytest.param("Cluster tokens/s", "sum (rate(mlstm_tokens_total", id="cluster-tokens"),
        pytest.param("Tokens/s per rank", "sum by (rank) (rate(mlstm_tokens_total", id="rank-tokens"),
        pytest.param("Training loss", "mlstm_loss{", id="loss"),
        pytest.param("Bits per character", "mlstm_bits_per_character{", id="train-bpc"),
        pytest.param("Bits per character", "mlstm_validation_bits_per_character{", id="validation-bpc"),
        pytest.param("Learning rate", "mlstm_learning_rate{", id="lr"),
        pytest.param("Loss scale and overflows", "mlstm_loss_scale{", id="loss-scale"),
        pytest.param("Loss scale and overflows", "mlstm_overflow_steps_total{", id="overflows"),
        pytest.param("Step time p50 / p99", "histogram_quantile(0.5,", id="p50"),
        pytest.param("Step time p50 / p99", "histogram_quantile(0.99,", id="p99"),
        pytest.param("Data wait share", "mlstm_data_wait_seconds_total{", id="data-wait"),
        pytest.param("Model FLOPs utilization", "mlstm_model_flops_utilization{", id="mfu"),
        pytest.param("Progress", "mlstm_run_progress_ratio{", id="progress"),
        pytest.param("ETA", "mlstm_eta_seconds{", id="eta"),
    ],
)
def test_issue_panel_is_present(model, title, needle):
    assert any(needle in expr for expr in queries_of(model, title)), queries_of(model, title)


def test_job_template_variable(model):
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["job"]["type"] == "query"
    assert variables["job"]["query"] == "label_values(mlstm_build_info, job)"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_query_selects_the_job(model):
    for title, expr, _ in dashboard_queries(model):
        selectors = re.findall(r"mlstm_\w+\{([^}]*)\}", expr)
        assert selectors and all('job="$job"' in s for s in selectors), (title, expr)


def test_every_metric_named_is_one_the_trainer_exports(model):
    metrics = TrainerMetrics(job="j", rank=0, node="n", registry=CollectorRegistry())
    metrics.set_build_info(version="0", precision="fp32", hidden_size=1, world_size=1)
    metrics.record_validation(1.0)
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    exported |= {"mlstm_model_flops_utilization"}  # exported once a peak is known
    used = {name for _, expr, _ in dashboard_queries(model) for name in re.findall(r"\bmlstm_\w+", expr)}
    assert used <= exported, used - exported


def test_stat_panels_query_instant_and_graphs_query_ranges(model):
    for panel in panels(model):
        for target in panel["targets"]:
            assert target["instant"] is (panel["type"] == "stat"), panel["title"]


def test_panels_use_the_datasource_variable_and_have_units(model):
    for panel in panels(model):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["description"], panel["title"]


def test_layout_ids_unique_and_panels_do_not_overlap(model):
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in model["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & area, panel["title"]
        cells |= area


def test_export_to_stdout_is_the_dashboard_json(model):
    result = CliRunner().invoke(app, ["dashboard", "export"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == model


def test_export_to_file(tmp_path, model):
    target = tmp_path / "out" / "mlstm.json"
    result = CliRunner().invoke(app, ["dashboard", "export", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["uid"] == UID
    assert f"wrote dashboard to {target}" in result.stderr


def test_export_to_unwritable_path_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["dashboard", "export", "-o", str(blocker / "x.json")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot write") and result.stderr.count("\n") == 1
