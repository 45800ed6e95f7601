"""Issue #15, worker side: fast scale-in. An idle worker stops ("queue-empty") as soon as nothing is
visible and it holds nothing, so a job's tail does not bill for idle instances (``stop_when_queue_empty``).

Every wait is on an observed state (status items, task-log items, queue counts, the calls a worker made,
the process's exit), never on a sleep.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import boto3
from ec2cluster_worker import records
from ec2cluster_worker.config import WorkerConfig
from ec2cluster_worker.lifecycle import may_stop_queue_empty
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import run_worker

from .callproxy import CallProxy
from .cloud import (
    REGION,
    WorkerProcess,
    create_task_queue,
    queue_counts,
    send_tasks,
    task_log,
    worker_config,
    worker_env,
    worker_statuses,
)


def test_may_stop_queue_empty():
    assert may_stop_queue_empty(empty_receive=True, held=0, now=10.0, returns_at=0.0)
    assert not may_stop_queue_empty(empty_receive=False, held=0, now=10.0, returns_at=0.0)
    assert not may_stop_queue_empty(empty_receive=True, held=1, now=10.0, returns_at=0.0)  # holds a message
    assert not may_stop_queue_empty(empty_receive=True, held=0, now=10.0, returns_at=11.0)  # a retry is due
    assert may_stop_queue_empty(empty_receive=True, held=0, now=11.0, returns_at=11.0)


def test_stops_queue_empty_after_its_first_empty_receive(cluster, state_table, tmp_path, aws_endpoint):
    queue_url, _ = create_task_queue(cluster)
    tasks = {f"q{n}": {"n": n} for n in range(15)}
    send_tasks(queue_url, tasks)
    # An idle limit the test would time out on: only the queue-empty stop can end this worker in time.
    config = worker_config(cluster, queue_url, state_table, idle_shutdown_seconds=300)
    with CallProxy(aws_endpoint) as proxy:
        worker = WorkerProcess(config, tmp_path, env=worker_env(AWS_ENDPOINT_URL=proxy.url))
        exit_code = worker.wait(timeout=60)
        receives = proxy.count("started", "ReceiveMessage")
        reads = proxy.count("started", "GetQueueAttributes")

    assert exit_code == 0, worker.log_path.read_text()
    assert {
        task_id for task_id, item in task_log(state_table, cluster).items() if item["status"] == "done"
    } == (set(tasks))
    status = worker_statuses(state_table, cluster)["w-test"]
    assert (status["state"], status["stop_reason"], status["tasks_done"]) == (
        records.STATE_STOPPED,
        "queue-empty",
        15,
    )
    # Off EC2 (no metadata): where it ran is unknown, and left out.
    assert not {"instance_type", "availability_zone", "lifecycle"} & set(status)
    # One message first (the size of a message unknown yet), then 10 and the last 4, then one empty receive
    # and one queue read: the stop cost one call.
    assert (receives, reads) == (4, 1)
    assert queue_counts(queue_url) == {"visible": 0, "in_flight": 0}


def test_a_failed_task_due_back_keeps_the_worker(cluster, state_table, tmp_path):
    """The worker let a failed task's message go with a retry delay: it is not held, nothing is visible and
    short polls find nothing, yet the worker waits for it rather than leave it to a replacement."""
    queue_url, _ = create_task_queue(cluster, max_receive_count=3)
    send_tasks(queue_url, {"flaky": {"fail_once": True}})
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:fail_first_attempt"},
        idle_shutdown_seconds=300,
        wait_time_seconds=0,  # empty receives during the 1 s retry delay, for certain
    )
    worker = WorkerProcess(config, tmp_path)
    try:
        exit_code = worker.wait(timeout=60)
    finally:
        worker.kill()

    assert exit_code == 0, worker.log_path.read_text()
    item = task_log(state_table, cluster)["flaky"]
    assert (item["status"], item["attempt"]) == (records.TASK_DONE, 2), worker.log_path.read_text()
    status = worker_statuses(state_table, cluster)["w-test"]
    assert (status["stop_reason"], status["tasks_done"], status["tasks_failed"]) == ("queue-empty", 1, 1)
    assert [e["event"] for e in worker.events()].count("queue.empty") == 1


class FakeHttp:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: dict[str, str] = {}


def run_in_process(
    config: WorkerConfig, answer: Callable[[str], tuple[Any, dict[str, Any]] | None]
) -> list[dict[str, Any]]:
    """The worker in this process, ``answer(operation)`` standing in for AWS's answer when not None; its
    log events."""
    session = boto3.session.Session()

    def intercept(event_name: str, **kwargs: Any) -> tuple[Any, dict[str, Any]] | None:
        return answer(event_name.rsplit(".", 1)[-1])

    session.events.register("before-call.sqs.*", intercept)
    stream = io.StringIO()
    exit_code = run_worker(
        config, environ={"EC2CLUSTER_WORKER_ID": "in-process"}, session=session, log=EventLog(stream=stream)
    )
    assert exit_code == 0, stream.getvalue()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_visible_messages_keep_the_worker_after_an_empty_receive(cluster, state_table):
    """A receive that found nothing while messages were visible (a short poll's sample, or a send that came
    just after the poll): the queue's count says so, and the worker goes on."""
    queue_url, _ = create_task_queue(cluster)
    tasks = {f"v{n}": {"n": n} for n in range(4)}
    send_tasks(queue_url, tasks)
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            state_table,
            handler={"type": "python", "target": "tests.worker.sample_handlers:noop"},
            idle_shutdown_seconds=300,
        )
    )
    faked: list[str] = []

    def first_receive_empty(operation: str) -> tuple[Any, dict[str, Any]] | None:
        if operation == "ReceiveMessage" and not faked:
            faked.append(operation)
            return FakeHttp(200), {}
        return None

    events = run_in_process(config, first_receive_empty)

    assert faked == ["ReceiveMessage"]
    assert set(task_log(state_table, cluster)) == set(tasks)
    assert [e["waiting"] for e in events if e["event"] == "queue.not_empty"] == [len(tasks)]
    assert [e["reason"] for e in events if e["event"] == "worker.stopping"] == ["queue-empty"]


