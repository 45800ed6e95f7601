"""Counting AWS calls, DynamoDB items and their write units, and SQS billed requests, with botocore hooks.

Attach a ``CallCounter`` to a boto3 session (every client made from it afterwards) or to clients. It reads the
request body botocore is about to send (``before-call``), so the items and bytes counted are exactly what
goes on the wire, and the ReceiveMessage answer (``after-call``) for the bytes received.
"""

from __future__ import annotations

import collections
import json
import math
import threading
from typing import Any

from .prices import DYNAMODB_WRU_BYTES, SQS_BILLING_CHUNK_BYTES

SQS_PAYLOAD_OPERATIONS = ("SendMessage", "SendMessageBatch")


class CallCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.items_written = 0
        self.write_units = 0
        self.sqs_billed_requests = 0
        # DynamoDB writes per operation: {"BatchWriteItem": [items, write units, bytes], ...}
        self.writes_by_operation: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])

    # -- attaching ------------------------------------------------------------------------------------

    def attach(self, events: Any) -> CallCounter:
        """``events``: a session's ``events`` or a client's ``meta.events``."""
        events.register("before-call.*.*", self._before_call)
        events.register("after-call.sqs.ReceiveMessage", self._after_receive)
        return self

    def attach_session(self, session: Any) -> CallCounter:
        return self.attach(session.events)

    def attach_clients(self, *clients: Any) -> CallCounter:
        for client in clients:
            self.attach(client.meta.events)
        return self

    # -- totals ---------------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def by_operation(self) -> dict[str, int]:
        return dict(sorted(self.calls.items()))

    def count(self, operation: str) -> int:
        return sum(n for name, n in self.calls.items() if name.endswith("." + operation))

    # -- hooks ----------------------------------------------------------------------------------------

    def _before_call(self, event_name: str, model: Any, params: dict[str, Any], **_: Any) -> None:
        service = event_name.split(".")[1]
        body = decode_body(params.get("body"))
        items, units, size = dynamodb_writes(model.name, body) if service == "dynamodb" else (0, 0, 0)
        billed = 0
        if service == "sqs" and model.name != "ReceiveMessage":
            billed = sqs_chunks(sqs_request_bytes(model.name, body))
        with self._lock:
            self.calls[f"{service}.{model.name}"] += 1
            self.items_written += items
            self.write_units += units
            if items:
                written = self.writes_by_operation[model.name]
                written[0] += items
                written[1] += units
                written[2] += size
            self.sqs_billed_requests += billed

    def _after_receive(self, parsed: dict[str, Any], **_: Any) -> None:
        received = sum(len(m.get("Body", "").encode("utf-8")) for m in parsed.get("Messages", []))
        with self._lock:
            self.sqs_billed_requests += sqs_chunks(received)


def decode_body(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    if isinstance(body, str) and body.startswith("{"):
        return json.loads(body)
    return body if isinstance(body, dict) else {}


def sqs_chunks(payload_bytes: int) -> int:
    """Billed SQS requests for one call: one per 64 KB chunk of its payload, at least one."""
    return max(1, math.ceil(payload_bytes / SQS_BILLING_CHUNK_BYTES))


def sqs_request_bytes(operation: str, body: dict[str, Any]) -> int:
    if operation == "SendMessage":
        return len(body.get("MessageBody", "").encode("utf-8"))
    if operation == "SendMessageBatch":
        return sum(len(entry.get("MessageBody", "").encode("utf-8")) for entry in body.get("Entries", []))
    return 0


def dynamodb_writes(operation: str, body: dict[str, Any]) -> tuple[int, int, int]:
    """(items written, write request units, item bytes) of one DynamoDB request, from its wire parameters."""
    if operation == "PutItem":
        item = body.get("Item", {})
        return 1, write_units(item), item_bytes(item)
    if operation in ("UpdateItem", "DeleteItem"):
        # The size of an updated item is not in the request; count the minimum of one unit.
        return 1, 1, 0
    if operation == "BatchWriteItem":
        items = units = size = 0
        for requests in body.get("RequestItems", {}).values():
            for request in requests:
                items += 1
                put = request.get("PutRequest")
                units += write_units(put["Item"]) if put else 1
                size += item_bytes(put["Item"]) if put else 0
        return items, units, size
    return 0, 0, 0


def write_units(item: dict[str, Any]) -> int:
    return max(1, math.ceil(item_bytes(item) / DYNAMODB_WRU_BYTES))


def item_bytes(item: dict[str, Any]) -> int:
    """DynamoDB's item size: attribute name lengths plus value sizes (low-level typed format)."""
    return sum(len(name.encode("utf-8")) + value_bytes(value) for name, value in item.items())


def value_bytes(value: dict[str, Any]) -> int:
    ((kind, data),) = value.items()
    if kind == "S":
        return len(data.encode("utf-8"))
    if kind == "N":
        digits = len(data.lstrip("-").replace(".", "").strip("0")) or 1
        return math.ceil(digits / 2) + 1
    if kind == "B":
        return len(data) * 3 // 4
    if kind in ("BOOL", "NULL"):
        return 1
    if kind in ("SS", "NS", "BS"):
        return sum(value_bytes({kind[0]: element}) for element in data)
    if kind == "L":
        return 3 + sum(1 + value_bytes(element) for element in data)
    if kind == "M":
        return 3 + sum(1 + len(name.encode("utf-8")) + value_bytes(v) for name, v in data.items())
    return 0
