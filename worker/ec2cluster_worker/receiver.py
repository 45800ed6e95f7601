"""ReceiveMessage in a thread of its own, so that a stop does not wait out a 20 s long poll.

Nothing can safely cut a socket read short (a signal handler runs between bytecodes, and Python resumes the
read after it), so a worker idle in a long poll used to notice SIGTERM only when the poll ended, up to
``wait_time_seconds`` later. The loop now hands each receive to this thread and waits for its answer in
steps of STOP_CHECK_SECONDS, checking for a stop request between them. The receives are the same calls as
before, made from another thread: an idle worker makes no more AWS calls than it did.

A stopping worker abandons the receive in flight. What that receive still brings is handed back at once
(visibility 0) if it comes back before the process exits; the worker waits up to ABANDON_WAIT_SECONDS for
it (a response already on its way takes milliseconds; a poll still waiting after that is waiting for
messages the queue did not have when the stop came). A response lost with the process leaves its messages
hidden until their visibility timeout ends: late, never lost.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .taskqueue import TaskQueue

STOP_CHECK_SECONDS = 0.2
ABANDON_WAIT_SECONDS = 0.5

Messages = list[dict[str, Any]]


class Receiver:
    """One daemon thread that makes the loop's ReceiveMessage calls, one at a time."""

    def __init__(self, task_queue: TaskQueue, hand_back: Callable[[Messages], None]) -> None:
        self.task_queue = task_queue
        self.hand_back = hand_back  # called with what a receive brings after abandon()
        self._requests: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._answered = threading.Event()
        self._lock = threading.Lock()  # guards _answer and _abandoned (never taken in a signal handler)
        self._answer: tuple[Messages, Exception | None] | None = None
        self._abandoned = False
        self._abandoned_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="ec2cluster-receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def receive(self, should_stop: Callable[[], bool], **params: Any) -> Messages:
        """The messages one ReceiveMessage brings; [] as soon as ``should_stop()`` says so.

        After a [] for a stop, the receive goes on in the thread: call ``abandon()`` before exiting.
        Raises what the call raised (botocore errors, after botocore's own retries).
        """
        self._answered.clear()
        self._requests.put(params)
        while not self._answered.wait(STOP_CHECK_SECONDS):
            if should_stop():
                return []
        with self._lock:
            answer, self._answer = self._answer, None
        assert answer is not None
        messages, error = answer
        if error is not None:
            raise error
        return messages

    def abandon(self) -> None:
        """No more receives: what the receive in flight brings from now on is handed back (not blocking)."""
        with self._lock:
            self._abandoned = True
            self._abandoned_at = time.monotonic()
            unclaimed, self._answer = self._answer, None
        self._requests.put(None)  # the thread ends after the receive in flight, if any
        if unclaimed is not None and unclaimed[0]:  # came back just as the loop stopped waiting
            self.hand_back(unclaimed[0])

    def join(self) -> bool:
        """Wait for the receive in flight until ABANDON_WAIT_SECONDS after abandon(); True: none is left."""
        if not self._thread.is_alive():
            return True
        waited = time.monotonic() - (self._abandoned_at or time.monotonic())
        self._thread.join(max(0.0, ABANDON_WAIT_SECONDS - waited))
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            params = self._requests.get()
            if params is None:
                return
            try:
                answer: tuple[Messages, Exception | None] = (self.task_queue.receive(**params), None)
            except Exception as error:  # botocore's, or a bug: the loop raises it in the main thread
                answer = ([], error)
            with self._lock:
                if not self._abandoned:
                    self._answer = answer
                    self._answered.set()
                    continue
            if answer[0]:
                self.hand_back(answer[0])
