"""Task messages: an SQS message body carries one task or a group of tasks.

- one task: ``{"task_id": "...", "payload": <any JSON>}``;
- a group: ``{"tasks": [{"task_id": "...", "payload": ...}, ...]}`` (1 to MAX_TASKS_PER_MESSAGE tasks, ids
  unique within the message). Grouping cuts the per-task cost: one receive, one task-log item and one
  delete serve every task of the message.

Either way the message is one TaskMessage whose ``log_key`` (its first task's id) keys its task-log item.
A body of any other shape becomes a Malformed value (never an exception), logged under task id
``malformed-<MessageId>`` and left undeleted so that redrive moves it to the dead-letter queue.
Keys other than these are ignored, so that a newer controller can add some.

A message the controller's redrive moved back from the dead-letter queue is a new SQS message (its receive
count starts again at 1), so the redrive marks it with the message attribute REDRIVEN_ATTRIBUTE: the worker
treats a marked message as a redelivery and reads its task-log item, so the tasks already done are not run
again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
# A group's results share one task-log item (at most 400 KB) and its body one SQS message (at most 1 MiB).
MAX_TASKS_PER_MESSAGE = 100
# Set by the controller's redrive (airflow_ec2cluster.aws.sqs) on a moved message that has tasks logged done.
REDRIVEN_ATTRIBUTE = "ec2cluster-redriven"


@dataclass(frozen=True)
class Delivery:
    """What SQS says about one receipt of a message."""

    message_id: str
    receipt_handle: str
    attempt: int  # ApproximateReceiveCount
    redriven: bool = False  # moved back from the dead-letter queue, marked by the redrive


@dataclass(frozen=True)
class Task:
    task_id: str
    payload: Any
    delivery: Delivery


@dataclass(frozen=True)
class TaskMessage:
    delivery: Delivery
    tasks: tuple[Task, ...]
    grouped: bool  # the body was a group (its task-log item lists the tasks), even a group of one

    @property
    def log_key(self) -> str:
        return self.tasks[0].task_id

    @property
    def redelivered(self) -> bool:
        """An earlier delivery may have logged some tasks done: a receive count above 1, or a redrive mark."""
        return self.delivery.attempt > 1 or self.delivery.redriven


@dataclass(frozen=True)
class Malformed:
    error: str
    delivery: Delivery

    @property
    def log_key(self) -> str:
        return f"malformed-{self.delivery.message_id}"

    task_id = log_key


Parsed = Union[TaskMessage, Malformed]  # noqa: UP007 (evaluated at run time; Python 3.9)


def delivery_of(message: dict[str, Any]) -> Delivery:
    attempt_text = message.get("Attributes", {}).get("ApproximateReceiveCount", "1")
    try:
        attempt = int(attempt_text)
    except ValueError:
        attempt = 1
    return Delivery(
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        attempt=attempt,
        redriven=REDRIVEN_ATTRIBUTE in message.get("MessageAttributes", {}),
    )


def task_problem(body: Any, where: str = "body") -> str | None:
    """What is wrong with one task object, or None."""
    if not isinstance(body, dict):
        return f"{where} is a JSON {type(body).__name__}, not an object with task_id and payload"
    if "task_id" not in body or "payload" not in body:
        missing = [key for key in ("task_id", "payload") if key not in body]
        return f"{where} has no {' and no '.join(missing)}"
    if not isinstance(body["task_id"], str) or not TASK_ID_RE.match(body["task_id"]):
        return f"{where}: task_id {body['task_id']!r:.220} is not 1-200 characters of [A-Za-z0-9_.:-]"
    return None


def group_problem(tasks: Any) -> str | None:
    if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS_PER_MESSAGE:
        return f"body's tasks is not a list of 1-{MAX_TASKS_PER_MESSAGE} task objects"
    for index, task in enumerate(tasks):
        problem = task_problem(task, f"tasks[{index}]")
        if problem is not None:
            return problem
    ids = [task["task_id"] for task in tasks]
    if len(set(ids)) != len(ids):
        return "body's tasks repeat a task_id: ids must be unique"
    return None


def parse_message(message: dict[str, Any]) -> Parsed:
    delivery = delivery_of(message)
    try:
        body = json.loads(message.get("Body", ""))
    except ValueError as decode_error:
        return Malformed(f"body is not JSON ({decode_error})", delivery)
    grouped = isinstance(body, dict) and "tasks" in body and "task_id" not in body
    task_bodies = body["tasks"] if grouped else [body]
    error = group_problem(task_bodies) if grouped else task_problem(body)
    if error is not None:
        return Malformed(error, delivery)
    tasks = tuple(Task(task_id=t["task_id"], payload=t["payload"], delivery=delivery) for t in task_bodies)
    return TaskMessage(delivery=delivery, tasks=tasks, grouped=grouped)


def task_body(task_id: str, payload: Any) -> str:
    """The message body for one task (the inverse of parse_message; used by tests and tools)."""
    return json.dumps({"task_id": task_id, "payload": payload}, separators=(",", ":"))


def group_body(tasks: list[tuple[str, Any]]) -> str:
    """The message body for a group of (task_id, payload) tasks."""
    return json.dumps(
        {"tasks": [{"task_id": task_id, "payload": payload} for task_id, payload in tasks]},
        separators=(",", ":"),
    )