def test_delayed_messages_keep_the_worker(cluster, state_table):
    """A message sent with a delay just before the worker's receive (an enqueue still going on, as far as
    this worker can tell): the receive finds nothing, the queue's count says one is coming; the worker
    stays and runs it."""
    queue_url, _ = create_task_queue(cluster)
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            state_table,
            handler={"type": "python", "target": "tests.worker.sample_handlers:noop"},
            idle_shutdown_seconds=300,
            wait_time_seconds=1,
        )
    )
    sqs = boto3.client("sqs", region_name=REGION)
    sent: list[str] = []

    def send_delayed_before_the_first_receive(operation: str) -> None:
        if operation == "ReceiveMessage" and not sent:
            body = json.dumps({"task_id": "later", "payload": 1})
            sent.append(sqs.send_message(QueueUrl=queue_url, MessageBody=body, DelaySeconds=2)["MessageId"])
        return None

    events = run_in_process(config, send_delayed_before_the_first_receive)

    assert task_log(state_table, cluster)["later"]["status"] == records.TASK_DONE
    waiting = [e["waiting"] for e in events if e["event"] == "queue.not_empty"]
    assert waiting and set(waiting) == {1}
    assert [e["reason"] for e in events if e["event"] == "worker.stopping"] == ["queue-empty"]


def test_without_the_queue_read_the_worker_falls_back_to_the_idle_limit(cluster, state_table):
    """A worker role without sqs:GetQueueAttributes: said once, with the fix; the idle limit stops it."""
    queue_url, _ = create_task_queue(cluster)
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            state_table,
            handler={"type": "python", "target": "tests.worker.sample_handlers:noop"},
            idle_shutdown_seconds=1.5,
            wait_time_seconds=0,
        )
    )
    denied: list[str] = []

    def deny_queue_reads(operation: str) -> tuple[Any, dict[str, Any]] | None:
        if operation == "GetQueueAttributes":
            denied.append(operation)
            return FakeHttp(403), {"Error": {"Code": "AccessDenied", "Message": "not authorized"}}
        return None

    events = run_in_process(config, deny_queue_reads)

    assert denied == ["GetQueueAttributes"]  # asked once, not at every empty receive
    disabled = [e for e in events if e["event"] == "queue.empty_check_disabled"]
    assert len(disabled) == 1 and "sqs:GetQueueAttributes" in disabled[0]["fix"]
    assert [e["reason"] for e in events if e["event"] == "worker.stopping"] == ["idle"]


def test_stop_when_queue_empty_false_keeps_the_idle_rule(cluster, state_table):
    queue_url, _ = create_task_queue(cluster)
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            state_table,
            handler={"type": "python", "target": "tests.worker.sample_handlers:noop"},
            idle_shutdown_seconds=1.5,
            stop_when_queue_empty=False,
        )
    )
    reads: list[str] = []

    def count_queue_reads(operation: str) -> None:
        if operation == "GetQueueAttributes":
            reads.append(operation)
        return None

    events = run_in_process(config, count_queue_reads)

    assert reads == []
    assert [e["reason"] for e in events if e["event"] == "worker.stopping"] == ["idle"]
