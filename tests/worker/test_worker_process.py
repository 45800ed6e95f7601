"""The worker as a real subprocess (`python -m ec2cluster_worker`) against the moto server."""

from __future__ import annotations

import json
import signal
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from ec2cluster_worker import records

from ..localcloud.helpers import wait_for
from .cloud import (
    REGION,
    WorkerProcess,
    create_task_queue,
    queue_counts,
    receive_all,
    send_bodies,
    send_tasks,
    task_log,
    unique,
    worker_config,
    worker_env,
    worker_statuses,
)


def test_runs_every_task_then_stops_when_idle(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster)
    texts = {f"t{n:04d}": {"id": n, "text": ":) " * n} for n in range(25)}
    send_tasks(queue_url, texts)
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
        stop_when_queue_empty=False,  # idle_shutdown_seconds alone, as before the queue-empty stop
    )
    worker = WorkerProcess(config, tmp_path)

    assert worker.wait() == 0, worker.log_path.read_text()

    log = task_log(state_table, cluster)
    assert set(log) == set(texts)
    for task_id, item in log.items():
        assert item["status"] == records.TASK_DONE
        assert item["worker_id"] == "w-test"
        assert json.loads(item["result"]) == {"id": texts[task_id]["id"], "smileys": texts[task_id]["id"]}
        assert item["expires_at"] > item["finished_at"]
    status = worker_statuses(state_table, cluster)["w-test"]
    assert status["state"] == records.STATE_STOPPED
    assert status["stop_reason"] == "idle"
    assert status["tasks_done"] == 25 and status["tasks_failed"] == 0
    assert status["busy"] is False
    assert queue_counts(queue_url) == {"visible": 0, "in_flight": 0}


def test_failures_and_malformed_bodies_end_in_the_dead_letter_queue(cluster, state_table, tmp_path):
    queue_url, dlq_url = create_task_queue(cluster, max_receive_count=2)
    send_tasks(queue_url, {"good-1": {"x": 1}, "bad-1": {"fail": "one"}, "good-2": {"x": 2}})
    malformed_ids = send_bodies(
        queue_url, ["not json at all", json.dumps({"task_id": "has space", "payload": 1})]
    )
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:fail_if_asked"},
        idle_shutdown_seconds=300,
    )
    worker = WorkerProcess(config, tmp_path)
    # Stopped on observed progress, not by an idle timer racing the retry delays: the worker's own receives
    # moved the three failing messages (received twice each) to the dead-letter queue, the rest is done.
    wait_for(
        lambda: (
            queue_counts(dlq_url)["visible"] == 3
            and queue_counts(queue_url) == {"visible": 0, "in_flight": 0}
        ),
        60,
        "the failing messages in the dead-letter queue",
        interval=0.1,
    )
    worker.process.send_signal(signal.SIGTERM)

    assert worker.wait() == 0, worker.log_path.read_text()

    log = task_log(state_table, cluster)
    assert log["good-1"]["status"] == log["good-2"]["status"] == records.TASK_DONE
    failed = {"bad-1", *(f"malformed-{message_id}" for message_id in malformed_ids)}
    assert failed <= set(log)
    for task_id in failed:
        assert log[task_id]["status"] == records.TASK_FAILED
        assert log[task_id]["attempt"] == 2  # received twice, then redriven
    assert "ValueError: asked to fail: one" in log["bad-1"]["error"]
    assert "not JSON" in log[f"malformed-{malformed_ids[0]}"]["error"]
    dead = [message["Body"] for message in receive_all(dlq_url)]
    assert sorted(dead) == sorted(
        [
            json.dumps({"task_id": "bad-1", "payload": {"fail": "one"}}, separators=(",", ":")),
            "not json at all",
            json.dumps({"task_id": "has space", "payload": 1}),
        ]
    )
    assert queue_counts(queue_url) == {"visible": 0, "in_flight": 0}
    status = worker_statuses(state_table, cluster)["w-test"]
    assert status["tasks_done"] == 2 and status["tasks_failed"] == 6  # 3 failures, each received twice


def test_sigterm_mid_batch_loses_nothing(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster, visibility=60)
    tasks = {f"s{n:03d}": {"sleep": 0.15} for n in range(30)}
    send_tasks(queue_url, tasks)
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:sleepy"},
        idle_shutdown_seconds=30,
        visibility_timeout_seconds=60,
    )
    worker = WorkerProcess(config, tmp_path)
    worker.wait_for_event("task.done", count=3)

    worker.process.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=20) == 0, worker.log_path.read_text()
    done = {task_id for task_id, item in task_log(state_table, cluster).items() if item["status"] == "done"}
    assert 3 <= len(done) < len(tasks)
    # Messages not started were handed back at once (visibility 0), not left hidden for 60 s.
    assert queue_counts(queue_url) == {"visible": len(tasks) - len(done), "in_flight": 0}
    back_in_queue = {json.loads(message["Body"])["task_id"] for message in receive_all(queue_url)}
    assert back_in_queue == set(tasks) - done
    status = worker_statuses(state_table, cluster)["w-test"]
    assert status["state"] == records.STATE_STOPPED
    assert status["stop_reason"] == "signal:SIGTERM"
    assert status["tasks_done"] == len(done)


