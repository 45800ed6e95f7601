"""How tasks become SQS messages: one task per message, or groups of up to ``tasks_per_message`` tasks.

A group is ``{"tasks": [{"task_id": ..., "payload": ...}, ...]}`` (the worker's format, DESIGN.md). Grouping
is what brings the per-task bill down: the worker receives, logs (one DynamoDB item) and deletes a message
once for all its tasks. A group also closes early when the next task would take it over SQS's 1 MiB per
message, so the packing depends only on the sequence of tasks: a retried enqueue packs the same messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ec2cluster_worker.messages import MAX_TASKS_PER_MESSAGE

from airflow_ec2cluster.defaults import DEFAULT_TASKS_PER_MESSAGE

# SQS limits (AWS-FACTS.md): one message, and one SendMessageBatch request, carry at most 1 MiB.
MAX_MESSAGE_BYTES = 1_048_576
GROUP_HEAD, GROUP_TAIL = '{"tasks":[', "]}"


class TaskInputError(ValueError):
    """A task that cannot be sent as given (its id, its payload, its size): the message names the task's
    place in the input and the fix. The same input always fails the same way, so retrying does not help."""


class MessageTooLarge(TaskInputError):
    """A task's message body is over SQS's per-message limit."""


@dataclass(frozen=True)
class OutgoingMessage:
    task_id: str  # the first task's id: the message's task-log key
    body: str
    # Where the task came from, for error messages ("line 12 of s3://bucket/key", "item 3").
    origin: str = ""
    task_count: int = 1


@dataclass(frozen=True)
class PendingTask:
    task_id: str
    payload: Any
    origin: str

    def json(self) -> str:
        try:
            return json.dumps({"task_id": self.task_id, "payload": self.payload}, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            raise TaskInputError(
                f"{self.origin}: payload of task {self.task_id} is not JSON-serialisable ({error}): give "
                "JSON values only (dict, list, str, int, float, bool, None)"
            ) from None


def tasks_per_message_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TASKS_PER_MESSAGE:
        return (
            f"tasks_per_message: {value!r} is not a whole number from 1 to {MAX_TASKS_PER_MESSAGE}; use 1 "
            f"for one task per message, or {DEFAULT_TASKS_PER_MESSAGE} (the default) to cut request costs"
        )
    return None


def pack_tasks(tasks: Iterable[PendingTask], tasks_per_message: int) -> Iterator[OutgoingMessage]:
    """Messages for ``tasks``, in order, each at most ``tasks_per_message`` tasks and (when it can) 1 MiB."""
    if tasks_per_message == 1:
        for task in tasks:
            yield checked_size(OutgoingMessage(task.task_id, task.json(), task.origin))
        return
    group: list[tuple[PendingTask, str]] = []
    size = len(GROUP_HEAD) + len(GROUP_TAIL)
    for task in tasks:
        entry = task.json()
        entry_bytes = len(entry.encode("utf-8")) + 1  # and its comma
        if group and (len(group) == tasks_per_message or size + entry_bytes > MAX_MESSAGE_BYTES):
            yield group_message(group)
            group, size = [], len(GROUP_HEAD) + len(GROUP_TAIL)
        group.append((task, entry))
        size += entry_bytes
    if group:
        yield group_message(group)


def group_message(group: list[tuple[PendingTask, str]]) -> OutgoingMessage:
    first = group[0][0]
    last = group[-1][0]
    origin = first.origin if len(group) == 1 else f"{first.origin} to {last.origin}"
    body = GROUP_HEAD + ",".join(entry for _, entry in group) + GROUP_TAIL
    # Only a group of one can be over the limit: a group closes before a task would take it over.
    return checked_size(OutgoingMessage(first.task_id, body, origin, task_count=len(group)))


def message_size_problem(message: OutgoingMessage) -> str | None:
    size = len(message.body.encode("utf-8"))
    if size <= MAX_MESSAGE_BYTES:
        return None
    where = f"{message.origin}: " if message.origin else ""
    return (
        f"{where}task {message.task_id} is {size:,} bytes as an SQS message; SQS accepts at most "
        f"{MAX_MESSAGE_BYTES:,} bytes: put large inputs in S3 and enqueue their keys instead"
    )


def checked_size(message: OutgoingMessage) -> OutgoingMessage:
    """``message``, or MessageTooLarge: found while packing, so before the first send when it can be."""
    problem = message_size_problem(message)
    if problem:
        raise MessageTooLarge(problem)
    return message
