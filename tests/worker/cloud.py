"""Test helpers: the state table, a task queue with its dead-letter queue, and a worker subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from boto3.dynamodb.conditions import Key
from ec2cluster_worker import records
from ec2cluster_worker.messages import task_body

WORKER_SRC = Path(__file__).resolve().parents[2] / "worker"
TESTS_DIR = Path(__file__).resolve().parent
REGION = "us-east-1"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_state_table(name: str | None = None, region: str = REGION) -> str:
    """The state table as the controller creates it: pk/sk strings, on-demand billing."""
    name = name or unique("ec2cluster-state")
    client = boto3.client("dynamodb", region_name=region)
    client.create_table(
        TableName=name,
        **records.STATE_TABLE_SCHEMA,
    )
    client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return name


def create_task_queue(
    cluster_id: str, *, max_receive_count: int = 2, visibility: int = 30
) -> tuple[str, str]:
    """(task queue URL, dead-letter queue URL)."""
    sqs = boto3.client("sqs", region_name=REGION)
    dlq_url = sqs.create_queue(QueueName=f"{cluster_id}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url = sqs.create_queue(
        QueueName=f"{cluster_id}-tasks",
        Attributes={
            "VisibilityTimeout": str(visibility),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count}
            ),
        },
    )["QueueUrl"]
    return queue_url, dlq_url


def send_bodies(queue_url: str, bodies: list[str]) -> list[str]:
    """SendMessageBatch in tens; returns the message ids."""
    sqs = boto3.client("sqs", region_name=REGION)
    message_ids = []
    for start in range(0, len(bodies), 10):
        chunk = bodies[start : start + 10]
        response = sqs.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)]
        )
        assert not response.get("Failed"), response["Failed"]
        by_id = {entry["Id"]: entry["MessageId"] for entry in response["Successful"]}
        message_ids.extend(by_id[str(i)] for i in range(len(chunk)))
    return message_ids


def send_tasks(queue_url: str, tasks: dict[str, Any]) -> list[str]:
    return send_bodies(queue_url, [task_body(task_id, payload) for task_id, payload in tasks.items()])


def queue_counts(queue_url: str) -> dict[str, int]:
    sqs = boto3.client("sqs", region_name=REGION)
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return {"visible": int(attributes[names[0]]), "in_flight": int(attributes[names[1]])}


def receive_all(queue_url: str) -> list[dict[str, Any]]:
    """Every visible message (left in flight for 60 s)."""
    sqs = boto3.client("sqs", region_name=REGION)
    messages: list[dict[str, Any]] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=60
        ).get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)


def task_log(
    table: str, cluster_id: str, shards: int = records.DEFAULT_LOG_SHARDS
) -> dict[str, dict[str, Any]]:
    """Every task-log item of the cluster, by task id."""
    dynamodb = boto3.resource("dynamodb", region_name=REGION).Table(table)
    items: dict[str, dict[str, Any]] = {}
    for pk in records.all_log_pks(cluster_id, shards):
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key(records.PK).eq(pk)}
        while True:
            page = dynamodb.query(**kwargs)
            items.update({item["task_id"]: item for item in page["Items"]})
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return items


def worker_statuses(table: str, cluster_id: str) -> dict[str, dict[str, Any]]:
    dynamodb = boto3.resource("dynamodb", region_name=REGION).Table(table)
    page = dynamodb.query(KeyConditionExpression=Key(records.PK).eq(records.workers_pk(cluster_id)))
    return {item["worker_id"]: item for item in page["Items"]}


def worker_config(cluster_id: str, queue_url: str, table: str, **overrides: Any) -> dict[str, Any]:
    """A configuration with short times, for tests."""
    config: dict[str, Any] = {
        "cluster_id": cluster_id,
        "region": REGION,
        "queue_url": queue_url,
        "state_table": table,
        "handler": {"type": "python", "target": "sample_handlers:echo"},
        "task_timeout_seconds": 10,
        "visibility_timeout_seconds": 10,
        "heartbeat_seconds": 1,
        "idle_shutdown_seconds": 2,
        "wait_time_seconds": 1,
    }
    config.update(overrides)
    return config


def worker_env(worker_id: str | None = "w-test", **extra: str) -> dict[str, str]:
    """The test process's environment (fake credentials, AWS_ENDPOINT_URL) plus what a worker needs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(WORKER_SRC)])
    env["PYTHONUNBUFFERED"] = "1"
    if worker_id is None:
        env.pop("EC2CLUSTER_WORKER_ID", None)
    else:
        env["EC2CLUSTER_WORKER_ID"] = worker_id
    env.pop("EC2CLUSTER_IMDS_URL", None)
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m ec2cluster_worker`` as a subprocess; its stderr (JSON lines) goes to a file."""

    def __init__(self, config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
        self._log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ec2cluster_worker", "--config", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env or worker_env(),
        )

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log_file.close()

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "text", "text": line})
        return events

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(event.get("event") == name for event in self.events()) >= count:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited before {count} {name!r}: {self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {count} {name!r} within {timeout} s: {self.log_path.read_text()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()
