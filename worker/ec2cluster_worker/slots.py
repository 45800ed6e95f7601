"""Slots: the tasks a worker runs at once, each in a thread of its own.

``SlotPool(count)`` runs jobs (a task each) on ``count`` threads, started at the first job. A slot thread runs
the handler: a Python function in the thread itself (thread isolation), or the wait on a child process (a
command, or a Python handler with process isolation, whose child does the work on a core of its own). The
loop queues the tasks of the messages it receives and receives again only when a slot is free and no task
waits for one (``free()``), so what a worker holds is what its slots run, plus at most one receive's worth
(``sizing.py``).

One slot is the loop's own thread (``inline``): the tasks run where the loop waits for a free slot, as before
slots, with no hand-over between threads, and a Python handler's time limit is SIGALRM's (which interrupts a
task; a thread can only abandon one).

A stop: the slots finish the task at hand, start nothing more (``should_start``), and the loop hands the
tasks not started back with their messages (``cancel_pending``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Job(Protocol):
    def run(self) -> None: ...  # runs the task; must not raise

    def skip(self) -> None: ...  # the task will not run (the worker is stopping)


class SlotPool:
    def __init__(
        self, count: int, should_start: Callable[[], bool] = lambda: True, *, inline: bool = False
    ) -> None:
        if count < 1 or (inline and count != 1):
            raise ValueError(f"a pool needs at least one slot (one inline), not {count}")
        self.count = count
        self.inline = inline
        self.should_start = should_start
        self._jobs: deque[Job] = deque()
        self._running = 0
        self._closed = False
        self._changed = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []

    def submit(self, jobs: list[Job]) -> None:
        with self._changed:
            if self._closed:
                raise RuntimeError("the slot pool is closed")
            if not self._threads and not self.inline:
                self._threads = [
                    threading.Thread(target=self._slot, name=f"ec2cluster-slot-{index}", daemon=True)
                    for index in range(self.count)
                ]
                for thread in self._threads:
                    thread.start()
            self._jobs.extend(jobs)
            self._changed.notify_all()

    def free(self) -> int:
        """Slots that would be idle once every queued job has started."""
        with self._changed:
            return self.count - self._running - len(self._jobs)

    def busy(self) -> int:
        with self._changed:
            return self._running

    def idle(self) -> bool:
        """Nothing running and nothing waiting for a slot."""
        with self._changed:
            return not self._running and not self._jobs

    def wait_free(self, timeout: float) -> bool:
        """Wait until a slot is free (``free() > 0``) or ``timeout`` s pass; True when one is. Inline: run
        the queued jobs first, in this thread."""
        if self.inline:
            self._run_inline()
        with self._changed:
            return self._changed.wait_for(lambda: self.count - self._running - len(self._jobs) > 0, timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        if self.inline:
            self._run_inline()
        with self._changed:
            return self._changed.wait_for(lambda: not self._running and not self._jobs, timeout)

    def cancel_pending(self) -> list[Job]:
        """The jobs not started, taken off the queue (the caller skips them)."""
        with self._changed:
            jobs, self._jobs = list(self._jobs), deque()
            self._changed.notify_all()
            return jobs

    def close(self) -> None:
        """No more jobs: the slot threads end once the queue is empty (not waited for: a task past its time
        limit in thread isolation may never end)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _run_inline(self) -> None:
        while True:
            with self._changed:
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running += 1
            self._run_taken(job)

    def _run_taken(self, job: Job) -> None:
        """Run (or, once a stop is asked, skip) a job taken off the queue; the pool counts it running until
        it is done. Wakes the loop when no job is left to take: a slot is free."""
        try:
            if self.should_start():
                job.run()
            else:
                job.skip()
        finally:
            with self._changed:
                self._running -= 1
                if not self._jobs:
                    self._changed.notify_all()

    def _slot(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._closed:
                    self._changed.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running += 1  # a skip too: until it is recorded, the pool is not idle
            self._run_taken(job)
