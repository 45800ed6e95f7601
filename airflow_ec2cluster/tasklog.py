"""Reading the task log back: per-task results and counts from the per-message items the workers write.

A message of one task has a flat item (``task_id``, ``status``, ``result`` | ``output``, ``error``); a group's
item lists its tasks under ``tasks`` and says the whole message's ``status`` (``done``, ``failed``, or
``partial`` when a stopping worker handed it back before running every task). The layout is the worker's
(``ec2cluster_worker.tasklog``); these pure functions turn items into what Airflow users read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from ec2cluster_worker import records

# Attributes the counting Query projects (status of the message, and its task counts when a group).
COUNT_ATTRIBUTES = {"#st": "status", "#td": "tasks_done", "#tf": "tasks_failed"}


def decoded(result: Any) -> Any:
    if isinstance(result, str):
        with contextlib.suppress(ValueError):
            return json.loads(result)
    return result


def task_results_of(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Per task of one item: ``task_id``, ``status``, ``result`` (JSON-decoded) or ``output``, ``error``."""
    entries = item.get("tasks", [item])
    for entry in entries:
        yield {
            "task_id": entry.get("task_id", item.get(records.SK)),
            "status": entry.get("status"),
            "result": decoded(entry.get("result")),
            "output": entry.get("output"),
            "error": entry.get("error"),
            # The traceback, or a command's stderr tail, behind a failed task's error.
            "error_detail": entry.get("error_detail"),
            "worker_id": item.get("worker_id"),
        }


def tally(items: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Tasks done / failed, and messages done / failed (a partly run message is neither), over items."""
    counts = {records.TASK_DONE: 0, records.TASK_FAILED: 0, "messages_done": 0, "messages_failed": 0}
    for item in items:
        status = item.get("status")
        if "tasks_done" in item:
            counts[records.TASK_DONE] += int(item["tasks_done"])
            counts[records.TASK_FAILED] += int(item.get("tasks_failed") or 0)
        elif status in (records.TASK_DONE, records.TASK_FAILED):
            counts[status] += 1
        if status in (records.TASK_DONE, records.TASK_FAILED):
            counts[f"messages_{status}"] += 1
    return counts


def messages_finished(counts: dict[str, int]) -> int:
    return counts["messages_done"] + counts["messages_failed"]


def tasks_finished(counts: dict[str, int]) -> int:
    return counts[records.TASK_DONE] + counts[records.TASK_FAILED]


def readable_error(error: str | None) -> str | None:
    """What a person reads of a task's error: an older worker's whole traceback becomes its last line."""
    marker = "Traceback (most recent call last):"
    # Older workers kept a traceback's end when it was too long: "...  File ..." without the marker.
    cut = error.startswith("...") and '\n  File "' in error if error else False
    if not error or (marker not in error and not cut):
        return error
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    head = error.partition(marker)[0] if marker in error else ""
    return head + lines[-1]


def message_task_ids(message: dict[str, Any]) -> list[str]:
    """The task ids an SQS message carries: its task, a group's tasks, or ``[malformed-<MessageId>]``."""
    try:
        body = json.loads(message.get("Body", ""))
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("task_id"), str):
            return [body["task_id"]]
        tasks = body.get("tasks")
        if isinstance(tasks, list) and tasks:
            ids = [task.get("task_id") for task in tasks if isinstance(task, dict)]
            if ids and all(isinstance(task_id, str) for task_id in ids):
                return ids
    return [f"malformed-{message['MessageId']}"]


def done_task_ids(item: dict[str, Any] | None) -> set[str]:
    """The tasks a message's task-log item shows done (none when it has no item)."""
    return (
        {r["task_id"] for r in task_results_of(item) if r["status"] == records.TASK_DONE} if item else set()
    )


def unfinished_task_ids(message: dict[str, Any], item: dict[str, Any] | None) -> list[str]:
    """The tasks of a (dead-lettered) message that its task-log item does not show done, in body order."""
    done = done_task_ids(item)
    return [task_id for task_id in message_task_ids(message) if task_id not in done]


def log_key_of(message: dict[str, Any]) -> str:
    """The task-log key of an SQS message: its task id, a group's first task id, or malformed-<MessageId>."""
    try:
        body = json.loads(message.get("Body", ""))
    except ValueError:
        body = None
    key = None
    if isinstance(body, dict):
        key = body.get("task_id")
        tasks = body.get("tasks")
        if key is None and isinstance(tasks, list) and tasks and isinstance(tasks[0], dict):
            key = tasks[0].get("task_id")
    return key if isinstance(key, str) else f"malformed-{message['MessageId']}"


def dead_letter_errors(keys: list[str], items: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{task_id, error}]`` for dead-lettered messages: a group's tasks that are not done, else the message.

    The error is the last one the task log holds (None when the message never got an item).
    """
    found: list[dict[str, Any]] = []
    for key in keys:
        item = items.get(key) or {}
        unfinished = [r for r in task_results_of(item) if r["status"] != records.TASK_DONE] if item else []
        if "tasks" in item and unfinished:
            found.extend({"task_id": r["task_id"], "error": readable_error(r["error"])} for r in unfinished)
        else:
            found.append({"task_id": key, "error": readable_error(item.get("error"))})
    return found
