"""How many messages one ReceiveMessage asks for: what the free slots can finish soon, no more.

A receive, a task-log write and a delete cost the same whether they carry 1 task or 1,000 (10 messages of
up to 100 tasks), so for short tasks the worker should take as much as a receive can bring: 10 messages.
But a message taken is a message no other worker can run: a worker that takes 10 messages of long tasks
holds them while other workers idle (and at a job's end, the job waits for it). So the worker sizes each
receive from the task durations it has seen: as many tasks as its free slots can finish within
RECEIVE_BUDGET_FRACTION of the visibility timeout, in whole messages, between one message and
``max_messages``; and always enough to give every free slot a task (those start at once: not hoarded).

The budget is a quarter of the visibility timeout because the visibility keeper extends a message once half
its timeout has gone by: what a receive brings is done before any extension is due, so short tasks cost no
ChangeMessageVisibility call, and a worker never holds more than that quarter's work per slot beyond what
its slots are running. Before the first task ends there is no duration to go by; and before the first
message, no size of message: the first receive asks for one message per free slot (a message holds at least
one task, so every slot starts at once, and none holds more than one message it has not started).
"""

from __future__ import annotations

import math
import threading
from collections import deque

RECEIVE_BUDGET_FRACTION = 0.25
RECEIVE_MESSAGES_LIMIT = 10  # SQS's ReceiveMessage maximum
DURATION_WINDOW = 200  # the durations the estimate goes by: recent enough to follow a change of work
MIN_DURATION_SECONDS = 1e-4  # no task is free: bounds the estimate of a no-op


def receive_size(
    mean_duration: float | None,
    free_slots: int,
    visibility_timeout: float,
    tasks_per_message: int | None,
    max_messages: int = RECEIVE_MESSAGES_LIMIT,
    budget_fraction: float = RECEIVE_BUDGET_FRACTION,
) -> int:
    """Messages to ask for (0 when no slot is free).

    ``mean_duration``: seconds per task over the recent tasks (None before the first one ends);
    ``tasks_per_message``: tasks in the messages received so far (None before the first).
    """
    if free_slots <= 0:
        return 0
    if tasks_per_message is None:
        return max(1, min(free_slots, max_messages, RECEIVE_MESSAGES_LIMIT))
    per_message = max(1, tasks_per_message)
    fill = math.ceil(free_slots / per_message)  # one task for every free slot: they start at once
    if mean_duration is None:
        wanted = fill
    else:
        per_task = max(mean_duration, MIN_DURATION_SECONDS)
        finishable = free_slots * budget_fraction * visibility_timeout / per_task
        wanted = max(fill, math.floor(finishable / per_message))
    return max(1, min(wanted, max_messages, RECEIVE_MESSAGES_LIMIT))


class DurationStats:
    """Recent task durations (thread-safe: the slots add, the loop reads) and the size of recent messages."""

    def __init__(self, window: int = DURATION_WINDOW) -> None:
        self._durations: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.tasks_per_message: int | None = None

    def add(self, seconds: float) -> None:
        with self._lock:
            self._durations.append(seconds)

    def mean(self) -> float | None:
        with self._lock:
            return sum(self._durations) / len(self._durations) if self._durations else None

    def saw_messages(self, task_counts: list[int]) -> None:
        """The tasks of each message of a receive: the next receive goes by the largest."""
        if task_counts:
            self.tasks_per_message = max(task_counts)
