"""The stop-early decision: the same start-up failure ending N workers in a row stops replacing and fails.

Pure: crafted snapshots of status items (which outlive the instances) into ``decide``.
"""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException
from ec2cluster_worker.status import STARTUP_FAILED, startup_failure_reason

from airflow_ec2cluster.drain.decisions import (
    Policy,
    QueueCounts,
    Snapshot,
    WorkerStatus,
    decide,
    new_stops,
    repeated_startup_failure,
)
from airflow_ec2cluster.drain.round import DrainSettings, meta_update
from airflow_ec2cluster.meta import ClusterMeta
from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor

NOW = 100_000.0
WORK = QueueCounts(visible=6, in_flight=0, delayed=0, dead_lettered=0)
EMPTY = QueueCounts(visible=0, in_flight=0, delayed=0, dead_lettered=0)
IMPORT_ERROR = (
    "handler.target: cannot import module 'jobs.handler' (ModuleNotFoundError: No module named "
    "'jobs'); install it on the instance (requirements) or fix the import path"
)


def stopped(wid: str, at: float, reason: str) -> WorkerStatus:
    return WorkerStatus(
        worker_id=wid, state="stopped", started_at=at - 1, heartbeat_at=at, stop_reason=reason
    )


def failed_at_start(wid: str, at: float, error: str = IMPORT_ERROR) -> WorkerStatus:
    return stopped(wid, at, startup_failure_reason(error, wid))


def snapshot(workers, counts=WORK, limit=3, **fields) -> Snapshot:
    policy = Policy(cluster_size=4, repeated_failure_limit=limit)
    base = {"now": NOW, "policy": policy, "enqueued": 60, "enqueued_messages": 6, "started_at": NOW - 100}
    base.update(fields)
    return Snapshot(counts=counts, instances=(), workers=tuple(workers), **base)


def test_the_stop_reason_of_a_start_up_failure_is_the_error_without_the_worker_id():
    reason = startup_failure_reason("No module named 'x' on i-0abc\nline 2\n3\n4\n5\n6\n7", "i-0abc")
    assert reason.startswith(f"{STARTUP_FAILED}: No module named 'x' on <worker>")
    assert reason.count("\n") == 4  # first five lines
    assert startup_failure_reason("x" * 5000).__len__() < 1100


def test_three_identical_start_up_failures_in_a_row_stop_replacing_and_fail_quoting_the_error():
    workers = [failed_at_start(f"i-{n}", NOW - 10 + n) for n in range(3)]
    decision = decide(snapshot(workers))
    assert repeated_startup_failure(snapshot(workers)) == IMPORT_ERROR
    assert decision.launch == 0
    assert "3 workers in a row failed at start with the same error" in decision.failure
    assert "No module named 'jobs'" in decision.failure
    assert "clear the launch and drain tasks" in decision.failure
    # Two are not a row of three: the dead workers are replaced (capacity 0, budget left).
    two = decide(snapshot(workers[:2]))
    assert two.failure is None and two.launch == 4


def test_different_errors_or_a_stop_in_between_break_the_row():
    row = [failed_at_start(f"i-{n}", NOW - 10 + n) for n in range(3)]
    other = failed_at_start("i-9", NOW - 8.5, "handler.target: module 'jobs' has no attribute 'run'")
    assert repeated_startup_failure(snapshot([*row[:1], other, *row[1:]])) is None
    idle = stopped("i-8", NOW - 8.5, "idle")
    assert repeated_startup_failure(snapshot([*row[:1], idle, *row[1:]])) is None
    # ...but three more in a row after it do stop the job.
    later = [failed_at_start(f"i-{n}", NOW - 5 + n) for n in range(3, 6)]
    assert repeated_startup_failure(snapshot([*row[:1], idle, *later])) == IMPORT_ERROR
    # A signal or a crash is no start-up failure, however many.
    signals = [stopped(f"i-{n}", NOW - 10 + n, "signal:SIGTERM") for n in range(4)]
    assert repeated_startup_failure(snapshot(signals)) is None


def test_workers_of_an_earlier_launch_generation_do_not_count():
    old = [failed_at_start(f"i-{n}", NOW - 50 + n) for n in range(4)]
    retired = frozenset(w.worker_id for w in old)
    assert repeated_startup_failure(snapshot(old)) == IMPORT_ERROR
    assert repeated_startup_failure(snapshot(old, retired_workers=retired)) is None
    new = [failed_at_start(f"i-n{n}", NOW - 5 + n) for n in range(2)]
    assert repeated_startup_failure(snapshot([*old, *new], retired_workers=retired)) is None


def test_the_limit_is_a_policy_and_nothing_fails_when_no_work_is_left():
    workers = [failed_at_start(f"i-{n}", NOW - 10 + n) for n in range(3)]
    assert repeated_startup_failure(snapshot(workers, limit=4)) is None
    assert repeated_startup_failure(snapshot(workers[:1], limit=1)) == IMPORT_ERROR
    assert decide(snapshot(workers, counts=EMPTY)).failure is None


def test_each_stopped_worker_is_reported_once_with_its_reason():
    workers = [
        failed_at_start("i-1", NOW - 3),
        stopped("i-2", NOW - 2, "idle"),
        WorkerStatus(worker_id="i-3", state="running", started_at=NOW - 9, heartbeat_at=NOW),
    ]
    assert new_stops(snapshot(workers)) == (
        ("i-1", startup_failure_reason(IMPORT_ERROR)),
        ("i-2", "idle"),
    )
    assert decide(snapshot(workers, stops_reported=frozenset({"i-1"}))).stops == (("i-2", "idle"),)


def test_the_budget_failure_names_the_stop_reasons():
    workers = [
        failed_at_start("i-1", NOW - 3),
        stopped("i-2", NOW - 2, "signal:SIGKILL"),
    ]
    decision = decide(snapshot(workers, replacements_launched=8))
    assert "replacement budget (8 instances) is used up" in decision.failure
    assert "workers stopped with: signal:SIGKILL; startup-failed: handler.target" in decision.failure


def test_a_round_records_the_stops_it_logged_so_the_next_one_does_not_log_them_again():
    workers = [failed_at_start("i-1", NOW - 3), stopped("i-2", NOW - 2, "idle")]
    meta = ClusterMeta(cluster_id="c-1", stops_reported=["i-0"])
    decision = decide(snapshot(workers, stops_reported=frozenset(meta.stops_reported)))
    assert meta_update(meta, decision).stops_reported == ["i-0", "i-1", "i-2"]
    again = decide(snapshot(workers, stops_reported=frozenset({"i-0", "i-1", "i-2"})))
    assert again.stops == () and meta_update(meta, again).stops_reported is None


def test_the_sensor_checks_the_limit_and_hands_it_to_the_trigger():
    for bad in (0, -1, "three", 2.5, None):
        sensor = QueueDrainedSensor(task_id="drain", cluster_id="c-1", repeated_failure_limit=bad)
        with pytest.raises(AirflowFailException, match="repeated_failure_limit: .* not a positive integer"):
            sensor.settings()
    rendered = QueueDrainedSensor(task_id="drain", cluster_id="c-1", repeated_failure_limit="5").settings()
    assert rendered.repeated_failure_limit == 5
    meta = ClusterMeta(cluster_id="c-1")
    assert DrainSettings.from_dict(rendered.to_dict()).policy(meta).repeated_failure_limit == 5
    assert QueueDrainedSensor(task_id="drain").settings().repeated_failure_limit == 3
