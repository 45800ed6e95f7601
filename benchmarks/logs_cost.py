"""The workers' CloudWatch Logs: PutLogEvents calls, bytes ingested per task, and their price per 1M tasks.

One worker runs no-op tasks in this process, shipping its lines to a log group on the local cloud's server
(``ec2cluster_worker.cloudwatch``). The calls are counted with botocore hooks and the bytes read back from the
group (each event's message plus the 26 bytes PutLogEvents counts), so the figures are what CloudWatch would
bill. A failed task's line is measured apart: its error and a three-frame traceback, as the worker logs it.
"""

from __future__ import annotations

import io
import json
import time

import boto3
from ec2cluster_worker.cloudwatch import EVENT_OVERHEAD_BYTES, FLUSH_SECONDS, event_size
from ec2cluster_worker.config import WorkerConfig
from ec2cluster_worker.handlers import error_detail, error_summary
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import run_worker

from airflow_ec2cluster.cluster import log_group_name
from airflow_ec2cluster.defaults import DEFAULT_TASKS_PER_MESSAGE

from . import cloud
from .counting import CallCounter
from .prices import CLOUDWATCH_LOGS_INGESTION_USD_PER_GB, PRICES_AS_OF
from .result import Result

TASKS = {"tiny": 100, "full": 2000}
GB = 1e9


def shipped_run(tasks: int) -> tuple[CallCounter, list[dict], float]:
    """A worker's run of ``tasks`` no-op tasks with CloudWatch Logs on: its calls, the group's events, and
    how long it ran."""
    cluster_id = cloud.unique("logs")
    table = cloud.create_state_table()
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks, DEFAULT_TASKS_PER_MESSAGE)
    group = log_group_name(cluster_id)
    cloud.client("logs").create_log_group(logGroupName=group)
    session = boto3.session.Session()
    counter = CallCounter().attach_session(session)
    document = {**cloud.noop_worker_config(cluster_id, queue_url, table), "log_group": group}
    console = io.StringIO()
    started = time.monotonic()
    code = run_worker(
        WorkerConfig.from_dict(document),
        environ={"EC2CLUSTER_WORKER_ID": "bench"},
        session=session,
        log=EventLog(console),
    )
    seconds = time.monotonic() - started
    if code != 0 or cloud.tasks_done(cloud.task_log_items(table, cluster_id)) != tasks:
        raise RuntimeError(f"worker exit {code}: {console.getvalue()[-2000:]}")
    pages = cloud.client("logs").get_paginator("filter_log_events").paginate(logGroupName=group)
    events = [event for page in pages for event in page["events"]]
    if len(events) != len(console.getvalue().splitlines()):
        raise RuntimeError(
            f"{len(events)} events in CloudWatch, {len(console.getvalue().splitlines())} lines"
        )
    return counter, events, seconds


def failed_task_line_bytes() -> int:
    """What one failed task's line weighs: its error and the traceback of a handler three frames deep."""

    def parse(payload: dict) -> int:
        return int(payload["n"])

    def handler(payload: dict) -> int:
        return parse(payload)

    try:
        handler({"n": "seven"})
    except ValueError as error:
        line = json.dumps(
            {
                "ts": round(time.time(), 3),
                "level": "warning",
                "event": "task.failed",
                "worker_id": "i-0123456789abcdef0",
                "cluster_id": "nightly-etl-0123456789",
                "error": error_summary(error),
                "task_id": "t000000042",
                "attempt": 1,
                "duration_s": 0.012,
                "detail": error_detail(error),
            },
            separators=(",", ":"),
        )
        return event_size(line)
    raise AssertionError("the handler did not fail")


def logs_cost(size: str) -> Result:
    tasks = TASKS[size]
    with cloud.moto_server():
        counter, events, seconds = shipped_run(tasks)
    calls = counter.count("PutLogEvents")
    ingested = sum(len(e["message"].encode("utf-8")) + EVENT_OVERHEAD_BYTES for e in events)
    per_task = ingested / tasks
    usd_per_million = per_task * 1e6 / GB * CLOUDWATCH_LOGS_INGESTION_USD_PER_GB
    failed = failed_task_line_bytes()
    most_calls = (
        int(seconds // FLUSH_SECONDS) + 2
    )  # one a flush interval, one at start-up's first, one at stop
    result = Result("logs-cost", size)
    result.add(
        f"PutLogEvents calls ({tasks:,} no-op tasks, 1 worker, {seconds:.1f} s)",
        calls,
        None,
        f"<= {most_calls} (one per {FLUSH_SECONDS:g} s, and at stop)",
        calls <= most_calls,
    )
    result.add("PutLogEvents calls per task", round(calls / tasks, 4))
    result.add("CloudWatch Logs events per task", round(len(events) / tasks, 3))
    result.add("bytes ingested per task (events + 26 B each)", round(per_task, 1))
    result.add("ingestion USD per 1M tasks", round(usd_per_million, 4))
    result.add("bytes of one failed task's line (3-frame traceback)", failed)
    result.add(
        "ingestion USD per 1M failed tasks, on top",
        round(failed * 1e6 / GB * CLOUDWATCH_LOGS_INGESTION_USD_PER_GB, 4),
    )
    result.details = {
        "prices": f"{PRICES_AS_OF}; CloudWatch Logs ingestion ${CLOUDWATCH_LOGS_INGESTION_USD_PER_GB}/GB, "
        "no per-request charge for PutLogEvents",
        "calls": counter.by_operation(),
        "events by kind": _kinds(events),
    }
    return result


def _kinds(events: list[dict]) -> dict[str, int]:
    found: dict[str, int] = {}
    for event in events:
        kind = json.loads(event["message"]).get("event", "?")
        found[kind] = found.get(kind, 0) + 1
    return dict(sorted(found.items()))
