"""The main job as a user meets it: ec2_cluster_example in a real Airflow deployment on the local cloud.

    python -m ec2cluster_localcloud.demo [run]   # what `make demo` runs
    python -m ec2cluster_localcloud.demo up      # what `make up` runs

Both start the local cloud (a moto server plus an instance runner: every EC2 instance launched is a real
worker process) and Airflow 3 beside it, each component its own process: scheduler (LocalExecutor),
dag-processor, triggerer and api-server, with a SQLite metadata DB in .airflow and this repository's dags/.

run (the default) unpauses ec2_cluster_example and triggers it through the REST API, as the UI's Trigger
button does (POST /api/v2/dags/ec2_cluster_example/dagRuns, the params in conf), prints the UI's address
and login so you can watch it, then a summary read back from the cloud. It exits 0 when the run succeeded,
every tweet has its result and no instance is left running; 1 otherwise.

up keeps the local cloud and Airflow running until Ctrl-C and prints the UI's address, the login, and the
ami_id and instance_profile to give as params when you trigger ec2_cluster_example from the UI.

Components' output: .airflow/components/*.log; task logs: .airflow/logs; workers' logs: .localcloud/demo/logs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID, cluster_id_for
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.deployment import AirflowDeployment, DeploymentError, error_lines
from ec2cluster_localcloud.project import apply_project_policies, controller_env

DAG_ID = "ec2_cluster_example"
# The demo runs from a checkout of the repository: localcloud/ec2cluster_localcloud/demo.py.
REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO_ROOT / "dags"
STATE_TABLE = "ec2cluster-state"
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
UI_PORT = 8080  # preferred; a free port when it is taken
RUN_TIMEOUT_SECONDS = 1800.0


def base_airflow_env(airflow_home: Path) -> dict[str, str]:
    """Airflow's settings for the demo: its own AIRFLOW_HOME (SQLite) and this repository's dags/."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
    }


def migrate_airflow_db(airflow_home: Path) -> bool:
    return airflow(["db", "migrate"], base_airflow_env(airflow_home), quiet=True) == 0


def airflow(args: list[str], env: dict[str, str], *, quiet: bool = False) -> int:
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, env=env, stdout=output, stderr=output, check=False).returncode


def deployment_env(cloud: LocalCloud, controller: dict[str, str]) -> dict[str, str]:
    """What the deployment's components (and their task processes) need to use the local cloud: they act
    as the controller user, which holds exactly ``ec2cluster iam-policy --side controller``."""
    return {
        **controller_env(cloud, controller),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
    }


