"""The example DAG end to end: `airflow dags test` on the local cloud, real worker processes."""

from __future__ import annotations

import itertools
import json

import pytest
from ec2cluster_localcloud import LocalCloud

from airflow_ec2cluster import demo
from tests.e2e.conftest import TWEETS

pytestmark = pytest.mark.e2e


def tweet_ids() -> set[str]:
    with (demo.REPO_ROOT / "dags" / "data" / "tweets.jsonl").open() as lines:
        return {json.loads(line)["id"] for line in itertools.islice(lines, TWEETS)}


def test_example_dag_processes_every_tweet_and_leaves_nothing_running(tmp_path, monkeypatch, airflow_home):
    with LocalCloud(work_dir=tmp_path / "cloud") as cloud:
        env = demo.airflow_env(cloud, airflow_home)
        conf = json.dumps(demo.run_conf(cloud, workers=2, tweets=TWEETS))
        assert demo.airflow(["dags", "test", demo.DAG_ID, "--conf", conf], env, quiet=True) == 0

        assert demo.cluster_instances(cloud, demo.LIVE_STATES) == []
        for name, value in env.items():
            if name.startswith(("AWS_", "AIRFLOW_CONN_")):
                monkeypatch.setenv(name, value)
        summary = demo.read_summary(cloud)
        from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

        results = list(EC2ClusterHook().iter_results(demo.STATE_TABLE, summary["cluster_id"]))

    assert summary["enqueued"] == len(tweet_ids())
    # One result per task id, each one the handler's answer for its own tweet.
    assert {r["task_id"] for r in results} == tweet_ids()
    assert len(results) == len(tweet_ids())
    assert all(r["status"] == "done" and r["result"]["id"] == r["task_id"] for r in results)
    assert summary["workers_used"] == 2
    # The local cloud stopped every worker process with its instance.
    assert all(not p["alive"] for p in cloud.worker_processes().values())
