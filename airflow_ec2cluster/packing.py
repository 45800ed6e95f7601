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
            raise ValueError(
                f"task {self.task_id} ({self.origin}): payload is not JSON-serialisable: {error}"
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
            yield OutgoingMessage(task.task_id, task.json(), task.origin)
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
    return OutgoingMessage(first.task_id, body, origin, task_count=len(group))
