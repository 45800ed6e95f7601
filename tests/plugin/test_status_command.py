"""`ec2cluster status` on a known cluster: workers table, queue, progress, dead letters with errors."""

from __future__ import annotations

import argparse
import json
import time

import boto3
import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.commands import status
from tests.plugin.conftest import REGION, enqueue_and_launch

TABLE = "ec2cluster-state-status"


@pytest.fixture
def known_cluster(aws, context, cluster_id, ami_id, instance_profile):
    cluster = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=10)
    now = int(time.time())
    table = boto3.resource("dynamodb", region_name=REGION).Table(TABLE)
    busy_id, idle_id = cluster["instance_ids"]
    base = {"pk": records.workers_pk(cluster_id), "state": "running", "started_at": now - 100}
    table.put_item(
        Item={
            **base,
            "sk": busy_id,
            "worker_id": busy_id,
            "heartbeat_at": now,
            "busy": True,
            "busy_since": now - 5,
            "tasks_done": 3,
            "tasks_failed": 1,
            "last_completion_at": now - 10,
        }
    )
    table.put_item(
        Item={
            **base,
            "sk": idle_id,
            "worker_id": idle_id,
            "heartbeat_at": now,
            "busy": False,
            "idle_since": now - 40,
            "tasks_done": 1,
            "tasks_failed": 0,
            "last_completion_at": now - 40,
        }
    )
    table.put_item(
        Item={
            **records.task_log_key(cluster_id, "t000000007"),
            "task_id": "t000000007",
            "status": "failed",
            "error": "ZeroDivisionError: division by zero\n  at line 3",
        }
    )
    sqs = boto3.client("sqs", region_name=REGION)
    taken = sqs.receive_message(QueueUrl=cluster["queue_url"], MaxNumberOfMessages=5)["Messages"]
    sqs.delete_message_batch(
        QueueUrl=cluster["queue_url"],
        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(taken[:4])],
    )
    sqs.send_message(QueueUrl=cluster["dlq_url"], MessageBody=json.dumps({"task_id": "t000000007"}))
    return {**cluster, "busy_id": busy_id, "idle_id": idle_id}


def test_status_output_on_a_known_cluster(known_cluster, capsys):
    parser = argparse.ArgumentParser()
    status.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["status", known_cluster["cluster_id"], "--state-table", TABLE, "--region", REGION]
    )
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    # The provider's own log line about credentials may precede the output (Airflow's structlog on stdout).
    lines = out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("cluster ")) :]
    assert lines[0] == f"cluster {known_cluster['cluster_id']}"
    # 3 + 1 done/failed by the busy worker, 1 by the idle one: 5 of 10.
    assert "[###############...............]  50.0%  5/10 finished" in lines[1]
    assert "ETA" in lines[1] and "ETA -" not in lines[1]
    assert lines[2].startswith("messages visible 5  in flight 1  delayed 0  dead-lettered 1")
    busy = next(line for line in lines if line.startswith(known_cluster["busy_id"]))
    idle = next(line for line in lines if line.startswith(known_cluster["idle_id"]))
    assert busy.split()[1:5] == ["running", "running", "3", "1"] and "busy " in busy
    # Idle since 40 s before the fixture's clock read, plus however long moto took since (slow under load).
    assert idle.split()[1:5] == ["running", "running", "1", "0"] and 40 <= int(idle.split()[-1][:-1]) < 120
    assert "t000000007  ZeroDivisionError: division by zero at line 3" in out
    assert f"ec2cluster redrive {known_cluster['cluster_id']}" in out


def test_status_of_an_unknown_cluster_fails(aws, capsys):
    parser = argparse.ArgumentParser()
    status.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", "nope", "--state-table", TABLE, "--region", REGION])
    boto3.client("dynamodb", region_name=REGION).create_table(
        TableName=TABLE,
        **records.STATE_TABLE_SCHEMA,
    )
    assert args.handler(args) == 1
    assert "has no META item" in capsys.readouterr().err
