"""`ec2cluster status` on a known cluster: workers table, queue, progress, dead letters with errors."""

from __future__ import annotations

import argparse
import json
import re
import time

import boto3
import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.cluster import log_group_name
from airflow_ec2cluster.commands import status
from tests.plugin.conftest import REGION, enqueue_and_launch

TABLE = "ec2cluster-state-status"


@pytest.fixture
def known_cluster(aws, context, cluster_id, ami_id, instance_profile):
    cluster = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=10)
    now = int(time.time())
    table = boto3.resource("dynamodb", region_name=REGION).Table(TABLE)
    busy_id, idle_id = cluster["instance_ids"]
    base = {"pk": records.workers_pk(cluster_id), "state": "running", "started_at": now - 100}
    table.put_item(
        Item={
            **base,
            "sk": busy_id,
            "worker_id": busy_id,
            "heartbeat_at": now,
            "busy": True,
            "busy_since": now - 5,
            "tasks_done": 3,
            "tasks_failed": 1,
            "last_completion_at": now - 10,
        }
    )
    table.put_item(
        Item={
            **base,
            "sk": idle_id,
            "worker_id": idle_id,
            "heartbeat_at": now,
            "busy": False,
            "idle_since": now - 40,
            "tasks_done": 1,
            "tasks_failed": 0,
            "last_completion_at": now - 40,
        }
    )
    table.put_item(
        Item={
            **records.task_log_key(cluster_id, "t000000007"),
            "task_id": "t000000007",
            "status": "failed",
            "error": "ZeroDivisionError: division by zero\n  at line 3",
        }
    )
    sqs = boto3.client("sqs", region_name=REGION)
    taken = sqs.receive_message(QueueUrl=cluster["queue_url"], MaxNumberOfMessages=5)["Messages"]
    sqs.delete_message_batch(
        QueueUrl=cluster["queue_url"],
        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(taken[:4])],
    )
    sqs.send_message(QueueUrl=cluster["dlq_url"], MessageBody=json.dumps({"task_id": "t000000007"}))
    return {**cluster, "busy_id": busy_id, "idle_id": idle_id}


def test_status_output_on_a_known_cluster(known_cluster, capsys):
    parser = argparse.ArgumentParser()
    status.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["status", known_cluster["cluster_id"], "--state-table", TABLE, "--region", REGION]
    )
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    # The provider's own log line about credentials may precede the output (Airflow's structlog on stdout).
    lines = out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("cluster ")) :]
    assert lines[0] == f"cluster {known_cluster['cluster_id']}"
    # 3 + 1 done/failed by the busy worker, 1 by the idle one: 5 finished. The failed task's message is
    # queued again (retried): 10 enqueued + 1 queued again, with 6 messages still in the queue.
    assert "[#############.................]  45.5%  5/11 finished (10 enqueued + 1 queued again)" in lines[1]
    assert "ETA" in lines[1] and "ETA -" not in lines[1]
    assert lines[2].startswith("messages visible 5  in flight 1  delayed 0  dead-lettered 1")
    busy = next(line for line in lines if line.startswith(known_cluster["busy_id"]))
    idle = next(line for line in lines if line.startswith(known_cluster["idle_id"]))
    assert busy.split()[1:5] == ["running", "running", "3", "1"] and "busy " in busy
    # Idle since 40 s before the fixture's clock read, plus however long moto took since (slow under load).
    assert idle.split()[1:5] == ["running", "running", "1", "0"] and 40 <= int(idle.split()[-2][:-1]) < 120
    assert "t000000007  ZeroDivisionError: division by zero at line 3" in out
    assert f"ec2cluster redrive {known_cluster['cluster_id']}" in out
    # Where the workers' logs are (the launch made the group).
    cluster_id = known_cluster["cluster_id"]
    group = log_group_name(cluster_id)
    assert f"logs {group} (CloudWatch Logs; read them: ec2cluster logs {cluster_id})" in lines
    # The cost: the two t3.micro instances' time from their EC2 launch, at the table's on-demand price.
    cost = next(line for line in lines if line.startswith("cost ~$"))
    assert cost.endswith("(estimate)")
    (row,) = [line.split() for line in lines if line.startswith("t3.micro ")]
    assert row[2] == "on-demand" and row[3].isdigit() and row[4] == "0.0104"


def test_status_of_an_unknown_cluster_fails(aws, capsys):
    parser = argparse.ArgumentParser()
    status.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", "nope", "--state-table", TABLE, "--region", REGION])
    boto3.client("dynamodb", region_name=REGION).create_table(
        TableName=TABLE,
        **records.STATE_TABLE_SCHEMA,
    )
    assert args.handler(args) == 1
    assert "has no META item" in capsys.readouterr().err


