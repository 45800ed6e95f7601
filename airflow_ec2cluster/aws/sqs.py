"""SQS: the cluster's two queues, their counts and the re-drive's batches (the dead-letter peek: sqs_peek)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ec2cluster_worker.messages import REDRIVEN_ATTRIBUTE

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID, dead_letter_queue_name, task_queue_name
from airflow_ec2cluster.defaults import DEAD_LETTER_RETENTION_SECONDS
from airflow_ec2cluster.drain.decisions import QueueCounts
from airflow_ec2cluster.packing import MAX_MESSAGE_BYTES
from airflow_ec2cluster.tasklog import done_task_ids, log_key_of, unfinished_task_ids

# Entries per SendMessageBatch / DeleteMessageBatch, messages per ReceiveMessage.
SQS_BATCH_ENTRIES = 10
# One message, and one SendMessageBatch, carry at most 1 MiB, message attributes included (AWS-FACTS.md).
REDRIVEN_VALUE = "1"
# SQS counts an attribute's name, data type and value toward the message's size.
REDRIVEN_MARK_BYTES = len(REDRIVEN_ATTRIBUTE) + len("String") + len(REDRIVEN_VALUE)
REDRIVE_VISIBILITY_SECONDS = 60
QUEUE_COUNT_ATTRIBUTES = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
]
DLQ_COUNT_ATTRIBUTE = "ApproximateNumberOfMessages"
# Error codes of a queue that does not exist (the query API's, and the JSON protocol's).
NONEXISTENT_QUEUE_CODES = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


# -- the queues --------------------------------------------------------------------------------------------


def dead_letter_queue_params(cluster_id: str) -> dict[str, Any]:
    """CreateQueue arguments of the dead-letter queue: encrypted, the longest retention SQS allows."""
    return {
        "QueueName": dead_letter_queue_name(cluster_id),
        "Attributes": {
            "SqsManagedSseEnabled": "true",
            "MessageRetentionPeriod": str(DEAD_LETTER_RETENTION_SECONDS),
        },
        "tags": {TAG_CLUSTER_ID: cluster_id},
    }


def task_queue_params(
    cluster_id: str, dlq_arn: str, *, visibility_timeout: int, max_receive_count: int, retention_seconds: int
) -> dict[str, Any]:
    """CreateQueue arguments of the task queue: encrypted, redriven to ``dlq_arn`` after the receives."""
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    return {
        "QueueName": task_queue_name(cluster_id),
        "Attributes": {
            "SqsManagedSseEnabled": "true",
            "VisibilityTimeout": str(visibility_timeout),
            "MessageRetentionPeriod": str(retention_seconds),
            "RedrivePolicy": json.dumps(redrive),
        },
        "tags": {TAG_CLUSTER_ID: cluster_id},
    }


def queue_arn_params(queue_url: str) -> dict[str, Any]:
    return {"QueueUrl": queue_url, "AttributeNames": ["QueueArn"]}


def queue_arn_of(response: dict[str, Any]) -> str:
    return response["Attributes"]["QueueArn"]


# -- counts ------------------------------------------------------------------------------------------------


def queue_counts_params(queue_url: str) -> dict[str, Any]:
    """GetQueueAttributes arguments for the task queue's visible / in-flight / delayed counts."""
    return {"QueueUrl": queue_url, "AttributeNames": QUEUE_COUNT_ATTRIBUTES}


def dlq_counts_params(dlq_url: str) -> dict[str, Any]:
    """GetQueueAttributes arguments for the dead-letter queue's visible count."""
    return {"QueueUrl": dlq_url, "AttributeNames": [DLQ_COUNT_ATTRIBUTE]}


def counts_from_attributes(main: dict[str, str], dead: dict[str, str]) -> QueueCounts:
    return QueueCounts(
        visible=int(main.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(main.get("ApproximateNumberOfMessagesNotVisible", 0)),
        delayed=int(main.get("ApproximateNumberOfMessagesDelayed", 0)),
        dead_lettered=int(dead.get(DLQ_COUNT_ATTRIBUTE, 0)),
    )


# -- the client-side re-drive ------------------------------------------------------------------------------


def redrive_receive_params(dlq_url: str, wanted: int) -> dict[str, Any]:
    """ReceiveMessage arguments of the re-drive: hidden while being moved, a short long poll."""
    return {
        "QueueUrl": dlq_url,
        "MaxNumberOfMessages": wanted,
        "VisibilityTimeout": REDRIVE_VISIBILITY_SECONDS,
        "WaitTimeSeconds": 1,
    }


@dataclass(frozen=True)
class Redriven:
    """One dead-lettered message to move back: its failing tasks, and whether it carries tasks logged done."""

    entry_id: str
    message: dict[str, Any]
    failing_task_ids: tuple[str, ...]
    marked: bool  # sent with REDRIVEN_ATTRIBUTE, so the worker reads its task-log item first

    @property
    def size(self) -> int:
        return len(self.message["Body"].encode("utf-8")) + (REDRIVEN_MARK_BYTES if self.marked else 0)


@dataclass
class RedriveOutcome:
    """What a redrive moved: messages, the tasks in them that had not finished, and how many were marked."""

    messages: int = 0
    task_ids: list[str] = field(default_factory=list)
    marked: int = 0

    def add(self, moved: list[Redriven]) -> None:
        self.messages += len(moved)
        self.task_ids.extend(task_id for redriven in moved for task_id in redriven.failing_task_ids)
        self.marked += sum(1 for redriven in moved if redriven.marked)


def redrive_plan(messages: list[dict[str, Any]], items: dict[str, dict[str, Any]]) -> list[Redriven]:
    """What to move, given the messages received from the dead-letter queue and their task-log items.

    A message whose item shows some task done is marked: a moved message is new to SQS (receive count 1),
    and the mark is what tells the worker to skip those tasks. One with nothing done runs whole, unmarked,
    like a first delivery. A message already at SQS's 1 MiB has no room for the mark: it runs whole.
    """
    plan = []
    for index, message in enumerate(messages):
        item = items.get(log_key_of(message))
        body_bytes = len(message["Body"].encode("utf-8"))
        marked = bool(done_task_ids(item)) and body_bytes + REDRIVEN_MARK_BYTES <= MAX_MESSAGE_BYTES
        plan.append(Redriven(str(index), message, tuple(unfinished_task_ids(message, item)), marked))
    return plan


def resend_batches(plan: list[Redriven]) -> Iterator[list[Redriven]]:
    """The plan in SendMessageBatch-sized pieces: at most 10 entries and 1 MiB each."""
    batch: list[Redriven] = []
    size = 0
    for redriven in plan:
        if batch and (len(batch) == SQS_BATCH_ENTRIES or size + redriven.size > MAX_MESSAGE_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(redriven)
        size += redriven.size
    if batch:
        yield batch


def resend_params(queue_url: str, batch: list[Redriven]) -> dict[str, Any]:
    """SendMessageBatch arguments that put received messages on ``queue_url`` again, marked when planned."""
    entries = []
    for redriven in batch:
        entry: dict[str, Any] = {"Id": redriven.entry_id, "MessageBody": redriven.message["Body"]}
        if redriven.marked:
            entry["MessageAttributes"] = {
                REDRIVEN_ATTRIBUTE: {"DataType": "String", "StringValue": REDRIVEN_VALUE}
            }
        entries.append(entry)
    return {"QueueUrl": queue_url, "Entries": entries}


def delete_params(queue_url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """DeleteMessageBatch arguments for received messages."""
    return {
        "QueueUrl": queue_url,
        "Entries": [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
    }
