"""A spot interruption notice, posted in one worker's instance metadata, stops that worker cleanly.

The worker learns its identity and watches for the notice through the instance metadata service, as on
EC2; the local cloud reclaims the instance when the notice period ends. The notice is injected once the
job has made progress (observed), while work remains; the other worker (and the drain's replacements)
finish the job, and nothing is lost.
"""

from __future__ import annotations

import pytest

from .harness import Job

TASKS = 60
NOTICE_SECONDS = 30.0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_spot_notice_stops_its_worker_and_loses_nothing(cloud_env):
    job = Job(cloud_env, "spot")
    job.enqueue([{"n": n, "sleep": 0.3} for n in range(TASKS)], tasks_per_message=1)
    job.launch(2, "handlers:double")
    interrupted: list[str] = []

    def interrupt_when_under_way() -> None:
        if interrupted or job.messages_done() < 10:
            return
        running = sorted(iid for iid, state in job.worker_states().items() if state == "running")
        if running:
            cloud_env.inject_spot_interruption(running[0], notice_seconds=NOTICE_SECONDS)
            interrupted.append(running[0])

    summary = job.drain(timeout=200, between_pokes=interrupt_when_under_way)
    assert interrupted, "the job finished before a notice could be posted"
    statuses = {item["sk"]: item for item in job.hook.worker_statuses(job.state_table, job.cluster_id)}
    assert statuses[interrupted[0]]["stop_reason"] == "spot-interruption", statuses[interrupted[0]]
    job.teardown()
    job.assert_nothing_left()
    results = job.results()
    assert sorted(r["task_id"] for r in results) == [f"t{n:09d}" for n in range(TASKS)]
    assert all(r["status"] == "done" and r["result"] == {"n": 2 * int(r["task_id"][1:])} for r in results)
    assert summary["tasks_done"] == TASKS
    print(
        f"\nRELIABILITY spot notice: tasks={TASKS} interrupted={interrupted[0]} "
        f"stop_reason={statuses[interrupted[0]]['stop_reason']} workers_used={summary['workers_used']} "
        f"replacements={summary['replacements_launched']} lost=0"
    )
