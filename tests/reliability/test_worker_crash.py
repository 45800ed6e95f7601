"""Worker crash: kill -9 workers every few seconds during a 2,000-task job; nothing lost, nothing doubled."""

from __future__ import annotations

import random
import signal
import time

import pytest

from .harness import Job, kill_worker, worker_pids

TASKS = 2000
WORKERS = 4
KILLS = 3
KILL_EVERY_SECONDS = 2.0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_kill_dash_nine_workers_loses_nothing(cloud_env):
    job = Job(cloud_env, "crash")
    job.enqueue([{"n": n} for n in range(TASKS)])
    job.launch(WORKERS, "tests.reliability.handlers:double")
    kills: list[str] = []
    last_kill = time.monotonic()
    rng = random.Random(4)

    def kill_one() -> None:
        nonlocal last_kill
        if len(kills) >= KILLS + 1 or time.monotonic() - last_kill < KILL_EVERY_SECONDS:
            return
        pids = worker_pids(job.cloud, job.instance_ids())
        if pids:
            victim = rng.choice(sorted(pids))
            kill_worker(pids[victim], signal.SIGKILL)
            kills.append(victim)
            last_kill = time.monotonic()

    summary = job.drain(timeout=150, between_pokes=kill_one, max_replacements=KILLS + 3)
    job.teardown()
    job.assert_nothing_left()

    assert len(kills) >= KILLS, f"only {len(kills)} kills before the job finished"
    results = job.results()
    by_task = {}
    for result in results:
        assert result["task_id"] not in by_task, f"two results for {result['task_id']}"
        by_task[result["task_id"]] = result
    assert sorted(by_task) == [f"t{n:09d}" for n in range(TASKS)], "a task has no result"
    for task_id, result in by_task.items():
        assert result["status"] == "done", result
        assert result["result"] == {"n": 2 * int(task_id[1:])}
    assert summary["tasks_done"] == TASKS and summary["tasks_failed"] == 0
    assert summary["dead_lettered"] == 0
    executions = job.executions()
    duplicates = sum(count - 1 for count in executions.values())
    print(
        f"\nRELIABILITY worker-crash: tasks={TASKS} kills={len(kills)} "
        f"replacements={summary['replacements_launched']} executions={sum(executions.values())} "
        f"duplicate_executions={duplicates} results={len(by_task)} lost=0 "
        f"elapsed={summary['elapsed_seconds']}"
    )
