"""The reference loops the worker is measured against: small, honest boto3 loops on the same server.

- ``naive_loop``: receive 1, run, PutItem the result, PutItem the task log, delete 1 (4 calls per task).
- ``bare_batched_loop``: what the worker does with nothing else: receive 10, run, one BatchWriteItem of the
  task-log items (result inline), one DeleteMessageBatch. Also runnable as a process:
  ``python -m benchmarks.references --queue-url URL --table T --cluster C --worker-id W``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import boto3
from botocore.config import Config
from ec2cluster_worker import records

from .handlers import noop

WAIT_SECONDS = 1
RETENTION_SECONDS = 30 * 24 * 3600


def log_item(cluster_id: str, worker_id: str, message: dict[str, Any], started: float, result: Any = None):
    """A task-log item in DynamoDB's typed format, the same attributes as the worker's."""
    body = json.loads(message["Body"])
    finished = time.time()
    item = {
        **{key: {"S": value} for key, value in records.task_log_key(cluster_id, body["task_id"]).items()},
        "task_id": {"S": body["task_id"]},
        "status": {"S": records.TASK_DONE},
        "cluster_id": {"S": cluster_id},
        "worker_id": {"S": worker_id},
        "message_id": {"S": message["MessageId"]},
        "attempt": {"N": "1"},
        "started_at": {"N": f"{started:.3f}"},
        "finished_at": {"N": f"{finished:.3f}"},
        "duration_s": {"N": f"{finished - started:.3f}"},
        records.TTL_ATTRIBUTE: {"N": str(int(finished) + RETENTION_SECONDS)},
    }
    if result is not None:
        item["result"] = {"S": json.dumps(result)}
    return item


def run_task(message: dict[str, Any]) -> Any:
    return noop(json.loads(message["Body"])["payload"], None)


def naive_loop(sqs: Any, dynamodb: Any, queue_url: str, table: str, cluster_id: str, worker_id: str) -> int:
    """Until the queue reads empty: tasks completed."""
    done = 0
    while True:
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=WAIT_SECONDS
        ).get("Messages", [])
        if not messages:
            return done
        message = messages[0]
        started = time.time()
        result = run_task(message)
        task = json.loads(message["Body"])["task_id"]
        dynamodb.put_item(
            TableName=table,
            Item={"pk": {"S": f"C#{cluster_id}#R"}, "sk": {"S": task}, "result": {"S": json.dumps(result)}},
        )
        dynamodb.put_item(TableName=table, Item=log_item(cluster_id, worker_id, message, started))
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        done += 1


def bare_batched_loop(
    sqs: Any, dynamodb: Any, queue_url: str, table: str, cluster_id: str, worker_id: str
) -> int:
    """Until the queue reads empty: tasks completed."""
    done = 0
    while True:
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=WAIT_SECONDS, VisibilityTimeout=120
        ).get("Messages", [])
        if not messages:
            return done
        items = []
        for message in messages:
            started = time.time()
            items.append(log_item(cluster_id, worker_id, message, started, run_task(message)))
        requests: dict[str, Any] = {table: [{"PutRequest": {"Item": item}} for item in items]}
        while requests:
            requests = dynamodb.batch_write_item(RequestItems=requests).get("UnprocessedItems") or {}
        response = sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
        if response.get("Failed"):
            raise RuntimeError(f"DeleteMessageBatch refused {response['Failed']}")
        done += len(messages)


def clients(session: boto3.session.Session | None = None) -> tuple[Any, Any]:
    session = session or boto3.session.Session()
    config = Config(retries={"mode": "standard", "max_attempts": 10}, read_timeout=40)
    return session.client("sqs", config=config), session.client("dynamodb", config=config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The bare batched loop, as a process.")
    for name in ("--queue-url", "--table", "--cluster", "--worker-id"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    sqs, dynamodb = clients()
    bare_batched_loop(sqs, dynamodb, args.queue_url, args.table, args.cluster, args.worker_id)


if __name__ == "__main__":
    main()
