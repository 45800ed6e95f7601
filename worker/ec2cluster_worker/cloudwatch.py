"""The worker's log lines, shipped to CloudWatch Logs: the cluster's log group, one stream per worker.

A worker's console ends with its instance; CloudWatch Logs keeps its lines (a failed task's traceback among
them) until the group's retention. ``EventLog`` hands every line to a :class:`LogShipper`, a thread that
sends them with PutLogEvents every ``FLUSH_SECONDS`` and once more at stop, in batches within CloudWatch's
limits (:func:`batches`). CloudWatch failing never touches task work: ``add`` only appends to a bounded
buffer (the oldest lines are dropped past ``MAX_PENDING_BYTES``, and the loss is said in the stream), and a
refused or failed call is said on the console, its batch dropped (botocore has retried it already).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .aws import error_code

# PutLogEvents: at most 10,000 events and 1,048,576 bytes a call, each event counted as its UTF-8 message
# plus 26 bytes, an event at most 256 KiB, the events of one call in time order within 24 hours.
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1024 * 1024  # PutLogEvents' own limit (SQS's message limit is packing.py's)
EVENT_OVERHEAD_BYTES = 26
MAX_EVENT_BYTES = 262_144
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000
FLUSH_SECONDS = 5.0  # at most one call per this many seconds (more only when a flush holds over 1 MiB)
MAX_PENDING_BYTES = 8 * 1024 * 1024  # what waits for the next flush; beyond it the oldest lines go
CLOSE_SECONDS = 10.0  # the last flush at stop waits at most this long
TRUNCATED = "...[truncated {} bytes]"
ALREADY_EXISTS = "ResourceAlreadyExistsException"

LogEvent = tuple[int, str]  # (timestamp in ms since the epoch, message)


def event_size(message: str) -> int:
    """What PutLogEvents counts for one event against its 1 MiB."""
    return len(message.encode("utf-8")) + EVENT_OVERHEAD_BYTES


def fit_message(message: str) -> str:
    """``message`` within one event's 256 KiB: its start kept, and how much was cut said."""
    if event_size(message) <= MAX_EVENT_BYTES:
        return message
    encoded = message.encode("utf-8")
    head = encoded[: MAX_EVENT_BYTES - EVENT_OVERHEAD_BYTES - 64].decode("utf-8", "ignore")  # 64: the marker
    return head + TRUNCATED.format(len(encoded) - len(head.encode("utf-8")))


def batches(events: list[LogEvent]) -> list[list[dict[str, Any]]]:
    """``events`` as PutLogEvents' ``logEvents`` lists: in time order, each within a call's limits."""
    found: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for timestamp, message in sorted(events, key=lambda event: event[0]):
        message = fit_message(message)
        added = event_size(message)
        if current and (
            len(current) >= MAX_BATCH_EVENTS
            or size + added > MAX_BATCH_BYTES
            or timestamp - current[0]["timestamp"] >= MAX_BATCH_SPAN_MS
        ):
            found.append(current)
            current, size = [], 0
        current.append({"timestamp": timestamp, "message": message})
        size += added
    if current:
        found.append(current)
    return found


class LogShipper(threading.Thread):
    """Sends the lines given to :meth:`add` to ``group``/``stream``; ``start`` it, ``close`` it at the end."""

    def __init__(
        self,
        client: Any,
        group: str,
        stream: str,
        *,
        on_error: Callable[[str, str], None],
        flush_seconds: float = FLUSH_SECONDS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        super().__init__(name="cloudwatch-logs", daemon=True)
        self.client = client
        self.group = group
        self.stream = stream
        self.on_error = on_error  # (event, error): said on the console only, never shipped
        self.flush_seconds = flush_seconds
        self.max_pending_bytes = max_pending_bytes
        self._pending: deque[LogEvent] = deque()
        self._pending_bytes = 0
        self._dropped = 0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._stream_ready = False
        self.calls = 0  # PutLogEvents calls made (the benchmark counts them)
        self.sent_bytes = 0  # what those calls carried, as CloudWatch counts it

    def add(self, timestamp: float, line: str) -> None:
        """Queue one line for the next flush (never blocks on CloudWatch)."""
        size = event_size(line)
        with self._lock:
            self._pending.append((int(timestamp * 1000), line))
            self._pending_bytes += size
            while self._pending_bytes > self.max_pending_bytes and len(self._pending) > 1:
                _, oldest = self._pending.popleft()
                self._pending_bytes -= event_size(oldest)
                self._dropped += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.flush_seconds):
            self.flush()
        self.flush()

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Send what is pending and stop (waiting at most ``timeout``: a stop never hangs on CloudWatch)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def _take(self) -> list[LogEvent]:
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            dropped, self._dropped = self._dropped, 0
        if dropped:
            note = {
                "ts": round(time.time(), 3),
                "level": "warning",
                "event": "logs.dropped",
                "lines": dropped,
            }
            events.append((int(time.time() * 1000), json.dumps(note, separators=(",", ":"))))
        return events

    def flush(self) -> None:
        events = self._take()
        if not events or not self._ensure_stream():
            with self._lock:  # kept for the next flush, within the bound
                self._dropped += max(0, len(events) - self._requeue(events))
            return
        for batch in batches(events):
            try:
                answer = self.client.put_log_events(
                    logGroupName=self.group, logStreamName=self.stream, logEvents=batch
                )
            except (BotoCoreError, ClientError) as error:
                self.on_error("logs.put_failed", f"{error_code(error) or type(error).__name__}: {error}")
                continue
            self.calls += 1
            self.sent_bytes += sum(event_size(event["message"]) for event in batch)
            rejected = answer.get("rejectedLogEventsInfo")
            if rejected:
                self.on_error("logs.events_rejected", json.dumps(rejected))

    def _requeue(self, events: list[LogEvent]) -> int:
        """Put ``events`` back in front (the stream could not be made yet); how many fit the bound."""
        kept = 0
        for event in reversed(events):
            size = event_size(event[1])
            if self._pending_bytes + size > self.max_pending_bytes:
                break
            self._pending.appendleft(event)
            self._pending_bytes += size
            kept += 1
        return kept

    def _ensure_stream(self) -> bool:
        """The worker's stream, made once (a rebooted worker finds its own)."""
        if self._stream_ready:
            return True
        try:
            self.client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
        except ClientError as error:
            if error_code(error) != ALREADY_EXISTS:
                self.on_error("logs.stream_failed", f"{error_code(error)}: {error}")
                return False
        except BotoCoreError as error:
            self.on_error("logs.stream_failed", f"{type(error).__name__}: {error}")
            return False
        self._stream_ready = True
        return True
