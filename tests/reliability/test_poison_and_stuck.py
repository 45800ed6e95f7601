"""Poison messages end in the dead-letter queue and the summary; a hung task is killed, the worker goes on."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

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
def test_poison_messages_are_dead_lettered_and_reported(cloud_env):
    job = Job(cloud_env, "poison")
    job.enqueue(poison_tasks(), max_receive_count=MAX_RECEIVE_COUNT)
    job.launch(2, "handlers:poison_if_asked")
    summary = job.drain(timeout=90)
    job.teardown()
    job.assert_nothing_left()

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
