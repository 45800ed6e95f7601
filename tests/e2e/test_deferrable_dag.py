"""The example DAG end to end on the local cloud with deferrable=True: the drain runs as a trigger."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud

from airflow_ec2cluster import demo
from tests.e2e.conftest import TWEETS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_example_dag_with_a_deferrable_drain(tmp_path, monkeypatch, airflow_home):
    started = time.monotonic()
    with LocalCloud(work_dir=tmp_path / "cloud") as cloud:
        env = demo.airflow_env(cloud, airflow_home)
        env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = "true"
        conf = json.dumps(demo.run_conf(cloud, workers=3, tweets=TWEETS))
        run = subprocess.run(
            [str(Path(sys.executable).with_name("airflow")), "dags", "test", demo.DAG_ID, "--conf", conf],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        output = run.stdout + run.stderr
        left_running = demo.cluster_instances(cloud, demo.LIVE_STATES)
        for name, value in env.items():
            if name.startswith(("AWS_", "AIRFLOW_CONN_")):
                monkeypatch.setenv(name, value)
        summary = demo.read_summary(cloud)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, output[-5000:]
    assert "running trigger in line" in output, "the drain did not defer"
    assert "QueueDrainedTrigger" in output or "Trigger completed" in output
    assert summary is not None and summary["tasks_done"] == summary["enqueued"] == TWEETS, summary
    assert left_running == []
    print(f"deferrable e2e: {elapsed:.1f} s")