# -- the truth before, during and after a job ------------------------------------------------------------


def run_status(capsys, cluster_id: str, *extra: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    status.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", cluster_id, "--state-table", TABLE, "--region", REGION, *extra])
    code = args.handler(args)
    # Not through the CLI's main, which quiets the provider's log lines: drop any before the report.
    out = capsys.readouterr().out
    report = re.search(rf"^cluster {re.escape(cluster_id)}$", out, re.M)  # its first line
    return code, out[report.start() :] if report else out


def take_and_delete(queue_url: str, count: int) -> None:
    """Play the workers: receive ``count`` messages and delete them (done)."""
    sqs = boto3.client("sqs", region_name=REGION)
    taken: list[dict] = []
    while len(taken) < count:
        wanted = min(10, count - len(taken))
        taken += sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=wanted).get("Messages", [])
    for start in range(0, count, 10):
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(taken[start:][:10])
            ],
        )


def log_tasks(cluster_id: str, task_ids: list[str], status_: str = "done", error: str | None = None) -> None:
    table = boto3.resource("dynamodb", region_name=REGION).Table(TABLE)
    with table.batch_writer() as batch:
        for task_id in task_ids:
            item = {**records.task_log_key(cluster_id, task_id), "task_id": task_id, "status": status_}
            batch.put_item(Item={**item, **({"error": error} if error else {})})


def put_worker(cluster_id: str, worker_id: str, **fields) -> None:
    now = int(time.time())
    item = {
        "pk": records.workers_pk(cluster_id),
        "sk": worker_id,
        "worker_id": worker_id,
        "state": "running",
        "started_at": now - 300,
        "heartbeat_at": now,
        "busy": False,
        "idle_since": now - 5,
        "tasks_done": 0,
        "tasks_failed": 0,
        **fields,
    }
    boto3.resource("dynamodb", region_name=REGION).Table(TABLE).put_item(Item=item)


TASK_IDS = [f"t{i:09d}" for i in range(10)]


@pytest.fixture
def finished_cluster(aws, context, cluster_id, ami_id, instance_profile):
    """10 tasks all done and logged; the workers exited (idle) with counters that lag (9 of 10)."""
    cluster = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=10)
    take_and_delete(cluster["queue_url"], 10)
    log_tasks(cluster_id, TASK_IDS)
    first, second = cluster["instance_ids"]
    now = int(time.time())
    put_worker(
        cluster_id, first, state="stopped", stop_reason="idle for 300s", tasks_done=5, heartbeat_at=now
    )
    put_worker(
        cluster_id, second, state="stopped", stop_reason="idle for 300s", tasks_done=4, heartbeat_at=now
    )
    boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=cluster["instance_ids"])
    return cluster


def test_a_finished_job_reads_100_percent_exactly_and_no_eta(finished_cluster, capsys):
    code, out = run_status(capsys, finished_cluster["cluster_id"])
    assert code == 0
    lines = out.splitlines()
    assert "100.0%  10/10 finished (done 10, failed 0: task log, exact)" in lines[1]
    assert lines[1].endswith("ETA -")
    assert "state job finished" in out
    stopped = [line for line in lines if line.startswith(tuple(finished_cluster["instance_ids"]))]
    assert len(stopped) == 2 and all(line.endswith("idle for 300s") for line in stopped)
    # Terminated instances still count, up to the time EC2 stamped on their termination.
    (row,) = [line.split() for line in lines if line.startswith("t3.micro ")]
    assert row[2] == "on-demand" and row[4] == "0.0104"


def test_status_after_a_teardown_that_deleted_the_queues(finished_cluster, context, capsys):
    from airflow_ec2cluster.operators import EC2ClusterTeardownOperator

    EC2ClusterTeardownOperator(
        task_id="teardown",
        cluster_id=finished_cluster["cluster_id"],
        state_table=TABLE,
        delete_queues=True,
        aws_conn_id=None,
        region_name=REGION,
    ).execute(context)
    code, out = run_status(capsys, finished_cluster["cluster_id"])
    assert code == 0 and "Traceback" not in out
    assert "queues deleted" in out and "state torn down" in out
    assert "100.0%  10/10 finished (done 10, failed 0: task log, exact)" in out
    assert "META enqueued 10 tasks in 10 messages; instances launched 2" in out
    assert sum(1 for line in out.splitlines() if line.endswith("idle for 300s")) == 2


