"""AWS calls per completed task, and tasks/s, for no-op tasks against the moto server.

The worker runs in this process (same code path as the CLI: ``run_worker``) with a botocore event hook on its
session counting every API call. EC2CLUSTER_BENCH_TASKS sets the number of tasks (default 100; 500 for
the figures in the report).
"""

from __future__ import annotations

import collections
import io
import json
import os
import time

import boto3
from ec2cluster_worker.config import WorkerConfig
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import run_worker

from .cloud import REGION, create_state_table, create_task_queue, queue_counts, send_tasks, task_log, unique

TASKS = int(os.environ.get("EC2CLUSTER_BENCH_TASKS", "100"))
MAX_CALLS_PER_TASK = 0.4


def test_calls_per_task_and_throughput(aws_endpoint, capsys):
    cluster = unique("bench")
    table = create_state_table()
    queue_url, _ = create_task_queue(cluster)
    send_tasks(queue_url, {f"t{n:06d}": {"n": n} for n in range(TASKS)})
    config = WorkerConfig.from_dict(
        {
            "cluster_id": cluster,
            "region": REGION,
            "queue_url": queue_url,
            "state_table": table,
            "handler": {"type": "python", "target": "tests.worker.sample_handlers:noop"},
            "heartbeat_seconds": 5,
            "idle_shutdown_seconds": 1,
            "wait_time_seconds": 1,
        }
    )
    session = boto3.session.Session()
    calls: collections.Counter[str] = collections.Counter()
    first_receive_at: list[float] = []

    def count(event_name: str, **kwargs: object) -> None:
        operation = event_name.split(".", 2)[2]
        calls[operation] += 1
        if operation.endswith("ReceiveMessage") and not first_receive_at:
            first_receive_at.append(time.monotonic())

    session.events.register("before-call.*.*", count)
    log_stream = io.StringIO()

    exit_code = run_worker(
        config, environ={"EC2CLUSTER_WORKER_ID": "bench"}, session=session, log=EventLog(stream=log_stream)
    )

    ended_at = time.monotonic()
    assert exit_code == 0, log_stream.getvalue()[-2000:]
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    last_done_at = max(event["ts"] for event in events if event["event"] == "task.done")
    stopped_at = next(event["ts"] for event in events if event["event"] == "worker.stopped")
    busy_seconds = (ended_at - first_receive_at[0]) - (stopped_at - last_done_at)
    done = sum(item["status"] == "done" for item in task_log(table, cluster).values())
    assert done == TASKS
    assert queue_counts(queue_url) == {"visible": 0, "in_flight": 0}
    total = sum(calls.values())
    per_task = total / TASKS
    with capsys.disabled():
        print(
            f"\n[worker benchmark] {TASKS} no-op tasks: {total} AWS calls = {per_task:.3f} per task "
            f"({dict(sorted(calls.items()))}); {TASKS / busy_seconds:.0f} tasks/s "
            f"({busy_seconds:.2f} s from first receive to last task, moto server in the test process)"
        )
    assert per_task <= MAX_CALLS_PER_TASK
