"""`ec2cluster status` on a real job, as a user runs it: during, when finished, and after a teardown.

A job of 120 tasks of which 30 are poison runs on the local cloud; the command (a process of its own) must
then say 100 % with no ETA, list all 30 dead-lettered tasks, print nothing but its report, and after a
teardown that deleted the queues show what the state table still holds; `--watch` must end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from ec2cluster_localcloud.project import controller_env

from tests.localcloud.helpers import wait_for

from .harness import Job, kill_worker

TASKS = 120
POISON = set(range(0, TASKS, 4))  # 30 poison tasks, one a message
MAX_RECEIVE_COUNT = 2
# A ceiling against a hang (a --watch that never ends), not a speed expectation.
HANG_GUARD_SECONDS = 300
LOG_LINE = re.compile(r"\[(info|debug|warning)\s*\]|\b(INFO|DEBUG)\b")


def ec2cluster(job: Job, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "airflow_ec2cluster.cli", *args, "--state-table", job.state_table],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
        # As the controller (the user holding exactly `iam-policy --side controller`), not the root.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            **controller_env(job.cloud, job.cloud.controller_credentials),
            "NO_COLOR": "1",
        },
    )


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_status_tells_the_truth_after_the_job_and_after_the_teardown(cloud_env):
    job = Job(cloud_env, "status")
    poison_ids = {f"t{n:09d}" for n in POISON}
    tasks = [{"n": n, "poison": n in POISON} for n in range(TASKS)]
    job.enqueue(tasks, tasks_per_message=1, max_receive_count=MAX_RECEIVE_COUNT)
    job.launch(2, "handlers:poison_if_asked")
    summary = job.drain(timeout=240)
    # The drain's summary lists every dead-lettered task (its limit is 100), not 10.
    assert set(summary["dead_lettered_task_ids"]) == poison_ids

    finished = ec2cluster(job, "status", job.cluster_id, "--dead-letters", "50")
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == "" and not LOG_LINE.search(finished.stdout)
    progress = finished.stdout.splitlines()[1]
    assert "100.0%  120/120 finished (done 90, failed 30: task log, exact)" in progress
    assert progress.endswith("ETA -")
    assert "dead-lettered tasks (30 shown, from 30 of 30 dead-lettered messages):" in finished.stdout
    listed = {line.split()[0] for line in finished.stdout.splitlines() if "poison task" in line}
    assert listed == poison_ids

    job.teardown(delete_queues=True)
    for url in (job.xcom["enqueue"]["queue_url"], job.xcom["enqueue"]["dlq_url"]):
        job.hook.delete_queue(url)  # whether or not the teardown kept them for the dead letters
    job.assert_nothing_left()
    after = ec2cluster(job, "status", job.cluster_id, "--watch", "--interval", "0.5")
    assert after.returncode == 0, after.stderr
    assert "Traceback" not in after.stdout + after.stderr
    assert "queues deleted" in after.stdout and "state torn down" in after.stdout
    assert "120/120 finished (done 90, failed 30: task log, exact)" in after.stdout
    # What it cost, after the fact: every instance priced; the teardown's final figure covers the drain's.
    final = job.xcom["teardown"]["cost"]
    assert final["cost_unknown_instance_seconds"] == 0 and final["estimated_cost_usd"] > 0
    # (less by at most a second an instance: the drain counted a just-ending instance to its own clock,
    # EC2's termination stamp is to the second)
    assert final["instance_seconds"] >= summary["instance_seconds"] - summary["workers_used"] * 1.0 > 0
    assert re.search(r"^cost ~\$\d+\.\d{4,} \(estimate\)$", after.stdout, re.M), after.stdout
    print(f"\nSTATUS after the fact:\n{finished.stdout}\n{after.stdout}")


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_eta_is_unknown_while_killed_workers_hold_messages(cloud_env):
    """Workers killed mid-batch keep their messages locked for their visibility timeout: no ETA in seconds."""
    job = Job(cloud_env, "statuseta")
    job.enqueue([{"n": n, "sleep": 0.2} for n in range(200)], tasks_per_message=1)
    try:
        job.launch(2, "handlers:double", visibility_timeout_seconds=300)
        wait_for(
            lambda: len(job.running_worker_pids()) == 2 and job.messages_done() >= 10,
            120,
            "both workers running and 10 tasks done",
        )
        for pid in job.running_worker_pids().values():
            kill_worker(pid)
        wait_for(lambda: not job.instances(), 60, "the killed workers' instances to be gone")
        result = ec2cluster(job, "status", job.cluster_id)
        assert result.returncode == 0, result.stderr
        progress = result.stdout.splitlines()[1]
        # The killed workers never reported their counts: the deleted messages say how many are done.
        left = job.messages_left()
        assert f"  {200 - left}/200 finished" in progress
        assert re.search(
            r"ETA unknown: \d+ message\(s\) held by stopped workers until their visibility", progress
        )
        print(f"\nSTATUS with killed workers:\n{result.stdout}")
    finally:
        job.teardown(delete_queues=True)
