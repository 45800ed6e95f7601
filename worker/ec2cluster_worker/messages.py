"""Task messages: an SQS message body ``{"task_id": "...", "payload": <any JSON>}`` becomes a Task.

A body of any other shape becomes a Malformed value (never an exception), logged under task id
``malformed-<MessageId>`` and left undeleted so that redrive moves it to the dead-letter queue.
Keys other than task_id and payload are ignored, so that a newer controller can add some.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


@dataclass(frozen=True)
class Delivery:
    """What SQS says about one receipt of a message."""

    message_id: str
    receipt_handle: str
    attempt: int  # ApproximateReceiveCount


@dataclass(frozen=True)
class Task:
    task_id: str
    payload: Any
    delivery: Delivery


@dataclass(frozen=True)
class Malformed:
    error: str
    delivery: Delivery

    @property
    def task_id(self) -> str:
        return f"malformed-{self.delivery.message_id}"


Parsed = Union[Task, Malformed]  # noqa: UP007 (evaluated at run time; Python 3.9)


def delivery_of(message: dict[str, Any]) -> Delivery:
    attempt_text = message.get("Attributes", {}).get("ApproximateReceiveCount", "1")
    try:
        attempt = int(attempt_text)
    except ValueError:
        attempt = 1
    return Delivery(message_id=message["MessageId"], receipt_handle=message["ReceiptHandle"], attempt=attempt)


def parse_message(message: dict[str, Any]) -> Parsed:
    delivery = delivery_of(message)
    error = None
    try:
        body = json.loads(message.get("Body", ""))
    except ValueError as decode_error:
        return Malformed(f"body is not JSON ({decode_error})", delivery)
    if not isinstance(body, dict):
        error = f"body is a JSON {type(body).__name__}, not an object with task_id and payload"
    elif "task_id" not in body or "payload" not in body:
        missing = [key for key in ("task_id", "payload") if key not in body]
        error = f"body has no {' and no '.join(missing)}"
    elif not isinstance(body["task_id"], str) or not TASK_ID_RE.match(body["task_id"]):
        error = f"task_id {body['task_id']!r:.220} is not 1-200 characters of [A-Za-z0-9_.:-]"
    if error is not None:
        return Malformed(error, delivery)
    return Task(task_id=body["task_id"], payload=body["payload"], delivery=delivery)


def task_body(task_id: str, payload: Any) -> str:
    """The message body for a task (the inverse of parse_message; used by tests and tools)."""
    return json.dumps({"task_id": task_id, "payload": payload}, separators=(",", ":"))
