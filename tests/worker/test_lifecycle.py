"""Identity, stop decisions, status items, retry delays and visibility extension."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import boto3
import pytest
from ec2cluster_worker import records
from ec2cluster_worker.config import WorkerConfig
from ec2cluster_worker.identity import DEFAULT_IMDS_URL, imds_base_url, metadata_settings, resolve_worker_id
from ec2cluster_worker.lifecycle import StopRequest, due_stop_reason, install_signal_handlers
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.loop import retry_delay_seconds
from ec2cluster_worker.messages import Delivery, delivery_of
from ec2cluster_worker.runtime import run_worker
from ec2cluster_worker.status import WorkerStatus, status_item
from ec2cluster_worker.visibility import HeldMessage, VisibilityKeeper, extension_plan
from moto import mock_aws

from .cloud import create_state_table, create_task_queue, send_tasks, task_log, unique, worker_config


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"EC2CLUSTER_WORKER_ID": "w1"}, None),  # local runs: never contact metadata
        ({"EC2CLUSTER_WORKER_ID": "w1", "EC2CLUSTER_IMDS_URL": "http://127.0.0.1:9/"}, "http://127.0.0.1:9"),
        ({}, DEFAULT_IMDS_URL),
        ({"AWS_EC2_METADATA_DISABLED": "true"}, None),
    ],
)
def test_when_instance_metadata_may_be_contacted(environ, expected):
    assert imds_base_url(environ) == expected


def test_a_metadata_request_without_answer_is_made_again():
    """IMDS that misses its first answer (a busy host): with AWS_METADATA_SERVICE_NUM_ATTEMPTS, the id is
    still the instance's, not the host name's (which the controller would take for another worker)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[str] = []
    released = threading.Event()

    class Metadata(BaseHTTPRequestHandler):
        def do_PUT(self):
            calls.append("PUT")
            if len(calls) == 1:
                released.wait(30)  # the fault: no answer to the first attempt (until the test ends)
                return
            self._send(b"token")

        def do_GET(self):
            calls.append("GET")
            self._send(b"i-0123456789abcdef0")

        def _send(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        one_try = {"EC2CLUSTER_IMDS_URL": url, "AWS_METADATA_SERVICE_TIMEOUT": "1"}
        assert resolve_worker_id(one_try)[1] == "hostname"  # botocore's default: one attempt
        calls.clear()
        three = {**one_try, "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "3"}
        assert resolve_worker_id(three) == ("i-0123456789abcdef0", "imds")
        assert calls == ["PUT", "PUT", "GET"]
    finally:
        released.set()
        server.shutdown()
    assert metadata_settings({}) == (2.0, 1)
    assert metadata_settings(
        {"AWS_METADATA_SERVICE_TIMEOUT": "x", "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "0"}
    ) == (2.0, 1)


def test_worker_id_from_env_and_fallback():
    assert resolve_worker_id({"EC2CLUSTER_WORKER_ID": " w-7 "}) == ("w-7", "env")
    worker_id, source = resolve_worker_id({"AWS_EC2_METADATA_DISABLED": "true"})
    assert source == "hostname" and worker_id.endswith(f"-{os.getpid()}")
    # Metadata unreachable (a closed loopback port): falls back quickly.
    worker_id, source = resolve_worker_id({"EC2CLUSTER_IMDS_URL": "http://127.0.0.1:9"})
    assert source == "hostname"


def test_due_stop_reason():
    common = dict(started_at=0.0, idle_shutdown_seconds=10, max_lifetime_seconds=0, polled_empty=True)
    assert due_stop_reason(now=9.9, last_activity_at=0.0, **common) is None
    assert due_stop_reason(now=10.0, last_activity_at=0.0, **common) == "idle"
    assert due_stop_reason(now=100.0, last_activity_at=95.0, **common) is None
    limited = dict(common, max_lifetime_seconds=50)
    assert due_stop_reason(now=50.0, last_activity_at=49.0, **limited) == "max-lifetime"
    # A start-up slower than the idle limit: not idle until a receive has found the queue empty.
    not_polled = dict(common, polled_empty=False)
    assert due_stop_reason(now=30.0, last_activity_at=0.0, **not_polled) is None
    assert due_stop_reason(now=60.0, last_activity_at=0.0, **dict(not_polled, max_lifetime_seconds=50)) == (
        "max-lifetime"
    )


def test_signals_request_a_stop_once():
    stop = StopRequest()
    before = signal.getsignal(signal.SIGINT)  # not always Python's default: `cmd &` starts with it ignored
    restore = install_signal_handlers(stop)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
    assert stop.reason == "signal:SIGTERM"
    assert signal.getsignal(signal.SIGINT) is before


def test_status_item_fields():
    status = WorkerStatus(started_at=100.0)
    status.set_state(records.STATE_RUNNING)
    status.set_slots(2)
    first = status.task_started("t-9", 105.0)
    busy = status_item(status.snapshot(), cluster_id="c-1", worker_id="w-1", now=106.0, retention_seconds=10)
    assert busy["pk"] == "C#c-1#W" and busy["sk"] == "w-1"
    assert busy["busy"] is True and busy["busy_task_id"] == "t-9" and "idle_since" not in busy
    assert (busy["busy_slots"], busy["slots"]) == (1, 2)
    assert "last_completion_at" not in busy and busy["expires_at"] == 116
    # A second slot: both count; the task running longest is the one named (a hung-task check's).
    second = status.task_started("t-10", 106.0)
    both = status_item(status.snapshot(), cluster_id="c-1", worker_id="w-1", now=106.5, retention_seconds=10)
    assert (both["busy_slots"], both["busy_task_id"], both["busy_since"]) == (2, "t-9", 105)
    status.task_finished(first, 106.8)
    one = status_item(status.snapshot(), cluster_id="c-1", worker_id="w-1", now=107.0, retention_seconds=10)
    assert (one["busy"], one["busy_slots"], one["busy_task_id"]) == (True, 1, "t-10")
    assert "idle_since" not in one  # a slot still works
    status.task_finished(second, 107.0)
    status.count(3, 1, 107.0)
    status.set_state(records.STATE_STOPPED, stop_reason="idle")
    status.set_state(records.STATE_STOPPED, stop_reason="later reason")  # the first reason is kept
    idle = status_item(status.snapshot(), cluster_id="c-1", worker_id="w-1", now=108.0, retention_seconds=10)
    assert idle["busy"] is False and "busy_task_id" not in idle and idle["idle_since"] == 107
    assert (idle["tasks_done"], idle["tasks_failed"], idle["last_completion_at"]) == (3, 1, 107)
    assert (idle["state"], idle["stop_reason"]) == ("stopped", "idle")


def test_retry_delays_grow_and_are_capped():
    assert [retry_delay_seconds(attempt, 120) for attempt in (1, 2, 3, 4, 8, 50)] == [1, 2, 4, 8, 60, 60]
    assert retry_delay_seconds(9, 30) == 30


def held(visible_at: float, received_at: float = 0.0) -> HeldMessage:
    return HeldMessage(Delivery("m", "rh", 1), received_at, visible_at)


def test_extension_plan():
    assert extension_plan([held(visible_at=100)], now=10, visibility=120, threshold=60) == []
    [(_, timeout)] = extension_plan([held(visible_at=100)], now=50, visibility=120, threshold=60)
    assert timeout == 120
    # Never past 12 h (minus a margin) from the receive.
    [(_, timeout)] = extension_plan([held(visible_at=43100)], now=43080, visibility=120, threshold=60)
    assert timeout == 43200 - 60 - 43080
    assert extension_plan([held(visible_at=43150)], now=43140, visibility=120, threshold=60) == []


def test_keeper_extends_only_what_is_due_and_never_what_it_forgot(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="keeper")["QueueUrl"]
        for n in range(12):
            sqs.send_message(QueueUrl=url, MessageBody=str(n))
        received = []
        while len(received) < 12:
            received += sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=20, AttributeNames=["All"]
            )["Messages"]
        deliveries = [delivery_of(message) for message in received]
        now = [1000.0]
        keeper = VisibilityKeeper(sqs, url, 20, EventLog(), clock=lambda: now[0])
        keeper.hold(deliveries, 1000.0)
        keeper.forget(deliveries[:2])
        assert keeper.extend_due() == 0  # 20 s left: nothing due
        now[0] = 1011.0
        assert keeper.extend_due() == 10  # two batch calls, the forgotten two left alone
        assert keeper.extend_due() == 0
        assert keeper.set_visibility(deliveries[2:], 0) == []
        assert keeper.held_count() == 0
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
        assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "10"


def test_a_start_up_slower_than_the_idle_limit_still_takes_the_work(aws_endpoint):
    """CI once saw a worker stop "idle" before its first receive: start-up on a busy host took > 1 s.

    Its status writes are held back here until it has made a receive, by more than the idle limit, so the
    idle time has passed before the worker ever looks at the queue.
    """
    cluster = unique("slowstart")
    table = create_state_table()
    queue_url, _ = create_task_queue(cluster)
    send_tasks(queue_url, {f"t{n}": {"n": n} for n in range(5)})
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            table,
            handler={"type": "python", "target": "tests.worker.sample_handlers:noop"},
            stop_when_queue_empty=False,  # the idle rule is what this test is about
        )
    )
    idle_limit = config.idle_shutdown_seconds
    session = boto3.session.Session()
    received: list[str] = []

    def slow_start(event_name: str, **kwargs: object) -> None:
        if event_name.endswith("ReceiveMessage"):
            received.append(event_name)
        elif event_name.endswith("PutItem") and not received:
            time.sleep(idle_limit * 1.5)  # makes the condition certain; nothing waits on it

    session.events.register("before-call.*.*", slow_start)
    stream = io.StringIO()
    assert (
        run_worker(
            config, environ={"EC2CLUSTER_WORKER_ID": "slow"}, session=session, log=EventLog(stream=stream)
        )
        == 0
    )
    stops = [json.loads(line) for line in stream.getvalue().splitlines() if '"worker.stopping"' in line]
    assert [stop["reason"] for stop in stops] == ["idle"]
    assert sorted(item["status"] for item in task_log(table, cluster).values()) == ["done"] * 5
