"""Re-driving dead letters: the hook's move, the operator and the `ec2cluster redrive` command."""

from __future__ import annotations

import argparse
import json

import boto3
import pytest

from airflow_ec2cluster.commands import redrive
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import EC2ClusterRedriveOperator
from tests.plugin.conftest import REGION


@pytest.fixture
def queues(aws, cluster_id):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
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


def test_hook_moves_a_bounded_batch_then_the_rest(queues):
    hook, queue_url, dlq_url = queues
    first = hook.redrive_dead_letters(dlq_url, queue_url, limit=5)
    assert len(first) == 5 and visible(queue_url) == 5 and visible(dlq_url) == 18
    rest = hook.redrive_dead_letters(dlq_url, queue_url)
    assert sorted(first + rest) == [f"t{i:09d}" for i in range(23)]
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
    assert out.startswith("moved 3 message(s) back to ") and out.count("t0000000") == 3
    missing = parser.parse_args(["redrive", "no-such-cluster", "--region", REGION])
    assert missing.handler(missing) == 1
