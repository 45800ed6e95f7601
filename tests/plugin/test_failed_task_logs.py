"""Failed tasks' errors in the drain's log, from the workers' CloudWatch Logs group: a few a round, each once,
the oldest first; and the launch's checks of the log group's retention."""

from __future__ import annotations

import json
import logging
import time

from airflow_ec2cluster.aws.dynamodb import deserialize_item
from airflow_ec2cluster.aws.logs import (
    FAILED_TASK_PATTERN,
    FAILURES_PER_ROUND,
    LOOKBACK_MS,
    LogCursor,
    event_text,
    failure_text,
    next_failures,
    retention_problems,
)
from airflow_ec2cluster.drain.round import DrainSettings
from tests.plugin.test_io_parity import NOW, TABLE, failed_task_event, run_both, show_failed_tasks


def test_retention_must_be_one_cloudwatch_offers():
    assert retention_problems(30) == retention_problems(None) == retention_problems("7") == []
    (problem,) = retention_problems(10)
    assert problem.startswith(
        "log_retention_days: 10 is not a retention CloudWatch Logs offers; use one of 1, 3"
    )
    assert "None" in problem
    assert retention_problems(True) and retention_problems(30.5)


def test_each_failure_is_shown_once_the_oldest_first_and_a_few_a_round():
    now_ms = int(NOW * 1000)
    events = [failed_task_event(n, NOW - 30 + n, f"t{n}") for n in range(8)]
    shown, cursor, more = next_failures(events, LogCursor(), now_ms)
    assert [e["eventId"] for e in shown] == [f"e{n}" for n in range(FAILURES_PER_ROUND)] and more
    assert cursor.read_from == events[FAILURES_PER_ROUND - 1]["timestamp"]
    # The next round reads from a minute before, so lines that reached CloudWatch late are found too...
    assert cursor.start_ms() == cursor.read_from - LOOKBACK_MS
    late = failed_task_event(99, NOW - 40, "t-late")
    again, after, more = next_failures([late, *events], cursor, now_ms)
    # ... and what was shown is not shown again.
    assert [e["eventId"] for e in again] == ["e99", "e5", "e6", "e7"] and not more
    assert after.failures_shown == FAILURES_PER_ROUND + 4
    assert set(after.shown) >= {"e99", "e7"} and after.read_from == events[7]["timestamp"]
    assert next_failures(events, after, now_ms)[0] == []
    # Lines that are not a failed task's (or not JSON) are never shown.
    other = {**events[0], "eventId": "x", "message": '{"event":"task.done"}'}
    assert next_failures([other, {**other, "message": "not json"}], LogCursor(), now_ms)[0] == []


def test_a_task_whose_result_was_not_stored_is_shown_too():
    # The workers count it failed: unshown, the drain would read the log group every round for it.
    assert FAILED_TASK_PATTERN == '{ $.event = "task.failed" || $.event = "task.output_failed" }'
    line = {"event": "task.output_failed", "worker_id": "i-2", "task_id": "t7", "error": "S3 PutObject: no"}
    message = json.dumps(line)
    event = {"eventId": "o1", "logStreamName": "i-2", "timestamp": int(NOW * 1000), "message": message}
    shown, cursor, _ = next_failures([event], LogCursor(), int(NOW * 1000))
    assert shown == [event] and cursor.failures_shown == 1
    assert failure_text(event) == "Task t7 failed on i-2: its result was not stored: S3 PutObject: no"


def test_a_workers_clock_cannot_move_the_cursor_past_now():
    future = failed_task_event(1, NOW + 7200, "t-future")
    _, cursor, _ = next_failures([future], LogCursor(), int(NOW * 1000))
    assert cursor.read_from == int(NOW * 1000)


def test_the_text_shows_the_task_the_error_and_the_tracebacks_last_lines():
    event = failed_task_event(3, NOW, "t000000003")
    text = failure_text(event)
    assert text.startswith("Task t000000003 failed on i-1 (attempt 1): ValueError: bad payload 3\n")
    assert 'File "h.py", line 3' in text
    long = {**event, "message": json.dumps({**json.loads(event["message"]), "detail": "x\n" * 100})}
    assert "(70 lines above)" in failure_text(long)
    printed = event_text(event)
    assert printed.startswith("i-1 {") and '"detail"' not in printed.splitlines()[0]
    assert printed.splitlines()[-1] == "    ValueError: bad payload 3"


def test_the_drains_log_shows_the_errors_and_remembers_where_it_is(monkeypatch, caplog):
    monkeypatch.setattr(time, "time", lambda: NOW)
    settings = DrainSettings(state_table=TABLE, heartbeat_timeout=60, drained_checks=2)
    with caplog.at_level(logging.WARNING):
        calls, _, outcome, _ = run_both(show_failed_tasks(), settings)
    assert not outcome.failure
    text = caplog.text
    for n in range(FAILURES_PER_ROUND):
        assert f"Task t{n:09d} failed on i-1 (attempt 1): ValueError: bad payload {n}" in text
    assert f"Task t{FAILURES_PER_ROUND:09d} failed" not in text
    assert "More tasks failed; every worker's log: ec2cluster logs" in text
    # One FilterLogEvents a round (each run: sync, then async).
    reads = [kwargs for _, operation, kwargs in calls if operation == "filter_log_events"]
    assert len(reads) == 1 and reads[0]["filterPattern"] == FAILED_TASK_PATTERN
    values = [
        deserialize_item(kwargs["ExpressionAttributeValues"])
        for _, operation, kwargs in calls
        if operation == "update_item"
    ]
    (shown,) = [v for update in values for v in update.values() if isinstance(v, dict) and "e0" in v]
    assert sorted(shown) == [f"e{n}" for n in range(FAILURES_PER_ROUND)]
    assert any(FAILURES_PER_ROUND in update.values() for update in values)  # logs_failures_shown


def test_a_round_without_a_new_failure_makes_no_cloudwatch_call(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    settings = DrainSettings(state_table=TABLE, heartbeat_timeout=60, drained_checks=2)
    world = show_failed_tasks()
    # Every failure the workers counted (5 + 3) was shown already.
    world.meta = {**world.meta, "logs_failures_shown": 8, "logs_read_from": int(NOW * 1000)}
    calls, _, outcome, _ = run_both(world, settings)
    assert not outcome.failure
    assert "filter_log_events" not in {operation for _, operation, _ in calls}
