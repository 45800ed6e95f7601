"""Calls and request charges per task: one worker in this process, against the naive loop.

The worker runs twice on fresh queues of the same size: with the enqueue operator's default packing
(``DEFAULT_TASKS_PER_MESSAGE`` tasks per SQS message and per task-log item) and with one task per message.
The naive loop (receive 1, put the result, put a log item, delete 1) runs once. Calls are counted with
botocore event hooks, so the figures do not vary from run to run.
"""

from __future__ import annotations

import functools
import io

import boto3
from ec2cluster_worker.config import WorkerConfig
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import run_worker

from airflow_ec2cluster.defaults import DEFAULT_TASKS_PER_MESSAGE

from . import cloud, references
from .counting import CallCounter
from .prices import PRICES_AS_OF, request_charges_usd
from .result import Result

MAX_CALLS_PER_TASK = 0.4
MAX_COST_RATIO = 1 / 3
# The naive loop makes exactly 4 calls per task (plus one empty receive): 500 tasks measure that as well as
# 2,000 and keep the benchmark inside two minutes on a shared 2-core machine. Figures are per task.
NAIVE_TASKS = 500
WORKER_TASKS = {"tiny": 100, "full": 2000}


def count_worker(tasks: int, table: str, tasks_per_message: int) -> CallCounter:
    cluster_id = cloud.unique("calls")
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks, tasks_per_message)
    session = boto3.session.Session()
    counter = CallCounter().attach_session(session)
    config = WorkerConfig.from_dict(cloud.noop_worker_config(cluster_id, queue_url, table))
    log = io.StringIO()
    code = run_worker(config, environ={"EC2CLUSTER_WORKER_ID": "bench"}, session=session, log=EventLog(log))
    done = cloud.tasks_done(cloud.task_log_items(table, cluster_id))
    if code != 0 or done != tasks or not cloud.queue_empty(queue_url):
        raise RuntimeError(f"worker exit {code}, {done}/{tasks} done: {log.getvalue()[-2000:]}")
    return counter


def count_naive(tasks: int, table: str) -> CallCounter:
    cluster_id = cloud.unique("naive")
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks)
    session = boto3.session.Session()
    counter = CallCounter().attach_session(session)
    sqs, dynamodb = references.clients(session)
    done = references.naive_loop(sqs, dynamodb, queue_url, table, cluster_id, "naive")
    if done != tasks:
        raise RuntimeError(f"the naive loop completed {done} of {tasks} tasks")
    return counter


@functools.cache
def measure(tasks: int) -> dict[str, tuple[CallCounter, int]]:
    """Counters and task counts: the worker packed (the default), one task per message, the naive loop."""
    naive_tasks = min(tasks, NAIVE_TASKS)
    with cloud.moto_server():
        table = cloud.create_state_table()
        return {
            "packed": (count_worker(tasks, table, DEFAULT_TASKS_PER_MESSAGE), tasks),
            "single": (count_worker(tasks, table, 1), tasks),
            "naive": (count_naive(naive_tasks, table), naive_tasks),
        }


def per_task(measured: tuple[CallCounter, int]) -> float:
    counter, tasks = measured
    return counter.total / tasks


def worker_calls(size: str) -> Result:
    tasks = WORKER_TASKS[size]
    runs = measure(tasks)
    packed, single, naive = per_task(runs["packed"]), per_task(runs["single"]), per_task(runs["naive"])
    result = Result("worker-calls", size)
    result.add(
        f"AWS calls per task ({tasks:,} no-op tasks, 1 worker, {DEFAULT_TASKS_PER_MESSAGE} tasks/message)",
        round(packed, 4),
        round(naive, 4),
        f"<= {MAX_CALLS_PER_TASK}",
        packed <= MAX_CALLS_PER_TASK,
    )
    result.add("AWS calls per task, 1 task/message", round(single, 4), round(naive, 4))
    result.add(
        f"calls, total (worker {tasks:,} tasks each, naive {runs['naive'][1]:,})",
        f"{runs['packed'][0].total} / {runs['single'][0].total}",
        runs["naive"][0].total,
    )
    result.details = {f"worker calls ({name})": runs[name][0].by_operation() for name in runs}
    return result


def charges_per_million(measured: tuple[CallCounter, int]) -> dict[str, float]:
    counter, tasks = measured
    scale = 1e6 / tasks
    charges = request_charges_usd(counter.sqs_billed_requests, counter.write_units)
    return {
        "sqs_requests": counter.sqs_billed_requests * scale,
        "write_units": counter.write_units * scale,
        "items_written": counter.items_written * scale,
        **{key: value * scale for key, value in charges.items()},
    }


def request_cost(size: str) -> Result:
    tasks = WORKER_TASKS[size]
    runs = measure(tasks)
    ours, single, naive = (charges_per_million(runs[name]) for name in ("packed", "single", "naive"))
    ratio = ours["total_usd"] / naive["total_usd"]
    result = Result("request-cost", size)
    result.add(
        f"USD per 1M tasks ({DEFAULT_TASKS_PER_MESSAGE} tasks/message, the default)",
        round(ours["total_usd"], 4),
        round(naive["total_usd"], 4),
    )
    result.add("cost ratio worker / naive", round(ratio, 4), 1.0, "<= 0.3333", ratio <= MAX_COST_RATIO)
    for label, key in (
        ("SQS billed requests", "sqs_requests"),
        ("SQS USD", "sqs_usd"),
        ("DynamoDB items written", "items_written"),
        ("DynamoDB write units", "write_units"),
        ("DynamoDB USD", "dynamodb_usd"),
    ):
        digits = 4 if key.endswith("usd") else 0
        result.add(f"  {label} per 1M tasks", round(ours[key], digits), round(naive[key], digits))
    result.add(
        "  ratio with 1 task/message (tasks_per_message=1)",
        round(single["total_usd"] / naive["total_usd"], 4),
        1.0,
    )
    result.details = {
        "prices": PRICES_AS_OF,
        "tasks measured": f"worker {tasks:,} per setting, naive loop {runs['naive'][1]:,}",
        "USD per 1M tasks, 1 task/message": {k: round(v, 4) for k, v in single.items()},
        **{f"calls ({name})": runs[name][0].by_operation() for name in runs},
    }
    return result
