"""A dead-letter peek lists up to the limit asked for (not 10) and leaves every message there."""

from __future__ import annotations

import asyncio
import json

import boto3
import pytest

from airflow_ec2cluster.aws.sqs_peek import DeadLetterPeek
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from tests.plugin.conftest import REGION


@pytest.fixture
def dead_letter_queue(aws):
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="peek-dlq")["QueueUrl"]
    for start in range(0, 30, 10):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "MessageBody": json.dumps({"task_id": f"t{i:09d}", "payload": {}})}
                for i in range(start, start + 10)
            ],
        )
    return url


def visible(url: str) -> int:
    attributes = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def test_a_peek_lists_every_dead_letter_up_to_its_limit_and_gives_them_back(dead_letter_queue):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    assert sorted(hook.peek_dead_letters(dead_letter_queue, 50)) == [f"t{i:09d}" for i in range(30)]
    # Visible again at once: a redrive or a status right after sees all of them.
    assert visible(dead_letter_queue) == 30
    assert len(hook.peek_dead_letters(dead_letter_queue, 25)) == 25
    assert visible(dead_letter_queue) == 30


def test_the_async_peek_lists_them_too(dead_letter_queue):
    from airflow_ec2cluster.hooks.async_io import AsyncClusterIO

    class SyncAsAsync:
        """moto is in-process: the sync client's answers, awaited."""

        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            method = getattr(self.client, name)

            async def call(**kwargs):
                return method(**kwargs)

            return call

    services = ("sqs", "ec2", "dynamodb", "logs")
    clients = {s: SyncAsAsync(boto3.client(s, region_name=REGION)) for s in services}
    io = AsyncClusterIO(clients)
    assert len(asyncio.run(io.peek_dead_letters(dead_letter_queue, 50))) == 30
    assert visible(dead_letter_queue) == 30


def test_the_peek_stops_at_its_limit_or_at_an_answer_with_nothing_new():
    peek = DeadLetterPeek("q", 15)
    assert peek.next_receive()["MaxNumberOfMessages"] == 10
    peek.add({"Messages": [message(i) for i in range(10)]})
    assert peek.next_receive()["MaxNumberOfMessages"] == 5
    peek.add({"Messages": [message(i) for i in range(10, 15)]})
    assert peek.next_receive() is None and len(peek.keys()) == 15
    assert [len(p["Entries"]) for p in peek.give_back()] == [10, 5]

    repeated = DeadLetterPeek("q", 100)
    repeated.add({"Messages": [message(0)]})
    repeated.add({"Messages": [message(0)]})
    assert repeated.next_receive() is None and repeated.keys() == ["t000000000"]
    assert DeadLetterPeek("q", 0).next_receive() is None


def message(i: int) -> dict:
    return {"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": json.dumps({"task_id": f"t{i:09d}"})}


def test_the_drain_summary_lists_thirty_dead_letters(aws, context, cluster_id, ami_id, instance_profile):
    """The summary's limit is 100 dead-lettered messages: all 30 of this job (it listed 10)."""
    import logging

    from ec2cluster_worker import records

    from airflow_ec2cluster.calls import run_sync
    from airflow_ec2cluster.drain.round import DrainSettings, drain_round
    from tests.plugin.conftest import enqueue_and_launch

    table = "ec2cluster-state-peek"
    cluster = enqueue_and_launch(context, cluster_id, ami_id, table, tasks=10)
    sqs = boto3.client("sqs", region_name=REGION)
    taken: list[dict] = []
    while len(taken) < 10:  # play the workers: every task done and logged
        taken += sqs.receive_message(QueueUrl=cluster["queue_url"], MaxNumberOfMessages=10).get(
            "Messages", []
        )
    for batch_start in (0, 5):
        sqs.delete_message_batch(
            QueueUrl=cluster["queue_url"],
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(taken[batch_start : batch_start + 5])
            ],
        )
    with boto3.resource("dynamodb", region_name=REGION).Table(table).batch_writer() as batch:
        for i in range(10):
            task_id = f"t{i:09d}"
            batch.put_item(
                Item={**records.task_log_key(cluster_id, task_id), "task_id": task_id, "status": "done"}
            )
    dead = [f"p{i:09d}" for i in range(30)]
    for start in range(0, 30, 10):
        sqs.send_message_batch(
            QueueUrl=cluster["dlq_url"],
            Entries=[
                {"Id": str(i), "MessageBody": json.dumps({"task_id": t})}
                for i, t in enumerate(dead[start : start + 10])
            ],
        )
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    settings = DrainSettings(state_table=table, drained_checks=2)
    log = logging.getLogger(__name__)
    outcome = run_sync(drain_round(cluster_id, settings, log), hook)
    while not outcome.drained:
        assert outcome.failure is None
        outcome = run_sync(drain_round(cluster_id, settings, log), hook)
    assert sorted(outcome.summary["dead_lettered_task_ids"]) == dead
    assert visible(cluster["dlq_url"]) == 30
