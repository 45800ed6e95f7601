"""After a fix, a redriven group runs only its tasks that had not finished: every task has one result,
and the tasks already done are not executed again (a redriven message is new to SQS: receive count 1)."""

from __future__ import annotations

from collections import Counter

import boto3
from ec2cluster_worker import records
from ec2cluster_worker.messages import group_body

from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

from ..localcloud.helpers import wait_for
from .cloud import (
    REGION,
    WorkerProcess,
    create_task_queue,
    queue_counts,
    send_bodies,
    task_log,
    worker_config,
)


def test_a_redriven_group_runs_only_its_unfinished_task_after_the_fix(cluster, state_table, tmp_path):
    fail_file, runs_file = tmp_path / "fail.txt", tmp_path / "runs.txt"
    fail_file.write_text("h2\n")
    runs_file.write_text("")
    groups = [
        [(f"{g}{i}", {"n": i, "fail_file": str(fail_file), "runs_file": str(runs_file)}) for i in range(5)]
        for g in "ghk"
    ]
    # One receive only: the failing group goes to the dead-letter queue on its next receive.
    queue_url, dlq_url = create_task_queue(cluster, max_receive_count=1)
    send_bodies(queue_url, [group_body(group) for group in groups])
    handler = {"type": "python", "target": "fixable_handlers:fail_listed"}
    first = WorkerProcess(
        worker_config(cluster, queue_url, state_table, handler=handler, idle_shutdown_seconds=300), tmp_path
    )
    try:
        wait_for(
            lambda: queue_counts(dlq_url)["visible"] == 1, 60, "the failing group in the DLQ", interval=0.1
        )
    finally:
        first.kill()
    log = task_log(state_table, cluster)
    assert log["h0"]["status"] == records.TASK_FAILED and log["h0"]["tasks_done"] == 4
    entries = {entry["task_id"]: entry for entry in log["h0"]["tasks"]}
    # What a person reads, the traceback beside it.
    assert entries["h2"]["error"] == "ValueError: bad payload 2"
    detail = entries["h2"]["error_detail"]
    assert detail.startswith("Traceback (most recent call last):") and detail.endswith(
        "ValueError: bad payload 2\n"
    )
    assert "fixable_handlers.py" in detail and "ec2cluster_worker" not in detail  # the handler's frames only

    fail_file.write_text("")  # the fix
    # Moved to a queue of their own: the killed worker's last long poll may still be open on the server and
    # would take the first message sent to its queue (hidden until its visibility timeout ends).
    again_url = boto3.client("sqs", region_name=REGION).create_queue(QueueName=f"{cluster}-again")["QueueUrl"]
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    outcome = hook.redrive_dead_letters(dlq_url, again_url, table=state_table, cluster_id=cluster)
    # The group is named by its failing task, not by its first task id.
    assert (outcome.messages, outcome.task_ids, outcome.marked) == (1, ["h2"], 1)

    second = WorkerProcess(worker_config(cluster, again_url, state_table, handler=handler), tmp_path)
    assert second.wait(timeout=90) == 0, second.log_path.read_text()
    runs = Counter(runs_file.read_text().split())
    # h2 ran twice (failed, then fixed); every other task once: the redrive re-ran nothing already done.
    assert runs == {**{task_id: 1 for group in groups for task_id, _ in group}, "h2": 2}
    assert [e["task_id"] for e in second.events() if e.get("event") == "task.done"] == ["h2"]
    log = task_log(state_table, cluster)
    assert set(log) == {"g0", "h0", "k0"}  # one item per message, each with every task done once
    for key in log:
        assert log[key]["status"] == records.TASK_DONE and log[key]["tasks_done"] == 5
        assert sorted(entry["task_id"] for entry in log[key]["tasks"]) == [f"{key[0]}{i}" for i in range(5)]
    assert queue_counts(again_url) == {"visible": 0, "in_flight": 0} and queue_counts(dlq_url)["visible"] == 0
