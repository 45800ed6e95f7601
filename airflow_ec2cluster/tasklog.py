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
            found.extend({"task_id": r["task_id"], "error": r["error"]} for r in unfinished)
        else:
            found.append({"task_id": key, "error": item.get("error")})
    return found
