"""Worker crash: kill -9 a worker at 20 %, 40 % and 60 % of a 2,000-task job; nothing lost, nothing doubled.

The kill schedule is a function of progress (messages done, read from the queue), not of time, and the last
kill comes with 40 % of the job (about 6 s of work for four workers, more with fewer) still to do, so every
kill happens before the job ends however busy the machine is.
"""

from __future__ import annotations

import random
import signal

import pytest

from .harness import Job, kill_worker

TASKS = 2000
WORKERS = 4
TASK_SECONDS = 0.03
KILL_AT = (0.2, 0.4, 0.6)  # shares of the job's messages done


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_kill_dash_nine_workers_loses_nothing(cloud_env):
    job = Job(cloud_env, "crash")
    job.enqueue([{"n": n, "sleep": TASK_SECONDS} for n in range(TASKS)])
    job.launch(WORKERS, "handlers:double")
    messages = int(job.xcom["enqueue"]["enqueued_messages"])
    kills: list[tuple[str, int]] = []  # (instance id, messages done when it was killed)
    rng = random.Random(4)

    def kill_on_progress() -> None:
        if len(kills) == len(KILL_AT):
            return
        done = job.messages_done()
        due = sum(done >= share * messages for share in KILL_AT) - len(kills)
        if due <= 0:
            return
        running = job.running_worker_pids()  # a worker at work, not one still booting
        for victim in rng.sample(sorted(running), min(due, len(running))):
            kill_worker(running[victim], signal.SIGKILL)
            kills.append((victim, done))

    summary = job.drain(timeout=240, between_pokes=kill_on_progress, max_replacements=len(KILL_AT) + 3)
    job.teardown()
    job.assert_nothing_left()

    assert len(kills) == len(KILL_AT), f"only {len(kills)} kills before the job finished: {kills}"
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
        f"killed_at_messages_done={[done for _, done in kills]}/{messages} "
        f"replacements={summary['replacements_launched']} executions={sum(executions.values())} "
        f"duplicate_executions={duplicates} results={len(by_task)} lost=0 "
        f"elapsed={summary['elapsed_seconds']}"
    )
