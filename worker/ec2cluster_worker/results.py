"""What running one task produced: the value handed to output sinks and to the task log."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from . import records

MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    status: str  # records.TASK_DONE or records.TASK_FAILED
    attempt: int
    worker_id: str
    message_id: str
    started_at: float  # epoch seconds
    finished_at: float
    result: Any = None
    result_json: str | None = None  # the result as JSON text (done tasks)
    error: str | None = None  # failed tasks, at most MAX_ERROR_CHARS: what a person reads (type: message)
    error_detail: str | None = None  # the traceback, or a command's stderr tail (task log ``error_detail``)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    @property
    def done(self) -> bool:
        return self.status == records.TASK_DONE

    def failed_with(self, error: str) -> TaskResult:
        """This result turned into a failure (e.g. the sink could not store it)."""
        return dataclasses.replace(self, status=records.TASK_FAILED, error=truncate_error(error))


def truncate_error(error: str) -> str:
    if len(error) <= MAX_ERROR_CHARS:
        return error
    # Keep the end: a traceback's or stderr's last lines say the most.
    return "..." + error[-(MAX_ERROR_CHARS - 3) :]


def done_result(
    *,
    task_id: str,
    attempt: int,
    worker_id: str,
    message_id: str,
    started_at: float,
    finished_at: float,
    result: Any,
) -> TaskResult:
    """A done result, or a failed one when the handler's result is not JSON-serialisable."""
    common = dict(
        task_id=task_id,
        attempt=attempt,
        worker_id=worker_id,
        message_id=message_id,
        started_at=started_at,
        finished_at=finished_at,
    )
    try:
        result_json = json.dumps(result, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        return TaskResult(
            status=records.TASK_FAILED,
            error=truncate_error(f"result is not JSON-serialisable: {error}"),
            **common,
        )
    return TaskResult(status=records.TASK_DONE, result=result, result_json=result_json, **common)


def failed_result(
    *,
    task_id: str,
    attempt: int,
    worker_id: str,
    message_id: str,
    started_at: float,
    finished_at: float,
    error: str,
) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        status=records.TASK_FAILED,
        attempt=attempt,
        worker_id=worker_id,
        message_id=message_id,
        started_at=started_at,
        finished_at=finished_at,
        error=truncate_error(error),
    )
