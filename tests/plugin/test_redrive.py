"""Re-driving dead letters: the hook's move, the operator and the `ec2cluster redrive` command."""

from __future__ import annotations

import argparse
import json

import boto3
import pytest
from ec2cluster_worker import records
from ec2cluster_worker.messages import REDRIVEN_ATTRIBUTE, group_body
from ec2cluster_worker.tasklog import wire_item

from airflow_ec2cluster.commands import redrive
from airflow_ec2cluster.defaults import DEFAULT_LOG_SHARDS, DEFAULT_STATE_TABLE
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import EC2ClusterRedriveOperator
from tests.plugin.conftest import REGION

TABLE = DEFAULT_STATE_TABLE


@pytest.fixture
def queues(aws, cluster_id):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    hook.ensure_state_table(TABLE)
    queue_url, dlq_url = hook.ensure_queues(cluster_id)
    sqs = boto3.client("sqs", region_name=REGION)
    for i in range(23):
        body = json.dumps({"task_id": f"t{i:09d}", "payload": {"n": i}})
        sqs.send_message(QueueUrl=dlq_url, MessageBody=body)
    return hook, queue_url, dlq_url


def visible(url: str) -> int:
    attributes = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def test_hook_moves_a_bounded_batch_then_the_rest(queues, cluster_id):
    hook, queue_url, dlq_url = queues
    where = {"table": TABLE, "cluster_id": cluster_id}
    first = hook.redrive_dead_letters(dlq_url, queue_url, limit=5, **where)
    assert first.messages == 5 and visible(queue_url) == 5 and visible(dlq_url) == 18
    rest = hook.redrive_dead_letters(dlq_url, queue_url, **where)
    assert sorted(first.task_ids + rest.task_ids) == [f"t{i:09d}" for i in range(23)]
    assert first.marked == rest.marked == 0  # nothing logged done: they run as first deliveries
    assert visible(queue_url) == 23 and visible(dlq_url) == 0
    bodies = boto3.client("sqs", region_name=REGION).receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=1
    )
    assert json.loads(bodies["Messages"][0]["Body"])["payload"]["n"] in range(23)


def test_operator_moves_everything_back(queues, cluster_id, context):
    hook, queue_url, dlq_url = queues
    result = EC2ClusterRedriveOperator(
        task_id="redrive", cluster_id=cluster_id, aws_conn_id=None, region_name=REGION
    ).execute(context)
    assert result["redriven"] == 23 and len(set(result["task_ids"])) == 23 and visible(dlq_url) == 0


def test_command_prints_the_moved_ids(queues, cluster_id, capsys):
    parser = argparse.ArgumentParser()
    redrive.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["redrive", cluster_id, "--max", "3", "--region", REGION])
    assert args.handler(args) == 0
    # The provider's own log line about credentials may precede the output (Airflow's structlog on stdout).
    out = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("moved "))
    assert out.startswith("moved 3 message(s) back to ") and "; 3 task(s) to run again: t0000000" in out
    assert out.count("t0000000") == 3
    missing = parser.parse_args(["redrive", "no-such-cluster", "--region", REGION])
    assert missing.handler(missing) == 1


def log_group(cluster_id: str, key: str, entries: list[tuple[str, str]]) -> None:
    """A group's task-log item as a worker writes it: ``(task_id, status)`` per task."""
    item = {
        **records.task_log_key(cluster_id, key, DEFAULT_LOG_SHARDS),
        "task_id": key,
        "status": "failed",
        "tasks": [
            {
                "task_id": task_id,
                "status": status,
                **({"error": "ValueError: bad"} if status == "failed" else {}),
            }
            for task_id, status in entries
        ],
    }
    boto3.client("dynamodb", region_name=REGION).put_item(TableName=TABLE, Item=wire_item(item))


def test_a_group_is_named_by_its_failing_tasks_and_marked_when_some_are_done(aws, cluster_id, context):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    hook.ensure_state_table(TABLE)
    queue_url, dlq_url = hook.ensure_queues(cluster_id)
    sqs = boto3.client("sqs", region_name=REGION)
    partly_done = group_body([(f"a{i}", i) for i in range(5)])
    never_logged = group_body([("b0", 0), ("b1", 1)])
    sqs.send_message(QueueUrl=dlq_url, MessageBody=partly_done)
    sqs.send_message(QueueUrl=dlq_url, MessageBody=never_logged)
    log_group(cluster_id, "a0", [("a0", "done"), ("a1", "failed"), ("a2", "done"), ("a3", "done")])

    result = EC2ClusterRedriveOperator(
        task_id="redrive", cluster_id=cluster_id, aws_conn_id=None, region_name=REGION
    ).execute(context)
    # a1 failed and a4 never ran (the item is partial); b's group never got an item: all its tasks.
    assert result["redriven"] == 2 and sorted(result["task_ids"]) == ["a1", "a4", "b0", "b1"]
    moved = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=1
    )["Messages"]
    marks = {m["Body"]: m.get("MessageAttributes", {}).get(REDRIVEN_ATTRIBUTE) for m in moved}
    # Only the message with tasks logged done is marked: the worker reads the task log for it alone.
    assert marks[partly_done] == {"DataType": "String", "StringValue": "1"} and marks[never_logged] is None