def use_cloud_here(cloud: LocalCloud, airflow_home: Path) -> None:
    """Point this process's boto3 and Airflow hooks at ``cloud`` (to read the results back)."""
    os.environ.update(cloud.env())
    os.environ.update(cloud.airflow_conn_env())
    os.environ.setdefault("AIRFLOW_HOME", str(airflow_home))
    # The summary is printed here; the hook's INFO lines would only clutter it.
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def cluster_instances(
    cloud: LocalCloud, states: tuple[str, ...] | None = None, *, cluster_id: str | None = None
) -> list[dict]:
    """Every instance a cluster launched on this local cloud (only ``cluster_id``'s when given, only in
    ``states`` when given)."""
    if cluster_id is None:
        filters = [{"Name": "tag-key", "Values": [TAG_CLUSTER_ID]}]
    else:
        filters = [{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    paginator = cloud.client("ec2").get_paginator("describe_instances")
    return [
        instance
        for page in paginator.paginate(Filters=filters)
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]


def read_summary(cloud: LocalCloud, cluster_id: str | None = None) -> dict | None:
    """What a run left in the cloud, read back through the hook as a downstream consumer would.

    ``cluster_id``: the run's cluster (``cluster_id_for(DAG_ID, run_id)``); without it, the only cluster on
    this (fresh) local cloud, or None when there is not exactly one. The hook reads the ``aws_default``
    connection: the caller's environment must point it at ``cloud`` (:func:`use_cloud_here`).
    """
    if cluster_id is None:
        tags = [tag for instance in cluster_instances(cloud) for tag in instance.get("Tags", [])]
        cluster_ids = {tag["Value"] for tag in tags if tag["Key"] == TAG_CLUSTER_ID}
        if len(cluster_ids) != 1:
            return None
        cluster_id = cluster_ids.pop()
    instances = cluster_instances(cloud, cluster_id=cluster_id)
    from airflow_ec2cluster.calls import run_sync
    from airflow_ec2cluster.drain.round import cost_round
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    hook = EC2ClusterHook(aws_conn_id="aws_default")
    meta = hook.get_meta(STATE_TABLE, cluster_id)
    results = [r for r in hook.iter_results(STATE_TABLE, cluster_id) if r["status"] == "done"]
    smileys = [r["result"] for r in results]
    # What the run cost, as the teardown estimates it: EC2's times (every state), META's record, prices.
    described = hook.list_cluster_instances(cluster_id, None)
    estimate = run_sync(cost_round(meta, described, time.time()), hook).estimate if meta else None
    return {
        "cluster_id": cluster_id,
        "enqueued": (meta.enqueued if meta else None) or 0,
        "tasks_done": len(results),
        "task_ids": sorted(r["task_id"] for r in results),
        "results_match_tasks": all(r["result"]["id"] == r["task_id"] for r in results),
        "workers_used": len(instances),
        "total_smileys": sum(s["smileys"] for s in smileys),
        "top_tweets": sorted(smileys, key=lambda s: (-s["smileys"], s["id"]))[:3],
        "cost": estimate.text() if estimate else None,
        "instance_seconds": round(estimate.instance_seconds, 1) if estimate else None,
    }


def run_conf(
    cloud: LocalCloud,
    workers: int,
    tweets: int = 3000,
    *,
    deferrable: bool = False,
    ami_id: str | None = None,
) -> dict:
    """The params of a run on ``cloud``, as a UI user would fill in the trigger form (``ami_id``: default,
    the local cloud's process-backed AMI; ``cloud.register_rootfs_image()`` gives a Debian 12 one)."""
    return {
        "tweets": tweets,
        "workers": workers,
        "ami_id": ami_id or cloud.ami_id,
        "instance_profile": cloud.instance_profile_name,
        # Short timings so the demo finishes in seconds; real clusters keep the DAG's defaults.
        "idle_timeout": 60,
        "worker_idle_shutdown": 30,
        "deferrable": deferrable,
    }


def print_login(deployment: AirflowDeployment) -> None:
    print(f"Airflow UI: {deployment.url}  (login: {deployment.username} / {deployment.password})", flush=True)


class ProgressPrinter:
    """Prints each task's state when it changes (an ``on_poll`` callback of ``wait_for_run``)."""

    def __init__(self, started: float):
        self.started = started
        self.last: dict[str, str | None] = {}

    def __call__(self, states: dict[str, str | None]) -> None:
        for task_id, state in states.items():
            if state is not None and self.last.get(task_id) != state:
                print(f"  {time.monotonic() - self.started:6.1f} s  {task_id}: {state}", flush=True)
        self.last = dict(states)


def begin_airflow(args: argparse.Namespace) -> AirflowDeployment:
    """The deployment, not started: its metadata DB migrates in the background while the local cloud starts
    (the migration needs no cloud). ``start_all`` starts it; stop it in every case."""
    deployment = AirflowDeployment(args.airflow_home, DAGS_FOLDER, port=args.port)
    deployment.begin_migrate()
    return deployment


def start_all(args: argparse.Namespace, cloud: LocalCloud, deployment: AirflowDeployment) -> None:
    print(f"local cloud at {cloud.endpoint_url} (region {cloud.region})", flush=True)
    print(f"starting Airflow (about a minute; its logs: {args.airflow_home / 'components'})...", flush=True)
    print(
        "IAM enforced: Airflow acts as a user holding `ec2cluster iam-policy --side controller`", flush=True
    )
    controller = apply_project_policies(cloud)
    deployment.extra_env.update(deployment_env(cloud, controller))
    deployment.start()


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    deployment = begin_airflow(args)
    with contextlib.ExitStack() as stack:
        stack.callback(deployment.stop)
        cloud = stack.enter_context(LocalCloud(work_dir=args.work_dir))
        start_all(args, cloud, deployment)
        try:
            print_login(deployment)
            deployment.unpause(DAG_ID)
            conf = run_conf(cloud, args.workers, args.tweets, deferrable=args.deferrable)
            run_id = deployment.trigger(DAG_ID, conf, note="make demo")
            print(f"triggered {DAG_ID} run {run_id}", flush=True)
            print(f"  watch it: {deployment.url}/dags/{DAG_ID}/runs/{run_id}", flush=True)
            state = deployment.wait_for_run(
                DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS, on_poll=ProgressPrinter(time.monotonic())
            )
            cluster_id = cluster_id_for(DAG_ID, run_id)
            left_running = cluster_instances(cloud, LIVE_STATES, cluster_id=cluster_id)
            use_cloud_here(cloud, args.airflow_home)
            summary = read_summary(cloud, cluster_id)
        finally:
            deployment.stop()
        errors = error_lines([*deployment.component_logs().values(), *deployment.task_logs()])

    print()
    print("=" * 72)
    print(f"{DAG_ID} in Airflow on the local cloud: {time.monotonic() - started:.1f} s")
    if summary:
        for line in format_summary(summary):
            print(line)
    print(f"instances left running: {len(left_running)}; worker logs in {args.work_dir}/logs")
    print(f"Airflow logs: {deployment.components_dir} (components), {deployment.task_logs_dir} (tasks)")
    if errors:
        print(f"error lines in Airflow's logs: {len(errors)}")
        for line in errors[:10]:
            print(f"  {line}")
    print(f"DAG run: {state}")
    complete = (
        summary is not None
        and summary["tasks_done"] == summary["enqueued"] == args.tweets
        and summary["results_match_tasks"]
    )
    failed = state != "success" or bool(left_running) or not complete
    print("result: FAILED" if failed else "result: OK")
    return 1 if failed else 0


def up(args: argparse.Namespace) -> int:
    shutil.rmtree(args.work_dir, ignore_errors=True)
    deployment = begin_airflow(args)
    with contextlib.ExitStack() as stack:
        stack.callback(deployment.stop)
        cloud = stack.enter_context(LocalCloud(work_dir=args.work_dir))
        start_all(args, cloud, deployment)
        try:
            deployment.unpause(DAG_ID)
            print()
            print("=" * 72)
            print_login(deployment)
            print(f"Trigger {DAG_ID} ({deployment.url}/dags/{DAG_ID}) with these params:")
            print(f"  ami_id            {cloud.ami_id}")
            print(f"  instance_profile  {cloud.instance_profile_name}")
            print("  (and a small worker_idle_shutdown, e.g. 30, so idle workers stop soon)")
            print(f"Local cloud: {cloud.endpoint_url}; workers' logs in {args.work_dir}/logs")
            print(f"Airflow logs: {deployment.components_dir}, {deployment.task_logs_dir}")
            print("Ctrl-C stops everything.", flush=True)
            while True:
                deployment.check_alive()
                time.sleep(1)  # not a synchronisation: idling until Ctrl-C, watching the components
        except KeyboardInterrupt:
            print("\nstopping Airflow and the local cloud...", flush=True)
        finally:
            deployment.stop()
    return 0


def format_summary(summary: dict) -> list[str]:
    lines = [
        f"cluster {summary['cluster_id']}: {summary['workers_used']} workers",
        f"tasks: {summary['tasks_done']} done of {summary['enqueued']} enqueued",
        f"cost: ~{summary['cost']} for {summary['instance_seconds']} instance-seconds (estimate)",
        f"smileys counted: {summary['total_smileys']}; top tweets:",
    ]
    for rank, top in enumerate(summary.get("top_tweets", []), start=1):
        lines.append(f"  #{rank} {top['id']}: {top['smileys']} smileys")
    return lines


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM stop everything cleanly, even when started with SIGINT ignored (``cmd &``)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ec2cluster_localcloud.demo",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "up"),
        default="run",
        help="run: trigger the example and report (make demo, the default); up: keep running (make up)",
    )
    parser.add_argument("--workers", type=int, default=3, help="EC2 workers to launch (default 3)")
    parser.add_argument("--tweets", type=int, default=3000, help="tweets to process (default 3000)")
    parser.add_argument(
        "--deferrable", action="store_true", help="the drain waits in the triggerer (the DAG's param)"
    )
    parser.add_argument(
        "--port", type=int, default=UI_PORT, help=f"the UI's port (default {UI_PORT}, or a free one if taken)"
    )
    parser.add_argument(
        "--airflow-home",
        type=Path,
        default=REPO_ROOT / ".airflow",
        help="AIRFLOW_HOME (default .airflow in the repository; a SQLite metadata DB)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO_ROOT / ".localcloud" / "demo",
        help="where the local cloud keeps each instance's worker log (default .localcloud/demo)",
    )
    args = parser.parse_args(argv)
    stop_on_signals()
    try:
        return up(args) if args.command == "up" else run(args)
    except DeploymentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; Airflow and the local cloud are stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
