"""The ``ec2cluster`` command as a user runs it (a process of its own, against a moto server on loopback).

Its stdout is its own output only (no Airflow or botocore log lines) unless --verbose, which sends them to
stderr; a failure is one line and a non-zero exit; ``status --watch`` ends on a torn-down cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.meta import MetaUpdate
from tests.plugin.conftest import REGION

TABLE = "ec2cluster-state-cli"
# A ceiling against a hang (the command never ending), not a speed expectation: on a loaded 2-core
# machine, starting an interpreter that imports Airflow alone takes 15 s.
HANG_GUARD_SECONDS = 300
# A log line as Airflow's structlog or the stdlib handler writes it.
LOG_LINE = re.compile(r"\[(info|debug|warning)\s*\]|\b(INFO|DEBUG)\b")


def ec2cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "airflow_ec2cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
        env={**os.environ, "NO_COLOR": "1"},
    )


@pytest.fixture
def torn_down_cluster(aws_endpoint):
    """A cluster whose teardown is recorded: queues kept and empty, the task log short of the enqueued count
    (a worker killed before logging), so only the teardown says the job will not move again."""
    import boto3

    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    cluster_id = f"cli-{uuid.uuid4().hex[:12]}"
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    hook.ensure_state_table(TABLE)
    queue_url, dlq_url = hook.ensure_queues(cluster_id)
    now = time.time()
    update = MetaUpdate(
        queue_url=queue_url,
        dlq_url=dlq_url,
        enqueued=10,
        enqueued_messages=10,
        enqueue_complete=True,
        num_workers=1,
        launched_at=now - 600,
        torn_down_at=now - 5,
    )
    hook.update_meta(TABLE, cluster_id, update)
    boto3.resource("dynamodb", region_name=REGION).Table(TABLE).put_item(
        Item={
            records.PK: records.workers_pk(cluster_id),
            records.SK: "i-0123456789abcdef0",
            "worker_id": "i-0123456789abcdef0",
            "state": "stopped",
            "stop_reason": "queue-deleted",
            "started_at": int(now - 590),
            "heartbeat_at": int(now - 10),
            "busy": False,
            "tasks_done": 9,
            "tasks_failed": 0,
        }
    )
    with boto3.resource("dynamodb", region_name=REGION).Table(TABLE).batch_writer() as batch:
        for i in range(9):
            task_id = f"t{i:09d}"
            batch.put_item(
                Item={**records.task_log_key(cluster_id, task_id), "task_id": task_id, "status": "done"}
            )
    return {"cluster_id": cluster_id, "queue_url": queue_url, "dlq_url": dlq_url, "hook": hook}


def status_args(cluster_id: str, *extra: str) -> list[str]:
    return ["status", cluster_id, "--state-table", TABLE, "--region", REGION, *extra]


def test_the_command_prints_its_own_output_only(torn_down_cluster):
    done = ec2cluster(*status_args(torn_down_cluster["cluster_id"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"cluster {torn_down_cluster['cluster_id']}\n")
    assert not LOG_LINE.search(done.stdout) and done.stderr == ""


def test_verbose_logs_go_to_stderr(torn_down_cluster):
    done = ec2cluster(*status_args(torn_down_cluster["cluster_id"], "--verbose"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"cluster {torn_down_cluster['cluster_id']}\n")
    assert LOG_LINE.search(done.stderr) and not LOG_LINE.search(done.stdout)


def test_a_failure_is_one_line_and_a_non_zero_exit(aws_endpoint):
    done = ec2cluster("status", "nope", "--state-table", "no-such-table", "--region", REGION)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "ec2cluster status: ValueError: state table no-such-table does not exist (wrong --state-table or "
        "--region?) (--verbose for the traceback)"
    ]


def test_watch_ends_on_a_torn_down_cluster(torn_down_cluster):
    done = ec2cluster(*status_args(torn_down_cluster["cluster_id"], "--watch", "--interval", "0.5"))
    assert done.returncode == 0, done.stderr
    assert "state torn down" in done.stdout and "9/10 finished (done 9, failed 0" in done.stdout


def test_watch_ends_when_the_teardown_deleted_the_queues(torn_down_cluster):
    hook = torn_down_cluster["hook"]
    hook.delete_queue(torn_down_cluster["queue_url"])
    hook.delete_queue(torn_down_cluster["dlq_url"])
    done = ec2cluster(*status_args(torn_down_cluster["cluster_id"], "--watch", "--interval", "0.5"))
    assert done.returncode == 0, done.stderr
    assert "queues deleted" in done.stdout and "state torn down" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
