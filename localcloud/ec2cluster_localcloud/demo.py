"""The main job, end to end: the example DAG on the local cloud, with real worker processes.

``python -m ec2cluster_localcloud.demo`` (what ``make demo`` runs) starts the local cloud, runs
``airflow dags test ec2_cluster_example`` against it, prints a summary read back from the cloud, and exits
non-zero when the DAG run failed or any instance is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID
from ec2cluster_localcloud import LocalCloud

DAG_ID = "ec2_cluster_example"
# The demo runs from a checkout of the repository: localcloud/ec2cluster_localcloud/demo.py.
REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_TABLE = "ec2cluster-state"
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")


def base_airflow_env(airflow_home: Path) -> dict[str, str]:
    """Airflow's settings for the demo: its own AIRFLOW_HOME (SQLite) and this repository's dags/."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
    }


def airflow_env(cloud: LocalCloud, airflow_home: Path) -> dict[str, str]:
    """The demo's Airflow settings plus the local cloud's endpoint, credentials and connection."""
    return {**base_airflow_env(airflow_home), **cloud.env(), **cloud.airflow_conn_env()}


def migrate_airflow_db(airflow_home: Path) -> bool:
    return airflow(["db", "migrate"], base_airflow_env(airflow_home), quiet=True) == 0


def airflow(args: list[str], env: dict[str, str], *, quiet: bool = False) -> int:
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, env=env, stdout=output, stderr=output, check=False).returncode


def cluster_instances(cloud: LocalCloud, states: tuple[str, ...] | None = None) -> list[dict]:
    """Every instance a cluster launched on this (fresh) local cloud, optionally only in ``states``."""
    filters = [{"Name": "tag-key", "Values": [TAG_CLUSTER_ID]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    paginator = cloud.client("ec2").get_paginator("describe_instances")
    return [
        instance
        for page in paginator.paginate(Filters=filters)
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]


def read_summary(cloud: LocalCloud) -> dict | None:
    """What the run left in the cloud, read back through the hook as a downstream consumer would.

    The hook reads the ``aws_default`` connection: the caller's environment must point it at ``cloud``.
    """
    instances = cluster_instances(cloud)
    tags = [tag for instance in instances for tag in instance.get("Tags", [])]
    cluster_ids = {tag["Value"] for tag in tags if tag["Key"] == TAG_CLUSTER_ID}
    if len(cluster_ids) != 1:
        return None
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    hook = EC2ClusterHook(aws_conn_id="aws_default")
    cluster_id = cluster_ids.pop()
    meta = hook.get_meta(STATE_TABLE, cluster_id) or {}
    results = [r for r in hook.iter_results(STATE_TABLE, cluster_id) if r["status"] == "done"]
    smileys = [r["result"] for r in results]
    return {
        "cluster_id": cluster_id,
        "enqueued": int(meta.get("enqueued", 0)),
        "tasks_done": len(results),
        "workers_used": len(instances),
        "total_smileys": sum(s["smileys"] for s in smileys),
        "top_tweets": sorted(smileys, key=lambda s: (-s["smileys"], s["id"]))[:3],
    }


def run_conf(cloud: LocalCloud, workers: int, tweets: int = 3000) -> dict:
    return {
        "tweets": tweets,
        "workers": workers,
        "ami_id": cloud.ami_id,
        "instance_profile": cloud.instance_profile_name,
        # Short timings so the demo finishes in seconds; real clusters keep the DAG's defaults.
        "idle_timeout": 60,
        "worker_idle_shutdown": 30,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="EC2 workers to launch (default 3)")
    parser.add_argument(
        "--airflow-home",
        type=Path,
        default=REPO_ROOT / ".airflow",
        help="AIRFLOW_HOME for the run (default .airflow in the repository; a SQLite metadata DB)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO_ROOT / ".localcloud" / "demo",
        help="where the local cloud keeps each instance's worker log (default .localcloud/demo)",
    )
    args = parser.parse_args(argv)

    args.airflow_home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not migrate_airflow_db(args.airflow_home):
        print("airflow db migrate failed; run it with AIRFLOW_HOME set to see why", file=sys.stderr)
        return 1
    shutil.rmtree(args.work_dir, ignore_errors=True)
    with LocalCloud(work_dir=args.work_dir) as cloud:
        print(f"local cloud at {cloud.endpoint_url} (region {cloud.region})", flush=True)
        env = airflow_env(cloud, args.airflow_home)
        conf = json.dumps(run_conf(cloud, args.workers))
        dag_status = airflow(["dags", "test", DAG_ID, "--conf", conf], env)
        left_running = cluster_instances(cloud, LIVE_STATES)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "AIRFLOW_CONN_"))})
        summary = read_summary(cloud)

    print()
    print("=" * 72)
    print(f"ec2_cluster_example on the local cloud: {time.monotonic() - started:.1f} s")
    if summary:
        for line in format_summary(summary):
            print(line)
    print(f"instances left running: {len(left_running)}; worker logs in {args.work_dir}/logs")
    print(f"DAG run: {'success' if dag_status == 0 else 'FAILED'}")
    complete = summary is not None and summary["tasks_done"] == summary["enqueued"] > 0
    failed = dag_status != 0 or bool(left_running) or not complete
    print("result: FAILED" if failed else "result: OK")
    return 1 if failed else 0


def format_summary(summary: dict) -> list[str]:
    lines = [
        f"cluster {summary['cluster_id']}: {summary['workers_used']} workers",
        f"tasks: {summary['tasks_done']} done of {summary['enqueued']} enqueued",
        f"smileys counted: {summary['total_smileys']}; top tweets:",
    ]
    for rank, top in enumerate(summary.get("top_tweets", []), start=1):
        lines.append(f"  #{rank} {top['id']}: {top['smileys']} smileys")
    return lines


if __name__ == "__main__":
    sys.exit(main())
