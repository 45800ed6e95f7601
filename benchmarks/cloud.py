"""Where the benchmarks' AWS lives: the local cloud's moto server (a subprocess), and the resources they use.

The server runs in its own process so that this process's CPU time and memory are the client's alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from ec2cluster_localcloud.server import READY_PREFIX
from ec2cluster_worker import records

from airflow_ec2cluster.packing import PendingTask, pack_tasks

REGION = "us-east-1"
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 10}, max_pool_connections=32)


def client_env(endpoint_url: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def pointed_at(env: dict[str, str]) -> Iterator[None]:
    """boto3 (and child processes) in this process use ``env`` until the block ends."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_shared: list[str] = []


@contextlib.contextmanager
def shared_server() -> Iterator[None]:
    """Within this block every ``moto_server()`` is one server (several benchmarks in one process)."""
    with moto_server() as endpoint_url:
        _shared.append(endpoint_url)
        try:
            yield
        finally:
            _shared.pop()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """The local cloud's server (moto with the SQS speed-up) on 127.0.0.1; yields its endpoint URL.

    Every benchmark uses its own fresh queues and table, so sharing a server changes no count.
    """
    if _shared:
        with pointed_at(client_env(_shared[-1])):
            yield _shared[-1]
        return
    command = [sys.executable, "-m", "ec2cluster_localcloud.server", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        line = process.stdout.readline().decode().strip()
        if not line.startswith(READY_PREFIX + " "):
            raise RuntimeError(f"the moto server did not start: {line!r}")
        endpoint_url = line.split(" ", 1)[1]
        with pointed_at(client_env(endpoint_url)):
            yield endpoint_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


NOOP_HANDLER = {"type": "python", "target": "benchmarks.handlers:noop"}


def noop_worker_config(cluster_id: str, queue_url: str, table: str) -> dict:
    """A worker configuration for benchmarks: defaults everywhere except how soon an idle worker exits (so
    the run ends) and the long poll, which is the reference loops' (1 s): every side waits the same at the
    tail, outside any timed window."""
    return {
        "cluster_id": cluster_id,
        "region": REGION,
        "queue_url": queue_url,
        "state_table": table,
        "handler": NOOP_HANDLER,
        "idle_shutdown_seconds": 1,
        "wait_time_seconds": 1,
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def client(service: str):
    return boto3.client(service, region_name=REGION, config=CLIENT_CONFIG)


def create_state_table(name: str | None = None) -> str:
    name = name or unique("bench-state")
    dynamodb = client("dynamodb")
    dynamodb.create_table(
        TableName=name,
        **records.STATE_TABLE_SCHEMA,
    )
    dynamodb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return name


def create_queue(name: str | None = None) -> str:
    """A fresh standard queue with a dead-letter queue, as the controller makes them."""
    name = name or unique("bench")
    sqs = client("sqs")
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return sqs.create_queue(
        QueueName=f"{name}-tasks",
        Attributes={
            "VisibilityTimeout": "120",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}),
        },
    )["QueueUrl"]


def task_id(index: int) -> str:
    return f"t{index:09d}"


def fill_queue(queue_url: str, count: int, tasks_per_message: int = 1) -> None:
    """``count`` no-op tasks, ``tasks_per_message`` a message, sent with SendMessageBatch (not counted)."""
    send_payloads(queue_url, [{"n": n} for n in range(count)], tasks_per_message)


def send_payloads(queue_url: str, payloads: list[Any], tasks_per_message: int) -> None:
    """A task per payload, ``tasks_per_message`` a message, sent with SendMessageBatch (not counted)."""
    sqs = client("sqs")
    tasks = (PendingTask(task_id(n), payload, f"item {n}") for n, payload in enumerate(payloads))
    bodies = [message.body for message in pack_tasks(tasks, tasks_per_message)]
    for start in range(0, len(bodies), 10):
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])]
        failed = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed")
        if failed:
            raise RuntimeError(f"SQS refused {len(failed)} messages: {failed[:3]}")


def queue_empty(queue_url: str) -> bool:
    attributes = client("sqs").get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(int(value) == 0 for value in attributes.values())


def tasks_done(items: list[dict]) -> int:
    """Tasks done over task-log items (low-level form): a group's item counts its done tasks."""
    done = 0
    for item in items:
        if "tasks_done" in item:
            done += int(item["tasks_done"]["N"])
        elif item["status"]["S"] == "done":
            done += 1
    return done


def task_log_items(table: str, cluster_id: str, shards: int = records.DEFAULT_LOG_SHARDS) -> list[dict]:
    paginator = client("dynamodb").get_paginator("query")
    items = []
    for pk in records.all_log_pks(cluster_id, shards):
        for page in paginator.paginate(
            TableName=table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
        ):
            items.extend(page["Items"])
    return items
