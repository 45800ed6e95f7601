"""A failed task's error is what a person reads (type and message); the traceback is kept beside it."""

from __future__ import annotations

import dataclasses

from ec2cluster_worker.handlers import command_error, error_summary, first_lines
from ec2cluster_worker.messages import Delivery
from ec2cluster_worker.results import MAX_ERROR_CHARS, failed_result
from ec2cluster_worker.tasklog import (
    DETAIL_CHARS_IN_GROUP,
    MessageRun,
    group_log_item,
    task_log_item,
)


class PayloadError(Exception):
    pass


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_an_exception_is_its_type_and_message():
    assert error_summary(raised(ValueError("bad payload 7"))) == "ValueError: bad payload 7"
    assert error_summary(raised(KeyError("id"))) == "KeyError: 'id'"
    assert error_summary(raised(RuntimeError())) == "RuntimeError"
    # A user's own exception is named by its module, as a traceback's last line names it.
    assert error_summary(raised(PayloadError("no text"))) == f"{__name__}.PayloadError: no text"


def test_a_long_message_keeps_its_first_lines_only():
    message = "1 validation error\n\n  text\n    field required\n  more\n" + "x" * 2000
    summary = error_summary(raised(ValueError(message)))
    assert summary == "ValueError: 1 validation error\n  text\n    field required"
    assert len(error_summary(raised(ValueError("y" * 5000)))) <= 500 + len("ValueError: ")
    assert first_lines("a" * 600, lines=1, chars=50).endswith("...")


def test_a_command_error_is_its_exit_status_and_last_stderr_line():
    assert (
        command_error(2, "warning: x\nError: no such file\n")
        == "command exited with status 2: Error: no such file"
    )
    assert command_error(1, "  \n") == "command exited with status 1 (nothing on stderr)"


def result(task_id: str, error: str, detail: str | None):
    failed = failed_result(
        task_id=task_id, attempt=1, worker_id="w", message_id="m", started_at=0, finished_at=1, error=error
    )
    return dataclasses.replace(failed, error_detail=detail)


def test_the_task_log_keeps_the_traceback_as_error_detail():
    traceback_text = (
        "Traceback (most recent call last):\n" + '  File "/tmp/h.py", line 3\n' * 200 + "ValueError: x"
    )
    flat = task_log_item(
        result("t1", "ValueError: x", traceback_text), cluster_id="c", log_shards=4, retention_seconds=10
    )
    assert flat["error"] == "ValueError: x"
    assert len(flat["error_detail"]) == MAX_ERROR_CHARS and flat["error_detail"].endswith("ValueError: x")
    run = MessageRun("t1", Delivery("m", "rh", 1), grouped=True, task_count=2)
    run.results = [result("t1", "ValueError: x", traceback_text), result("t2", "timed out", None)]
    group = group_log_item(
        run, {}, cluster_id="c", worker_id="w", log_shards=4, retention_seconds=10, now=1.0
    )
    assert group["error"] == "2 of 2 tasks failed; t1: ValueError: x"
    first, second = group["tasks"]
    assert first["error"] == "ValueError: x" and len(first["error_detail"]) == DETAIL_CHARS_IN_GROUP
    assert second["error"] == "timed out" and "error_detail" not in second
