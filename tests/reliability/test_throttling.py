"""Throttling and 5xx on a share of every AWS call (controller and workers): the job completes exactly."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from .faultproxy import FaultProxy
from .harness import Job

TASKS = 500
WORKERS = 3
FAULT_SHARE = 0.15
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_job_completes_through_injected_throttling_and_5xx(cloud_env, monkeypatch):
    with FaultProxy(cloud_env.endpoint_url, FAULT_SHARE) as proxy:
        # The controller's connection and every worker the runner starts from now on go through the proxy.
        connection = json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])
        connection["extra"]["endpoint_url"] = proxy.url
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setitem(cloud_env._runner.cloud_env, "AWS_ENDPOINT_URL", proxy.url)
        job = Job(cloud_env, "throttle")
        job.enqueue([{"n": n} for n in range(TASKS)])
        job.launch(WORKERS, "handlers:double")
        summary = job.drain(timeout=150)
        job.teardown()
        job.assert_nothing_left()
        results = job.results()
    injected = sum(proxy.injected.values())
    calls = injected + sum(proxy.forwarded.values())
    # About FAULT_SHARE of every call failed (10 tasks a message: ~250 calls in all, not ~500).
    assert injected >= FAULT_SHARE * calls / 2, (calls, proxy.injected)
    worker_actions = {"ReceiveMessage", "DeleteMessageBatch", "BatchWriteItem", "PutItem"}
    assert worker_actions <= set(proxy.injected), proxy.injected
    assert sorted(r["task_id"] for r in results) == [f"t{n:09d}" for n in range(TASKS)]
    assert all(r["status"] == "done" and r["result"] == {"n": 2 * int(r["task_id"][1:])} for r in results)
    assert summary["tasks_done"] == TASKS and summary["dead_lettered"] == 0
    # Nothing doubled: one RunInstances worth of workers, one message per task.
    assert summary["workers_used"] == WORKERS, summary
    executions = job.executions()
    print(
        f"\nRELIABILITY throttling: tasks={TASKS} share={FAULT_SHARE} injected={injected} "
        f"calls={calls} by_action={dict(proxy.injected.most_common())} "
        f"duplicate_executions={sum(c - 1 for c in executions.values())} results={len(results)} lost=0"
    )


def python_files(*packages: str) -> list[Path]:
    return [path for package in packages for path in sorted((REPO_ROOT / package).rglob("*.py"))]


# The boot loader runs on the image's own Python, before anything is installed: no botocore there, so its
# few HTTP calls (IMDS, one S3 GetObject, status PutItems) carry their own bounded retries.
WITHOUT_BOTOCORE = ("worker/ec2cluster_worker/boot.py",)


def test_no_hand_written_sleep_and_retry_loops():
    """Retries are botocore's: no sleep in the code that calls AWS (hook, operators, sensor, worker)."""
    offenders = []
    for path in python_files(
        "worker/ec2cluster_worker",
        "airflow_ec2cluster/hooks",
        "airflow_ec2cluster/operators",
        "airflow_ec2cluster/sensors",
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                if name == "sleep" and str(path.relative_to(REPO_ROOT)) not in WITHOUT_BOTOCORE:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert offenders == []
    for exempt in WITHOUT_BOTOCORE:  # exempt only while it truly cannot use botocore
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(ast.parse((REPO_ROOT / exempt).read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        assert not imported & {"boto3", "botocore"}, exempt


def test_clients_use_botocore_retry_modes():
    from ec2cluster_worker.aws import client_config

    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    assert client_config().retries["mode"] in ("standard", "adaptive")
    hook = EC2ClusterHook(aws_conn_id=None, region_name="us-east-1")
    assert hook.client_config().retries["mode"] in ("standard", "adaptive")
