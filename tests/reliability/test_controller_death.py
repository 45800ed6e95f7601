"""Controller death: the sensor's process is killed mid-run; the workers still stop and a re-run picks up.

Mid-run by construction, not by timing: the job's last task waits for a gate file that the test creates only
after it killed the sensor, so the sensor (however slow to start) cannot see the job drained first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import FAST_WORKER, Job, wait_for

TASKS = 600
WORKERS = 3
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_workers_stop_by_themselves_when_the_controller_dies(cloud_env, tmp_path):
    job = Job(cloud_env, "orphan")
    gate = tmp_path / "sensor-killed"
    tasks = [{"n": n, "sleep": 0.02} for n in range(TASKS)]
    tasks[-1]["gate"] = str(gate)
    job.enqueue(tasks)
    # The gated task waits for the sensor's start-up (Airflow's imports) and two pokes: a long task timeout.
    job.launch(WORKERS, "handlers:double", task_timeout_seconds=300)
    output = (tmp_path / "sensor.out").open("w")
    sensor = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.sensor_process", job.cluster_id, job.state_table],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        progress = f"Cluster {job.cluster_id}: done"
        wait_for(lambda: (tmp_path / "sensor.out").read_text().count(progress) >= 2, 60, "two pokes")
        assert sensor.poll() is None, "the sensor finished before it could be killed"
        os.kill(sensor.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        sensor.wait(10)
    finally:
        if sensor.poll() is None:
            sensor.kill()
        output.close()
        gate.touch()  # the job may end now
    assert "DRAINED" not in (tmp_path / "sensor.out").read_text()

    # Nobody watches now: the workers finish the queue, go idle, exit, and their instances shut down.
    bound = 90
    wait_for(lambda: not job.instances(), bound, "every instance to shut down by itself", interval=0.5)
    unattended = time.monotonic() - killed_at
    assert not job.live_processes()
    stops = job.worker_events("worker.stopped")
    # Each stops as soon as it holds nothing and the queue shows nothing (stop_when_queue_empty), or
    # after its idle time: never because anyone told it to.
    assert len(stops) >= WORKERS and {e["reason"] for e in stops} <= {"queue-empty", "idle"}

    # A new sensor (no local state) finds the finished job from AWS state alone.
    summary = job.drain(timeout=30)
    assert summary["tasks_done"] == TASKS and summary["tasks_failed"] == 0
    results = job.results()
    assert sorted(r["task_id"] for r in results) == [f"t{n:09d}" for n in range(TASKS)]
    job.teardown()
    job.assert_nothing_left()
    print(
        f"\nRELIABILITY controller-death: tasks={TASKS} workers={WORKERS} sensor_kill9=1 "
        f"instances_gone_after_s={unattended:.1f} idle_shutdown_s={FAST_WORKER['idle_shutdown_seconds']} "
        f"left_running=0 rerun_done={summary['tasks_done']} lost=0"
    )
