"""The worker's log lines in CloudWatch Logs: batches within PutLogEvents' limits, a shipper that never
blocks or breaks the work, and a failed task's traceback readable from the cluster's log group."""

from __future__ import annotations

import io
import json
import time

import boto3
import pytest
from ec2cluster_worker.cloudwatch import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_BATCH_SPAN_MS,
    MAX_EVENT_BYTES,
    LogShipper,
    batches,
    event_size,
    fit_message,
)
from ec2cluster_worker.config import ConfigError, WorkerConfig
from ec2cluster_worker.logs import EventLog

from .cloud import REGION, WorkerProcess, create_task_queue, send_tasks, unique, worker_config


def test_batches_keep_time_order_and_each_call_within_its_limits():
    events = [(1_000 + n % 7, f"line {n}") for n in range(25_000)]
    found = batches(events)
    assert [len(batch) for batch in found] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 5_000]
    stamps = [event["timestamp"] for batch in found for event in batch]
    assert stamps == sorted(stamps)

    big = [(n, "x" * 200_000) for n in range(12)]
    sized = batches(big)
    assert all(sum(event_size(e["message"]) for e in batch) <= MAX_BATCH_BYTES for batch in sized)
    assert sum(len(batch) for batch in sized) == 12 and len(sized) == 3

    day = [(0, "a"), (MAX_BATCH_SPAN_MS - 1, "b"), (MAX_BATCH_SPAN_MS, "c")]
    assert [[e["message"] for e in batch] for batch in batches(day)] == [["a", "b"], ["c"]]
    assert batches([]) == []


def test_an_event_over_256_kib_is_cut_and_says_so():
    message = "é" * 200_000  # two bytes each
    fitted = fit_message(message)
    assert event_size(fitted) <= MAX_EVENT_BYTES
    assert fitted.startswith("éé") and fitted.endswith("bytes]")
    assert fit_message("short") == "short"


def test_log_group_is_a_checked_configuration_field():
    handler = {"type": "python", "target": "m:f"}
    base = {"cluster_id": "c", "region": REGION, "queue_url": "https://q/1/x", "handler": handler}
    assert WorkerConfig.from_dict(base).log_group is None
    assert WorkerConfig.from_dict({**base, "log_group": "/ec2cluster/c"}).log_group == "/ec2cluster/c"
    assert WorkerConfig.from_dict({**base, "log_group": None}).log_group is None
    with pytest.raises(ConfigError, match="log_group: .* not a CloudWatch Logs group name"):
        WorkerConfig.from_dict({**base, "log_group": "bad name!"})


def stream_messages(group: str, stream: str) -> list[str]:
    logs = boto3.client("logs", region_name=REGION)
    pages = logs.get_paginator("filter_log_events").paginate(logGroupName=group, logStreamNames=[stream])
    return [event["message"] for page in pages for event in page["events"]]


def test_the_shipper_sends_every_line_to_its_stream_and_at_close(aws_endpoint):
    group = f"/ec2cluster/{unique('ship')}"
    logs = boto3.client("logs", region_name=REGION)
    logs.create_log_group(logGroupName=group)
    errors: list[tuple[str, str]] = []
    shipper = LogShipper(logs, group, "i-0001", on_error=lambda *e: errors.append(e), flush_seconds=3600)
    shipper.start()
    log = EventLog(io.StringIO()).with_sink(shipper.add).bind(worker_id="i-0001")
    for n in range(30):
        log.info("task.done", task_id=f"t{n}")
    shipper.close()  # the flush at stop sends everything (the periodic one never came)

    lines = [json.loads(message) for message in stream_messages(group, "i-0001")]
    assert [line["task_id"] for line in lines] == [f"t{n}" for n in range(30)]
    assert all(line["worker_id"] == "i-0001" for line in lines)
    assert errors == [] and shipper.calls == 1

    again = LogShipper(logs, group, "i-0001", on_error=lambda *e: errors.append(e), flush_seconds=3600)
    again.add(time.time(), "after a reboot")  # the same worker again: its stream exists already
    again.flush()
    assert errors == [] and stream_messages(group, "i-0001")[-1] == "after a reboot"


def test_memory_is_bounded_and_a_missing_group_never_breaks_the_work(aws_endpoint):
    logs = boto3.client("logs", region_name=REGION)
    errors: list[tuple[str, str]] = []
    group = f"/ec2cluster/{unique('gone')}"
    shipper = LogShipper(
        logs,
        group,
        "i-0002",
        on_error=lambda *e: errors.append(e),
        flush_seconds=3600,
        max_pending_bytes=2_000,
    )
    for n in range(100):
        shipper.add(time.time(), f"line {n:03d} " + "x" * 40)
    shipper.flush()  # no group: the stream cannot be made; said, and the lines kept within the bound
    assert errors and errors[0][0] == "logs.stream_failed" and "ResourceNotFound" in errors[0][1]

    logs.create_log_group(logGroupName=group)
    shipper.flush()
    messages = stream_messages(group, "i-0002")
    kept = [m for m in messages if m.startswith("line ")]
    assert 0 < len(kept) < 100 and kept[-1].startswith("line 099")  # the newest kept, the oldest dropped
    dropped = [json.loads(m)["lines"] for m in messages if "logs.dropped" in m]
    assert dropped and sum(dropped) == 100 - len(kept)


def test_a_failed_tasks_traceback_is_in_the_clusters_log_group(cluster, state_table, tmp_path):
    group = f"/ec2cluster/{cluster}"
    boto3.client("logs", region_name=REGION).create_log_group(logGroupName=group)
    queue_url, _ = create_task_queue(cluster)
    send_tasks(queue_url, {"t-ok": {"n": 1}, "t-bad": {"fail": "seven"}})
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:fail_if_asked"},
        log_group=group,
    )
    worker = WorkerProcess(config, tmp_path)
    assert worker.wait() == 0, worker.log_path.read_text()

    lines = [json.loads(message) for message in stream_messages(group, "w-test")]
    failed = [line for line in lines if line["event"] == "task.failed" and line["task_id"] == "t-bad"]
    assert failed, lines
    assert failed[0]["error"] == "ValueError: asked to fail: seven"
    assert "Traceback (most recent call last)" in failed[0]["detail"]
    assert 'sample_handlers.py", line' in failed[0]["detail"]
    # Every line of the console is there, the last ones (sent by the flush at stop) included.
    assert [line["event"] for line in lines] == [line["event"] for line in worker.events()]
    assert lines[-1]["event"] == "worker.stopped"
