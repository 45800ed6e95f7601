"""The worker status item, and the heartbeat thread that writes it.

One PutItem per heartbeat period (not per task), plus on start and stop: the controller reads liveness,
busyness and counts from it with one Query per cluster. ``WorkerStatus`` is updated by the loop in memory
(cheap) and read by the heartbeat thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError

from . import records
from .logs import EventLog
from .tasklog import dynamo_number

# ``stop_reason`` of a worker that could not start (its handler or sink failed to load): this prefix,
# then the error's type and message, first lines. The controller stops replacing workers when several in
# a row stop with the same one (a failure every new worker would repeat).
STARTUP_FAILED = "startup-failed"
STOP_REASON_LINES = 5
STOP_REASON_CHARS = 1000
PLACEMENT_ATTRIBUTES = ("instance_type", "availability_zone", "lifecycle")


def startup_failure_reason(error: str, worker_id: str = "") -> str:
    """The stop reason of a start-up failure: ``startup-failed: <error>``, its first lines.

    ``error`` says what failed with the exception's type and message (``handlers.HandlerError`` does:
    "handler.target: cannot import module 'x' (ModuleNotFoundError: No module named 'x'); ..."). The
    worker's own id is blanked out, so that every worker failing the same way records the same reason (the
    traceback goes to the worker's log).
    """
    text = error
    if worker_id:
        text = text.replace(worker_id, "<worker>")
    lines = text.strip().splitlines()[:STOP_REASON_LINES]
    return f"{STARTUP_FAILED}: " + "\n".join(lines)[:STOP_REASON_CHARS]


@dataclass
class StatusSnapshot:
    state: str
    started_at: float
    busy_task_id: str | None  # the task running longest (what a hung-task check looks at)
    busy_since: float | None
    idle_since: float | None
    last_completion_at: float | None
    tasks_done: int
    tasks_failed: int
    messages_done: int
    messages_failed: int
    stop_reason: str | None
    # Where the worker runs (identity.read_placement): instance_type, availability_zone, lifecycle, each
    # absent when unknown (no instance metadata, or metadata that does not say).
    placement: dict[str, str] = field(default_factory=dict)
    busy_slots: int = 0  # tasks running now
    slots: int = 1  # tasks the worker runs at once (slots_per_instance)


class WorkerStatus:
    """Thread-safe, in-memory: what the next status item will say."""

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = time.time() if started_at is None else started_at
        self._lock = threading.Lock()
        self._state = records.STATE_STARTING
        self._busy: dict[int, tuple[str, float]] = {}  # per running task: (task id, since)
        self._next_token = 0
        self._slots = 1
        self._idle_since: float | None = self.started_at
        self._last_completion_at: float | None = None
        self._tasks_done = 0
        self._tasks_failed = 0
        self._messages_done = 0
        self._messages_failed = 0
        self._stop_reason: str | None = None
        self._placement: dict[str, str] = {}

    def set_placement(self, placement: dict[str, str]) -> None:
        with self._lock:
            self._placement = dict(placement)

    def set_state(self, state: str, stop_reason: str | None = None) -> None:
        with self._lock:
            self._state = state
            if stop_reason is not None and self._stop_reason is None:
                self._stop_reason = stop_reason

    def set_slots(self, slots: int) -> None:
        with self._lock:
            self._slots = slots

    def task_started(self, task_id: str, now: float) -> int:
        """A slot started a task; returns the token its ``task_finished`` gives back."""
        with self._lock:
            self._next_token += 1
            self._busy[self._next_token] = (task_id, now)
            self._idle_since = None
            return self._next_token

    def task_finished(self, token: int, now: float) -> None:
        with self._lock:
            self._busy.pop(token, None)
            if not self._busy:
                self._idle_since = now

    def count(
        self, done: int, failed: int, now: float, *, messages_done: int = 0, messages_failed: int = 0
    ) -> None:
        with self._lock:
            self._tasks_done += done
            self._tasks_failed += failed
            self._messages_done += messages_done
            self._messages_failed += messages_failed
            if done or failed:
                self._last_completion_at = now

    def snapshot(self) -> StatusSnapshot:
        with self._lock:
            oldest = min(self._busy.values(), key=lambda busy: busy[1], default=(None, None))
            return StatusSnapshot(
                state=self._state,
                started_at=self.started_at,
                busy_task_id=oldest[0],
                busy_since=oldest[1],
                busy_slots=len(self._busy),
                slots=self._slots,
                idle_since=self._idle_since,
                last_completion_at=self._last_completion_at,
                tasks_done=self._tasks_done,
                tasks_failed=self._tasks_failed,
                messages_done=self._messages_done,
                messages_failed=self._messages_failed,
                stop_reason=self._stop_reason,
                placement=dict(self._placement),
            )


def status_item(
    snapshot: StatusSnapshot, *, cluster_id: str, worker_id: str, now: float, retention_seconds: int
) -> dict[str, Any]:
    item: dict[str, Any] = {
        records.PK: records.workers_pk(cluster_id),
        records.SK: worker_id,
        "worker_id": worker_id,
        "cluster_id": cluster_id,
        "state": snapshot.state,
        "started_at": dynamo_number(snapshot.started_at),
        "heartbeat_at": dynamo_number(now),
        # busy: any slot is (what a reader of one flag, such as an older controller, needs); busy_slots of
        # slots say how many.
        "busy": snapshot.busy_slots > 0,
        "busy_slots": snapshot.busy_slots,
        "slots": snapshot.slots,
        "tasks_done": snapshot.tasks_done,
        "tasks_failed": snapshot.tasks_failed,
        # Messages finished (each one task or a group): what the controller checks against the enqueued count.
        "messages_done": snapshot.messages_done,
        "messages_failed": snapshot.messages_failed,
        records.TTL_ATTRIBUTE: int(now) + retention_seconds,
    }
    optional = {
        "busy_task_id": snapshot.busy_task_id,
        "busy_since": snapshot.busy_since,
        "idle_since": snapshot.idle_since,
        "last_completion_at": snapshot.last_completion_at,
        "stop_reason": snapshot.stop_reason,
        **{name: snapshot.placement.get(name) for name in PLACEMENT_ATTRIBUTES},
    }
    for name, value in optional.items():
        if value is not None:
            item[name] = dynamo_number(value) if isinstance(value, float) else value
    return item


class StatusWriter:
    """Puts the status item (low-level client: safe to call from the heartbeat thread)."""

    def __init__(
        self,
        dynamodb_client: Any,
        table: str,
        status: WorkerStatus,
        *,
        cluster_id: str,
        worker_id: str,
        retention_seconds: int,
        log: EventLog,
    ) -> None:
        self.client = dynamodb_client
        self.table = table
        self.status = status
        self.cluster_id = cluster_id
        self.worker_id = worker_id
        self.retention_seconds = retention_seconds
        self.log = log
        self._serializer = TypeSerializer()

    def put(self) -> None:
        """Raises botocore errors (the caller decides whether that is fatal)."""
        item = status_item(
            self.status.snapshot(),
            cluster_id=self.cluster_id,
            worker_id=self.worker_id,
            now=time.time(),
            retention_seconds=self.retention_seconds,
        )
        self.client.put_item(
            TableName=self.table,
            Item={name: self._serializer.serialize(value) for name, value in item.items()},
        )

    def put_logged(self) -> bool:
        try:
            self.put()
        except (BotoCoreError, ClientError) as error:
            self.log.warning("status.write_failed", error=str(error))
            return False
        return True


class Heartbeat:
    """A daemon thread: one status PutItem per period; ``poke()`` writes one now (e.g. on 'stopping')."""

    def __init__(self, writer: StatusWriter, period: float) -> None:
        self.writer = writer
        self.period = period
        self._stopped = threading.Event()
        self._poked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ec2cluster-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._poked.set()

    def stop(self) -> None:
        self._stopped.set()
        self._poked.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._poked.wait(self.period)
            self._poked.clear()
            if self._stopped.is_set():
                return
            self.writer.put_logged()