def test_hung_handler_times_out_and_the_worker_goes_on(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster, max_receive_count=1)
    send_tasks(queue_url, {"hang": {"hang": True}, "after-1": {}, "after-2": {}})
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:hang_if_asked"},
        task_timeout_seconds=1,
    )
    worker = WorkerProcess(config, tmp_path)

    assert worker.wait() == 0, worker.log_path.read_text()

    log = task_log(state_table, cluster)
    assert log["hang"]["status"] == records.TASK_FAILED
    assert "timed out after 1 s" in log["hang"]["error"]
    assert log["after-1"]["status"] == log["after-2"]["status"] == records.TASK_DONE


@pytest.mark.parametrize("per", ["task", "batch"])
def test_s3_output(cluster, state_table, tmp_path, per):
    queue_url, _ = create_task_queue(cluster)
    bucket = unique("results")
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=bucket)
    tasks = {f"t{n}": {"n": n} for n in range(12)}
    send_tasks(queue_url, tasks)
    config = worker_config(
        cluster, queue_url, state_table, output={"type": "s3", "bucket": bucket, "prefix": "out/", "per": per}
    )
    worker = WorkerProcess(config, tmp_path)

    assert worker.wait() == 0, worker.log_path.read_text()

    log = task_log(state_table, cluster)
    assert set(log) == set(tasks)
    lines = {}
    for key in {item["output"] for item in log.values()}:
        assert key.startswith(f"s3://{bucket}/out/{cluster}/")
        body = s3.get_object(Bucket=bucket, Key=key.split("/", 3)[3])["Body"].read().decode()
        for line in body.splitlines():
            record = json.loads(line)
            lines[record["task_id"]] = record["result"]
    assert {task_id: result["echo"] for task_id, result in lines.items()} == tasks
    if per == "task":
        assert log["t3"]["output"] == f"s3://{bucket}/out/{cluster}/t3.json"
    else:
        assert len({item["output"] for item in log.values()}) < len(tasks)
    assert all("result" not in item for item in log.values())


def test_custom_sink(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster)
    send_tasks(queue_url, {"a": 1, "b": 2})
    sink_path = tmp_path / "results.jsonl"
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        output={"type": "custom", "target": "sample_handlers:FileSink", "options": {"path": str(sink_path)}},
    )

    assert WorkerProcess(config, tmp_path).wait() == 0

    written = {json.loads(line)["task_id"] for line in sink_path.read_text().splitlines()}
    assert written == {"a", "b"}
    assert task_log(state_table, cluster)["a"]["output"] == f"file://{sink_path}"


def test_bad_handler_fails_fast_and_says_why(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster)
    config = worker_config(
        cluster, queue_url, state_table, handler={"type": "python", "target": "no_such_module_xyz:run"}
    )
    worker = WorkerProcess(config, tmp_path)

    assert worker.wait() == 3
    assert "handler.target" in worker.log_path.read_text()
    status = worker_statuses(state_table, cluster)["w-test"]
    assert status["state"] == records.STATE_STOPPED
    assert "no_such_module_xyz" in status["stop_reason"]


def test_bad_config_exits_2_naming_the_field(tmp_path):
    config = worker_config("c1", "http://127.0.0.1:1/q", "ec2cluster-state", max_messages=11)
    worker = WorkerProcess(config, tmp_path)

    assert worker.wait() == 2
    assert "max_messages" in worker.log_path.read_text()


class FakeMetadata(BaseHTTPRequestHandler):
    """IMDSv2 on loopback: a token, an instance id, and a spot notice once `spot` is set."""

    spot = threading.Event()
    token = "token-123"

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        assert self.path == "/latest/api/token"
        assert self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._answer(200, self.token)

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._answer(401, "")
        elif self.path == "/latest/meta-data/instance-id":
            self._answer(200, "i-0123456789abcdef0")
        elif self.path == "/latest/meta-data/spot/instance-action" and self.spot.is_set():
            self._answer(200, json.dumps({"action": "terminate", "time": "2030-01-01T00:00:00Z"}))
        else:
            self._answer(404, "")

    def _answer(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_instance_id_and_spot_interruption_from_metadata(cluster, state_table, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        queue_url, _ = create_task_queue(cluster)
        # An empty queue: the worker must stay until the notice, not stop "queue-empty".
        config = worker_config(
            cluster, queue_url, state_table, idle_shutdown_seconds=60, stop_when_queue_empty=False
        )
        env = worker_env(worker_id=None, EC2CLUSTER_IMDS_URL=f"http://127.0.0.1:{server.server_port}")
        worker = WorkerProcess(config, tmp_path, env=env)
        worker.wait_for_event("worker.running")
        FakeMetadata.spot.set()

        assert worker.wait(timeout=30) == 0, worker.log_path.read_text()
    finally:
        FakeMetadata.spot.clear()
        server.shutdown()
    status = worker_statuses(state_table, cluster)["i-0123456789abcdef0"]
    assert status["stop_reason"] == "spot-interruption"
    assert isinstance(status["heartbeat_at"], Decimal)


def test_a_deleted_queue_stops_the_worker_cleanly(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster)
    config = worker_config(
        cluster, queue_url, state_table, idle_shutdown_seconds=60, stop_when_queue_empty=False
    )
    worker = WorkerProcess(config, tmp_path)
    worker.wait_for_event("worker.running")

    boto3.client("sqs", region_name=REGION).delete_queue(QueueUrl=queue_url)

    assert worker.wait(timeout=30) == 0, worker.log_path.read_text()
    assert worker_statuses(state_table, cluster)["w-test"]["stop_reason"] == "queue-deleted"