def test_progress_after_a_redrive_never_passes_100_percent(
    aws, context, cluster_id, ami_id, instance_profile, capsys
):
    cluster = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=10)
    take_and_delete(cluster["queue_url"], 9)
    log_tasks(cluster_id, TASK_IDS[:9])
    # The last message failed 3 times, was dead-lettered and redriven (it is queued again); the workers'
    # counters hold every attempt, and a first redrive that re-ran done tasks: 12 done, 3 failed.
    first, second = cluster["instance_ids"]
    put_worker(cluster_id, first, tasks_done=7, tasks_failed=2)
    put_worker(cluster_id, second, tasks_done=5, tasks_failed=1)
    code, out = run_status(capsys, cluster_id)
    progress = out.splitlines()[1]
    finished, total = (int(n) for n in progress.split("%  ")[1].split(" ")[0].split("/"))
    assert code == 0 and finished == 15 and total == 16 and "queued again" in progress
    assert float(progress.split("]")[1].split("%")[0]) <= 100.0

    take_and_delete(cluster["queue_url"], 1)
    log_tasks(cluster_id, TASK_IDS[9:])
    code, out = run_status(capsys, cluster_id)
    assert "100.0%  10/10 finished (done 10, failed 0: task log, exact)" in out.splitlines()[1]


def test_thirty_dead_letters_are_listed_when_fifty_are_asked_for(
    aws, context, cluster_id, ami_id, instance_profile, capsys
):
    cluster = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=10)
    sqs = boto3.client("sqs", region_name=REGION)
    poison = [f"p{i:09d}" for i in range(30)]
    for start in range(0, 30, 10):
        sqs.send_message_batch(
            QueueUrl=cluster["dlq_url"],
            Entries=[
                {"Id": str(i), "MessageBody": json.dumps({"task_id": t})}
                for i, t in enumerate(poison[start : start + 10])
            ],
        )
    log_tasks(cluster_id, poison, "failed", error="ValueError: bad input")
    code, out = run_status(capsys, cluster_id, "--dead-letters", "50")
    assert code == 0
    assert "dead-lettered tasks (30 shown, from 30 of 30 dead-lettered messages):" in out
    listed = {line.split()[0] for line in out.splitlines() if line.endswith("ValueError: bad input")}
    assert listed == set(poison)


def test_the_eta_is_unknown_while_stopped_workers_hold_messages(
    aws, context, cluster_id, ami_id, instance_profile, capsys
):
    cluster = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=10)
    take_and_delete(cluster["queue_url"], 4)
    log_tasks(cluster_id, TASK_IDS[:4])
    sqs = boto3.client("sqs", region_name=REGION)
    # Three messages received by workers that were then killed: locked until their visibility lapses.
    held = sqs.receive_message(QueueUrl=cluster["queue_url"], MaxNumberOfMessages=3, VisibilityTimeout=300)
    assert len(held["Messages"]) == 3
    first, second = cluster["instance_ids"]
    put_worker(cluster_id, first, busy=True, busy_since=int(time.time()) - 5, tasks_done=2)
    put_worker(cluster_id, second, busy=True, busy_since=int(time.time()) - 5, tasks_done=2)
    boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=cluster["instance_ids"])
    code, out = run_status(capsys, cluster_id)
    assert code == 0
    assert "ETA unknown: 3 message(s) held by stopped workers until their visibility timeout" in out


def test_messages_held_by_killed_workers_are_a_lower_bound_while_others_live():
    from airflow_ec2cluster.drain.decisions import InstanceInfo, Policy, WorkerStatus

    now = 10_000.0

    def worker(worker_id: str, heartbeat_at: float, busy: bool = True) -> WorkerStatus:
        return WorkerStatus(worker_id, "running", started_at=now - 900, heartbeat_at=heartbeat_at, busy=busy)

    def snapshot(killed_heartbeat: float, in_flight: int) -> status.Snapshot:
        return status.Snapshot(
            counts=status.QueueCounts(visible=10, in_flight=in_flight, delayed=0, dead_lettered=0),
            instances=(InstanceInfo("i-live", "running", now - 900),),
            # i-killed's instance is gone; it was busy at its last heartbeat.
            workers=(worker("i-live", now - 1), worker("i-killed", killed_heartbeat)),
            now=now,
            policy=Policy(heartbeat_timeout=60),
        )

    assert status.held_by_stopped_workers(snapshot(now - 20, 5), 120) == (1, True)
    assert status.held_by_stopped_workers(snapshot(now - 20, 13), 120) == (3, True)
    # Killed longer ago than the visibility timeout: its messages are back in the queue.
    assert status.held_by_stopped_workers(snapshot(now - 500, 5), 120) == (0, True)
    text = status.eta_text(100, 50, 0, 1.0, held_by_stopped=1, held_at_least=True)
    assert text == "unknown: at least 1 message(s) held by stopped workers until their visibility timeout"
