"""A handler that does not import: the drain stops early, quoting the error; fixed and re-run, the job ends.

The issue's scenario, run as the example DAG runs it: enqueue, launch (a handler module that does not
exist), drain, teardown (``delete_queues=True``, as the example DAG's); then the user fixes the handler and
clears the launch, drain and teardown tasks, which run again with the fixed arguments. Every worker of the
first launch fails at start with the same error: the drain stops after ``repeated_failure_limit`` of them in
a row, well before the replacement budget is spent, and the failure quotes the error. The re-run starts a
new launch generation from the current arguments, and every task is done exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException
from ec2cluster_worker import records

from .harness import Job

TASKS = 60  # 6 messages of 10
WORKERS = 4
# In the bundle, but it imports a module nothing provides: every worker fails at start the same way.
BROKEN = "broken_handlers:double"
BROKEN_CODE = str(Path(__file__).resolve().parent / "broken_handlers.py")
FIXED = "handlers:double"
LIMIT = 3
BUDGET = 2 * WORKERS  # the sensor's default max_replacements


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_handler_that_does_not_import_stops_early_and_a_re_run_after_the_fix_finishes(cloud_env, capsys):
    job = Job(cloud_env, "rerun")
    job.enqueue([{"n": n} for n in range(TASKS)])
    job.launch(WORKERS, BROKEN, launch_options={"code": [BROKEN_CODE]})

    with pytest.raises(AirflowFailException) as failed:
        job.drain(timeout=120, repeated_failure_limit=LIMIT)
    message = str(failed.value)
    assert f"{LIMIT} workers in a row failed at start with the same error" in message, message
    assert "No module named 'no_such_module_of_the_tests'" in message, message
    assert "clear the launch and drain tasks" in message
    first_generation = job.instance_ids()
    assert len(first_generation) < WORKERS + BUDGET, f"{len(first_generation)} instances launched"
    # The cause of every worker stopped by the last round reached the sensor's log once (a worker may stop
    # after it: its reason stays on its status item, for `ec2cluster status`).
    reported = job.hook.get_meta(job.state_table, job.cluster_id).stops_reported
    assert len(reported) >= LIMIT
    logged = capsys.readouterr().out
    for worker_id in reported:
        assert logged.count(f"Worker {worker_id} stopped: startup-failed:") == 1, worker_id
    stopped = {w for w, state in job.worker_states().items() if state == records.STATE_STOPPED}
    assert set(reported) <= stopped
    job.teardown(delete_queues=True)  # the example DAG's teardown runs after the failed drain
    job.assert_nothing_left()

    # The fix, and a UI "clear" of launch, drain and teardown: the same operators run again.
    job.launch(WORKERS, FIXED)
    summary = job.drain(timeout=180, repeated_failure_limit=LIMIT)
    job.teardown(delete_queues=True)
    job.assert_nothing_left()

    results = job.results()
    assert sorted(r["task_id"] for r in results) == [f"t{n:09d}" for n in range(TASKS)]
    assert all(r["status"] == "done" and r["result"] == {"n": 2 * int(r["task_id"][1:])} for r in results)
    executions = job.executions()
    assert sorted(executions) == [f"t{n:09d}" for n in range(TASKS)]
    assert set(executions.values()) == {1}, "a task ran twice"
    assert summary["tasks_done"] == TASKS and summary["dead_lettered"] == 0
    second_generation = job.instance_ids() - first_generation
    print(
        f"\nRELIABILITY rerun-after-fix: first_generation_instances={len(first_generation)} "
        f"(budget {WORKERS}+{BUDGET}) second_generation_instances={len(second_generation)} "
        f"tasks={TASKS} executions={sum(executions.values())} elapsed={summary['elapsed_seconds']}"
    )
