"""Keeping held messages invisible while the worker works on them, and handing back those it won't.

A daemon thread extends (ChangeMessageVisibilityBatch) the visibility of every held message whose visibility
would end within half a period, never past 12 h from its receive. Fast batches finish before anything needs
extending, so they cost no call at all. ``set_visibility`` is the same batch call for the loop: 0 releases
messages it will not process, a short delay makes a failed task's message come back soon.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .logs import EventLog
from .messages import Delivery

MAX_TOTAL_VISIBILITY_SECONDS = 43200
SAFETY_MARGIN_SECONDS = 60
BATCH_LIMIT = 10


@dataclass
class HeldMessage:
    delivery: Delivery
    received_at: float  # monotonic
    visible_at: float  # monotonic: when the current visibility timeout ends


def extension_plan(
    held: Iterable[HeldMessage], now: float, visibility: int, threshold: float
) -> list[tuple[HeldMessage, int]]:
    """(message, new visibility timeout) for held messages whose visibility ends within ``threshold`` s."""
    plan = []
    for message in held:
        remaining = message.visible_at - now
        if remaining > threshold:
            continue
        allowed = MAX_TOTAL_VISIBILITY_SECONDS - SAFETY_MARGIN_SECONDS - (now - message.received_at)
        timeout = int(min(visibility, allowed))
        if timeout > max(remaining, 0):
            plan.append((message, timeout))
    return plan


def chunks(items: list[Any], size: int = BATCH_LIMIT) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class VisibilityKeeper:
    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        visibility_timeout: int,
        log: EventLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.visibility_timeout = visibility_timeout
        self.log = log
        self.clock = clock
        self.period = max(1.0, visibility_timeout / 4)
        self._held: dict[str, HeldMessage] = {}  # by receipt handle
        # Held across an extension's AWS call, so a message forgotten (then released or deleted) by the loop
        # is never extended afterwards.
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ec2cluster-visibility", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=30)

    def hold(self, deliveries: Iterable[Delivery], received_at: float) -> None:
        with self._lock:
            for delivery in deliveries:
                self._held[delivery.receipt_handle] = HeldMessage(
                    delivery, received_at, received_at + self.visibility_timeout
                )

    def forget(self, deliveries: Iterable[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                self._held.pop(delivery.receipt_handle, None)

    def visible_until(self, deliveries: Iterable[Delivery]) -> float:
        """When the latest of these held messages' visibility ends (monotonic), 0.0 when none is held."""
        with self._lock:
            held = [self._held.get(delivery.receipt_handle) for delivery in deliveries]
            return max((message.visible_at for message in held if message is not None), default=0.0)

    def held_count(self) -> int:
        with self._lock:
            return len(self._held)

    def set_visibility(
        self, deliveries: list[Delivery], seconds: int | Callable[[Delivery], int]
    ) -> list[str]:
        """Forget these messages and set their visibility; returns the message ids SQS refused."""
        self.forget(deliveries)
        timeouts = [
            (delivery, seconds(delivery) if callable(seconds) else seconds) for delivery in deliveries
        ]
        return self._change(timeouts, event="visibility.change_failed")

    def extend_due(self) -> int:
        """Extend what is due now; returns how many messages were extended."""
        with self._lock:
            now = self.clock()
            plan = extension_plan(
                self._held.values(), now, self.visibility_timeout, threshold=self.period * 2
            )
            refused = set(
                self._change([(held.delivery, timeout) for held, timeout in plan], "visibility.extend_failed")
            )
            for held, timeout in plan:
                if held.delivery.message_id not in refused:
                    held.visible_at = now + timeout
            extended = len(plan) - len(refused)
        if extended:
            self.log.info("visibility.extended", messages=extended)
        return extended

    def _change(self, timeouts: list[tuple[Delivery, int]], event: str) -> list[str]:
        refused: list[str] = []
        for chunk in chunks(timeouts):
            ids = {f"m{index}": delivery for index, (delivery, _) in enumerate(chunk)}
            entries = [
                {"Id": f"m{index}", "ReceiptHandle": delivery.receipt_handle, "VisibilityTimeout": timeout}
                for index, (delivery, timeout) in enumerate(chunk)
            ]
            try:
                response = self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
            except (BotoCoreError, ClientError) as error:
                self.log.warning(event, error=str(error), messages=len(chunk))
                refused.extend(delivery.message_id for delivery in ids.values())
                continue
            for failure in response.get("Failed", []):
                delivery = ids[failure["Id"]]
                refused.append(delivery.message_id)
                self.log.warning(
                    event,
                    message_id=delivery.message_id,
                    code=failure.get("Code"),
                    error=failure.get("Message"),
                )
        return refused

    def _run(self) -> None:
        while not self._stopped.wait(self.period):
            try:
                self.extend_due()
            except Exception as error:  # the keeper must outlive any surprise
                self.log.error("visibility.keeper_error", error=f"{type(error).__name__}: {error}")
