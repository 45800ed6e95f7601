"""When the worker stops: SIGTERM/SIGINT, a spot interruption notice, idle time, or its maximum lifetime.

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
SPOT_POLL_SECONDS = 5.0


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
    """Polls the spot interruption notice (instance metadata) and requests a stop when one appears."""

    def __init__(
        self, metadata: InstanceMetadata, stop: StopRequest, log: EventLog, period: float = SPOT_POLL_SECONDS
    ) -> None:
        self.metadata = metadata
        self.stop_request = stop
        self.log = log
        self.period = period
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ec2cluster-spot", daemon=True)
        self._warned = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """True when an interruption notice is present (and a stop was requested)."""
        try:
            notice = self.metadata.get(SPOT_ACTION_PATH)
        except (MetadataUnavailable, urllib.error.HTTPError) as error:
            if not self._warned:  # on-demand instances and odd networks: say so once, keep polling
                self.log.warning("spot.metadata_unavailable", error=str(error))
                self._warned = True
            return False
        if notice is None:
            return False
        if self.stop_request.request("spot-interruption"):
            self.log.warning("spot.interruption_notice", notice=notice.strip()[:500])
        return True

    def _run(self) -> None:
        while not self._stopped.wait(self.period):
            if self.check():
                return
