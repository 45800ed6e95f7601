"""Poison messages end in the dead-letter queue and the summary; a hung task is killed, the worker goes on."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_ec2cluster.cli import main as ec2cluster
from airflow_ec2cluster.cluster import log_group_name
from tests.localcloud.helpers import wait_for

from .harness import Job

TASKS = 200
POISON = {7, 42, 99, 150, 199}
MAX_RECEIVE_COUNT = 2


def poison_tasks() -> list[dict]:
    return [{"n": n, "poison": n in POISON} for n in range(TASKS)]


def poison_ids() -> set[str]:
    return {f"t{n:09d}" for n in POISON}


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("logging_restored")  # it runs `ec2cluster logs` in this process
def test_poison_messages_are_dead_lettered_and_reported(cloud_env, capsys):
    job = Job(cloud_env, "poison")
    job.enqueue(poison_tasks(), max_receive_count=MAX_RECEIVE_COUNT)
    job.launch(2, "handlers:poison_if_asked")
    # The workers ship their lines every few seconds: once every poison task's failure is in CloudWatch
    # Logs, the drain's rounds show them (a few a round), however fast the job drains.
    wait_for(lambda: failed_in_cloudwatch(job) >= poison_ids(), 60, "the failures in CloudWatch Logs")
    summary = job.drain(timeout=90)
    teardown = job.teardown()
    job.assert_nothing_left()
    drain_log = capsys.readouterr().out

    # A failed task's traceback, in the Airflow UI (the drain task's log)...
    shown = [task_id for task_id in sorted(poison_ids()) if f"Task {task_id} failed on i-" in drain_log]
    assert shown, drain_log
    assert f"RuntimeError: poison task {shown[0]}" in drain_log
    assert "in poison_if_asked" in drain_log and "Traceback (most recent call last):" in drain_log
    assert teardown["log_group"] == log_group_name(job.cluster_id)
    assert f"the workers' logs stay in CloudWatch Logs group {log_group_name(job.cluster_id)}" in drain_log
    # ... and from `ec2cluster logs`, as the controller (its policy's FilterLogEvents), after the teardown.
    assert ec2cluster(["logs", job.cluster_id, "--task", "t000000007", "--aws-conn-id", "aws_default"]) == 0
    printed = capsys.readouterr().out
    assert '"event":"task.failed"' in printed and "RuntimeError: poison task t000000007" in printed
    assert "Traceback (most recent call last):" in printed and "in poison_if_asked" in printed

    assert summary["dead_lettered"] == len(POISON)
    assert set(summary["dead_lettered_task_ids"]) == poison_ids()
    assert summary["tasks_done"] == TASKS - len(POISON)
    results = {r["task_id"]: r for r in job.results()}
    assert len(results) == TASKS
    for task_id in poison_ids():
        assert results[task_id]["status"] == "failed"
        assert f"poison task {task_id}" in results[task_id]["error"]
    attempts = [e for e in job.worker_events("task.failed") if e["task_id"] in poison_ids()]
    assert {e["attempt"] for e in attempts} <= set(range(1, MAX_RECEIVE_COUNT + 1))
    print(
        f"\nRELIABILITY poison: tasks={TASKS} poison={len(POISON)} failed_attempts={len(attempts)} "
        f"dead_lettered={summary['dead_lettered']} reported={len(summary['dead_lettered_task_ids'])} "
        f"done={summary['tasks_done']} lost=0"
    )


def failed_in_cloudwatch(job: Job) -> set[str]:
    """The task ids of the cluster's task.failed lines in its log group (read as the account's root)."""
    pages = (
        job.cloud.client("logs")
        .get_paginator("filter_log_events")
        .paginate(logGroupName=log_group_name(job.cluster_id), filterPattern='{ $.event = "task.failed" }')
    )
    return {json.loads(e["message"])["task_id"] for page in pages for e in page["events"]}


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_dag_option_fails_the_run_on_dead_letters(cloud_env):
    job = Job(cloud_env, "poisonfail")
    job.enqueue(poison_tasks()[:20], max_receive_count=MAX_RECEIVE_COUNT)
    try:
        job.sensor(fail_on_dead_letters=True)  # the option must exist
        job.launch(1, "handlers:poison_if_asked")
        with pytest.raises(AirflowFailException, match="t000000007"):
            job.drain(timeout=90, fail_on_dead_letters=True)
    finally:
        job.teardown()
        job.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_hung_task_is_killed_counted_failed_and_the_worker_goes_on(cloud_env):
    job = Job(cloud_env, "stuck")
    tasks = [{"n": n, "hang": n == 3} for n in range(40)]
    job.enqueue(tasks, max_receive_count=MAX_RECEIVE_COUNT)
    job.launch(1, "handlers:hang_if_asked", task_timeout_seconds=2)
    summary = job.drain(timeout=90)
    job.teardown()
    job.assert_nothing_left()

    results = {r["task_id"]: r for r in job.results()}
    hung = results.pop("t000000003")
    assert hung["status"] == "failed" and "timed out after 2 s" in hung["error"]
    assert all(r["status"] == "done" for r in results.values()) and len(results) == 39
    assert summary["dead_lettered_task_ids"] == ["t000000003"]
    timeouts = [e for e in job.worker_events("task.failed") if "timed out" in e["error"]]
    stops = job.worker_events("worker.stopped")
    # One worker did it all: it survived every timeout and stopped normally.
    assert len(stops) == 1 and stops[0]["exit_code"] == 0 and stops[0]["tasks_done"] == 39
    print(f"\nRELIABILITY stuck-task: tasks=40 hung=1 timeouts={len(timeouts)} done=39 worker_exit=0 lost=0")
