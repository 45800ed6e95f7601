"""When the worker stops: SIGTERM/SIGINT, a spot interruption notice or rebalance recommendation, an empty
queue, idle time, or its maximum lifetime.

Every cause ends in ``StopRequest.request(reason)``; the loop checks it between tasks and, every 0.2 s,
during a long poll (``receiver.py``: it does not wait the poll out), finishes the task at hand, hands back
the messages it has not started, and exits 0.
"""

from __future__ import annotations

import signal
import threading
import urllib.error
from collections.abc import Callable
from typing import Any

from .identity import InstanceMetadata, MetadataUnavailable
from .logs import EventLog

SPOT_ACTION_PATH = "meta-data/spot/instance-action"
# EC2 may post this (a JSON document {"noticeTime": ...}; 404 when none) before the interruption notice,
# when the instance's spot pool is at higher risk: an early chance to hand the work back and let the
# controller start a replacement in another pool.
REBALANCE_PATH = "meta-data/events/recommendations/rebalance"
SPOT_POLL_SECONDS = 5.0

STOP_SPOT_INTERRUPTION = "spot-interruption"
STOP_REBALANCE = "rebalance-recommendation"
STOP_QUEUE_EMPTY = "queue-empty"


class StopRequest:
    """Set from signal handlers and threads, read by the loop.

    Deliberately lock-free: a signal handler runs in the main thread between two bytecodes, maybe while that
    thread holds a lock, so taking one there could deadlock. Plain attribute stores are atomic under the GIL.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> bool:
        """True when this is the first request (the one whose reason is kept)."""
        if self.reason is not None:
            return False
        self.reason = reason
        return True

    @property
    def requested(self) -> bool:
        return self.reason is not None


def due_stop_reason(
    *,
    now: float,
    started_at: float,
    last_activity_at: float,
    polled_empty: bool,
    idle_shutdown_seconds: float,
    max_lifetime_seconds: float,
) -> str | None:
    """Why the worker should stop now on its own (monotonic times), or None.

    Idle needs a receive that found the queue empty since the last work, not only time passed: a worker
    whose start-up outlasts ``idle_shutdown_seconds`` (a slow or busy host) must look at the queue first.
    """
    if max_lifetime_seconds and now - started_at >= max_lifetime_seconds:
        return "max-lifetime"
    if polled_empty and now - last_activity_at >= idle_shutdown_seconds:
        return "idle"
    return None


def may_stop_queue_empty(*, empty_receive: bool, held: int, now: float, returns_at: float) -> bool:
    """Whether the worker may ask the queue if it can stop now ("queue-empty"; monotonic times).

    The worker's own side of the rule: its last receive (a long poll, which asks every SQS server) found
    nothing, it holds no message (none running, none received and not started), and no message it let go
    with a delay is due back later (a failed task's retry, ``returns_at``): that one comes back for this
    worker rather than for a replacement the controller would have to boot. The queue's side (nothing
    visible or delayed) is one GetQueueAttributes call, made only when this says yes.
    """
    return empty_receive and held == 0 and now >= returns_at


def install_signal_handlers(stop: StopRequest) -> Callable[[], None]:
    """SIGTERM and SIGINT request a stop; returns a function that restores the previous handlers."""
    previous: dict[int, Any] = {}

    def handle(signum: int, frame: Any) -> None:
        stop.request(f"signal:{signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handle)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


class SpotWatcher:
    """Polls instance metadata for a spot interruption notice and, with ``watch_rebalance``, a rebalance
    recommendation (one more GET per period), and requests a stop when one appears.

    A rebalance recommendation is treated as an early interruption: the same stop (the task at hand is
    finished, the messages not started are handed back at once), with stop_reason "rebalance-recommendation",
    so the controller can launch the replacement in another pool. When both are posted the interruption
    notice, the more urgent, names the stop.
    """

    def __init__(
        self,
        metadata: InstanceMetadata,
        stop: StopRequest,
        log: EventLog,
        period: float = SPOT_POLL_SECONDS,
        *,
        watch_rebalance: bool = True,
    ) -> None:
        self.metadata = metadata
        self.stop_request = stop
        self.log = log
        self.period = period
        self.watch_rebalance = watch_rebalance
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ec2cluster-spot", daemon=True)
        self._warned = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """True when an interruption notice or (watched) rebalance recommendation is present, and a stop was
        requested."""
        watched = [(SPOT_ACTION_PATH, STOP_SPOT_INTERRUPTION, "spot.interruption_notice")]
        if self.watch_rebalance:
            watched.append((REBALANCE_PATH, STOP_REBALANCE, "spot.rebalance_recommendation"))
        for path, reason, event in watched:
            try:
                notice = self.metadata.get(path)
            except (MetadataUnavailable, urllib.error.HTTPError) as error:
                if not self._warned:  # odd networks: say so once, keep polling
                    self.log.warning("spot.metadata_unavailable", error=str(error), path=path)
                    self._warned = True
                return False
            if notice is None:
                continue
            if self.stop_request.request(reason):
                self.log.warning(event, notice=notice.strip()[:500])
            return True
        return False

    def _run(self) -> None:
        while not self._stopped.wait(self.period):
            if self.check():
                return
