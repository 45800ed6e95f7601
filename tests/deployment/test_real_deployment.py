"""ec2_cluster_example in a real Airflow 3 deployment on the local cloud, triggered as the UI does.

One deployment for the module (scheduler, dag-processor, triggerer and api-server as separate processes,
LocalExecutor, SQLite in a temporary AIRFLOW_HOME; ``ec2cluster_localcloud.deployment``) and two runs
triggered side by side through ``POST /api/v2/dags/{dag_id}/dagRuns`` with the params in ``conf``: one with
the sync sensor, one with ``deferrable=True``. The fixture polls both runs until they finish, noting every
state each task instance shows, and reads back what the tests check; the tests then only assert.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field

import pytest
from ec2cluster_localcloud import LocalCloud, demo
from ec2cluster_localcloud.deployment import AirflowDeployment, error_lines, wait_until
from ec2cluster_localcloud.project import apply_project_policies

from airflow_ec2cluster.cluster import cluster_id_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("deployment"), pytest.mark.timeout(600)]

TWEETS = 100  # ten messages of ten: several batches for each of the two workers
WORKERS = 2
RUNS = {"sync": False, "deferrable": True}  # run name -> the DAG's deferrable param
# The deferrable run's workers boot the Debian 12 minimal image (the real bootstrap, its own python3);
# the sync run's are process-backed.
ON_DEBIAN = "deferrable"
RUNS_TIMEOUT_SECONDS = 420.0


@dataclass
class Run:
    name: str
    run_id: str
    conf: dict
    state: str | None = None
    seen: dict[str, set[str]] = field(default_factory=dict)  # task id -> every state it was seen in
    report: dict | None = None  # the report task's XCom
    summary: dict | None = None  # read back from the state table through the hook
    seconds: float | None = None

    @property
    def cluster_id(self) -> str:
        return cluster_id_for(demo.DAG_ID, self.run_id)


def tweet_ids() -> list[str]:
    with (demo.DAGS_FOLDER / "data" / "tweets.jsonl").open() as lines:
        return [json.loads(line)["id"] for line in itertools.islice(lines, TWEETS)]


@pytest.fixture(scope="module")
def cloud_and_deployment(tmp_path_factory):
    """The local cloud and the deployment on it; Airflow's metadata DB migrates while the cloud starts."""
    deployment = AirflowDeployment(tmp_path_factory.mktemp("airflow-home"), demo.DAGS_FOLDER)
    with contextlib.ExitStack() as stack:
        stack.callback(deployment.stop)  # also stops a migration the cloud's failed start left running
        deployment.begin_migrate()
        cloud = stack.enter_context(LocalCloud(work_dir=tmp_path_factory.mktemp("cloud")))
        # IAM enforced: Airflow holds exactly the controller policy.
        controller = apply_project_policies(cloud)
        deployment.extra_env.update(demo.deployment_env(cloud, controller))
        yield cloud, stack.enter_context(deployment)


@pytest.fixture(scope="module")
def cloud(cloud_and_deployment):
    return cloud_and_deployment[0]


@pytest.fixture(scope="module")
def deployment(cloud_and_deployment):
    return cloud_and_deployment[1]


@pytest.fixture(scope="module")
def runs(cloud, deployment) -> dict[str, Run]:
    started = time.monotonic()
    deployment.unpause(demo.DAG_ID)
    runs = {}
    debian_12 = cloud.register_rootfs_image("debian-12")
    for name, deferrable in RUNS.items():
        image = debian_12 if name == ON_DEBIAN else None
        conf = demo.run_conf(cloud, workers=WORKERS, tweets=TWEETS, deferrable=deferrable, ami_id=image)
        runs[name] = Run(name, deployment.trigger(demo.DAG_ID, conf), conf)

    def poll(run: Run) -> bool:
        if run.state in ("success", "failed"):
            return True
        run.state = deployment.run_state(demo.DAG_ID, run.run_id)
        for task_id, state in deployment.task_states(demo.DAG_ID, run.run_id).items():
            run.seen.setdefault(task_id, set()).add(str(state))
        if run.state in ("success", "failed"):
            run.seconds = time.monotonic() - started
            return True
        return False

    def finished() -> bool:
        deployment.check_alive()
        return all([poll(run) for run in runs.values()])

    wait_until(
        "both runs to finish",
        finished,
        timeout=RUNS_TIMEOUT_SECONDS,
        describe=lambda: f"{[(r.name, r.state, r.seen) for r in runs.values()]}; {deployment.airflow_home}",
    )
    for run in runs.values():
        deployment.wait_workloads_finished(demo.DAG_ID, run.run_id)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**cloud.env(), **cloud.airflow_conn_env()}.items():
            env.setenv(name, value)
        for run in runs.values():
            if run.state == "success":
                run.report = deployment.xcom(demo.DAG_ID, run.run_id, "report")
            run.summary = demo.read_summary(cloud, run.cluster_id)
    for run in runs.values():
        print(f"{run.name}: {run.state} after {run.seconds:.1f} s; drain seen {sorted(run.seen['drain'])}")
    return runs


@pytest.mark.parametrize("name", RUNS)
def test_a_ui_triggered_run_succeeds_with_one_result_per_tweet(cloud, runs, name):
    run = runs[name]
    assert run.state == "success", f"{name} run {run.run_id}: {run.state}; tasks seen {run.seen}"
    assert run.report["cluster_id"] == run.cluster_id
    assert run.report["enqueued"] == run.report["results"] == TWEETS, run.report
    # Read back from the state table through the hook: one result per tweet, each its own tweet's.
    assert run.summary["enqueued"] == run.summary["tasks_done"] == TWEETS
    assert run.summary["task_ids"] == sorted(tweet_ids())
    assert run.summary["results_match_tasks"]
    assert run.summary["workers_used"] == WORKERS
    # What the run cost: every instance-second priced (the demo's type is in the price table).
    assert run.summary["cost"].startswith("$") and "unknown" not in run.summary["cost"], run.summary
    assert run.summary["instance_seconds"] > 0
    images = {
        (cloud.worker_processes()[i["InstanceId"]]["image"] or {}).get("flavour")
        for i in demo.cluster_instances(cloud, cluster_id=run.cluster_id)
    }
    assert images == ({"debian-12"} if name == ON_DEBIAN else {None})


def test_the_deferrable_run_waited_for_the_drain_in_the_triggerer(runs):
    assert "deferred" in runs["deferrable"].seen["drain"], runs["deferrable"].seen
    assert "deferred" not in runs["sync"].seen["drain"], runs["sync"].seen


def test_no_instance_is_left_running(cloud, runs):
    for run in runs.values():
        assert demo.cluster_instances(cloud, demo.LIVE_STATES, cluster_id=run.cluster_id) == []
        assert len(demo.cluster_instances(cloud, cluster_id=run.cluster_id)) == WORKERS
    # Terminated instances' worker processes are stopped by the local cloud's runner (observed, not assumed).
    wait_until(
        "every worker process to stop",
        lambda: not any(p["alive"] for p in cloud.worker_processes().values()),
        timeout=60,
        describe=lambda: f"processes: {cloud.worker_processes()}",
    )


def test_the_deployments_logs_hold_no_error_lines(deployment, runs):
    deployment.stop()  # the runs are over (the fixture waited): its shutdown is logged too
    logs = [*deployment.component_logs().values(), *deployment.task_logs()]
    assert all(path.is_file() for path in deployment.component_logs().values())
    assert any("task_id=drain" in str(path) for path in logs), "no task logs found"
    assert error_lines(logs) == []
