"""Opt-in: submit a tiny CPU PyTorchJob to a real cluster, wait for Succeeded, fetch its logs, delete it.

Skipped unless MLSTM_TEST_KUBECONFIG names a kubeconfig. The cluster needs the Kubeflow training
operator, and MLSTM_TEST_IMAGE must name a trainer image it can pull (built from trainer/Dockerfile).
Optional: MLSTM_TEST_NAMESPACE (default: the context's), MLSTM_TEST_SERVICE_ACCOUNT (default:
`default`, so the platform chart need not be installed), MLSTM_TEST_TIMEOUT seconds (default 900).
The job trains 3 steps of a 32-unit model on the trainer's embedded text, 2 pods x 1 CPU rank,
checkpointing to the pod's /tmp, so it needs no GPU and no S3.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from typer.testing import CliRunner

from mlstm_platform import jobs
from mlstm_platform.cli import app
from mlstm_platform.kubeconn import connect

KUBECONFIG = os.environ.get("MLSTM_TEST_KUBECONFIG", "")
pytestmark = pytest.mark.skipif(not KUBECONFIG, reason="set MLSTM_TEST_KUBECONFIG to run against a real cluster")


def test_tiny_cpu_job_succeeds_and_logs() -> None:
    image = os.environ.get("MLSTM_TEST_IMAGE")
    if not image:
        pytest.fail("MLSTM_TEST_IMAGE must name a trainer image the cluster can pull (docker build -f trainer/Dockerfile .)")
    namespace = os.environ.get("MLSTM_TEST_NAMESPACE")
    cluster_args = ["--kubeconfig", KUBECONFIG, *(["-n", namespace] if namespace else [])]
    name = f"mlstm-smoke-{uuid.uuid4().hex[:6]}"
    runner = CliRunner()
    submitted = runner.invoke(app, [
        "submit", "--name", name, "--image", image, "--gpus", "2", "--gpus-per-pod", "1", "--cpu-only",
        "--global-batch", "4", "--cpu", "1", "--memory", "2Gi", "--shm-size", "256Mi", "--ttl-after-finished", "600",
        "--service-account", os.environ.get("MLSTM_TEST_SERVICE_ACCOUNT", "default"), *cluster_args,
        "--steps", "3", "--hidden-size", "32", "--embed-dim", "8", "--seq-len", "16",
        "--checkpoint-dir", "/tmp/mlstm-smoke", "--checkpoint-every", "0",
    ])
    assert submitted.exit_code == 0, submitted.output
    cluster = connect(kubeconfig=KUBECONFIG, namespace=namespace)
    try:
        deadline = time.monotonic() + float(os.environ.get("MLSTM_TEST_TIMEOUT", "900"))
        state = "Pending"
        while time.monotonic() < deadline and state not in ("Succeeded", "Failed"):
            time.sleep(5)
            state = jobs.get_status(cluster, name, with_progress=False).state
        logs = runner.invoke(app, ["logs", name, *cluster_args])
        assert state == "Succeeded", f"job ended {state}; master log:\n{logs.output}"
        assert logs.exit_code == 0 and "trained 3 steps" in logs.output
        status = runner.invoke(app, ["status", name, *cluster_args])
        assert status.exit_code == 0 and "Succeeded" in status.output
    finally:
        runner.invoke(app, ["delete", name, *cluster_args])
