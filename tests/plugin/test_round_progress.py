"""The drain's log agrees with itself: the last rounds' progress line uses the exact count they made."""

from __future__ import annotations

import time

from ec2cluster_worker import records

from airflow_ec2cluster.drain.round import DrainSettings
from tests.plugin.test_io_parity import (
    CLUSTER,
    NOW,
    SHARDS,
    TABLE,
    World,
    instance,
    meta,
    run_both,
    worker,
)


def stale_counters_full_task_log() -> World:
    """Every task logged done, while the workers' status items (refreshed every 15 s) still say 0."""
    task_log = [
        {**records.task_log_key(CLUSTER, f"t{i:09d}", SHARDS), "task_id": f"t{i:09d}", "status": "done"}
        for i in range(10)
    ]
    return World(
        meta=meta(consecutive_empty=1),
        main={"ApproximateNumberOfMessages": "0"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[instance("i-1", NOW - 1000), instance("i-2", NOW - 1000)],
        workers=[worker("i-1", busy=False, idle_since=int(NOW - 10)), worker("i-2", busy=False)],
        task_log=task_log,
    )


def task_log_queries(calls) -> int:
    return sum(
        1
        for service, operation, kwargs in calls
        if operation == "query" and ":pk" in str(kwargs) and "#T#" in str(kwargs)
    )


def test_the_drained_round_reports_the_exact_count_and_counts_once(monkeypatch, caplog):
    monkeypatch.setattr(time, "time", lambda: NOW)
    settings = DrainSettings(state_table=TABLE, drained_checks=2)
    sync_calls, _, outcome, _ = run_both(stale_counters_full_task_log(), settings)
    assert outcome.drained
    assert "done 10/10 (100.0%)" in outcome.progress, outcome.progress
    assert "rate -" not in outcome.progress
    # One exact count serves both the drained decision and the summary: one Query per shard, not two.
    assert task_log_queries(sync_calls) == SHARDS
    assert outcome.summary["tasks_done"] == 10
    # And the count is remembered, so a later line cannot fall back to the stale counters.
    updates = [kwargs for _, operation, kwargs in sync_calls if operation == "update_item"]
    assert any("progress_finished" in str(update) for update in updates)
