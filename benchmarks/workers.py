"""Worker benchmarks: calls and request charges per task (in-process), throughput and memory (processes)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import boto3
from ec2cluster_worker.config import WorkerConfig
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import run_worker

from . import cloud, references
from .counting import CallCounter
from .prices import DYNAMODB_WRU_BYTES, PRICES_AS_OF, request_charges_usd
from .result import Result

REPO_ROOT = Path(__file__).resolve().parents[1]
NOOP_HANDLER = {"type": "python", "target": "benchmarks.handlers:noop"}
MAX_CALLS_PER_TASK = 0.4
MAX_COST_RATIO = 1 / 3
MAX_OVERHEAD = 1.15
MAX_WORKER_RSS_MB = 80
# The naive loop makes exactly 4 calls per task (plus one empty receive): 500 tasks measure that as well as
# 2,000 and keep the pair inside two minutes on a shared 2-core machine. Figures are per task.
NAIVE_TASKS = 500
WORKER_TASKS = {"tiny": 100, "full": 2000}


def worker_config(cluster_id: str, queue_url: str, table: str) -> dict[str, Any]:
    # Defaults everywhere except how soon an idle worker exits (so the run ends) and the long poll.
    return {
        "cluster_id": cluster_id,
        "region": cloud.REGION,
        "queue_url": queue_url,
        "state_table": table,
        "handler": NOOP_HANDLER,
        "idle_shutdown_seconds": 1,
        "wait_time_seconds": 1,
    }


# -- calls and charges per task (one worker, in this process) ---------------------------------------------


def count_worker(tasks: int, table: str) -> CallCounter:
    cluster_id = cloud.unique("calls")
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks)
    session = boto3.session.Session()
    counter = CallCounter().attach_session(session)
    config = WorkerConfig.from_dict(worker_config(cluster_id, queue_url, table))
    log = io.StringIO()
    code = run_worker(config, environ={"EC2CLUSTER_WORKER_ID": "bench"}, session=session, log=EventLog(log))
    done = sum(1 for item in cloud.task_log_items(table, cluster_id) if item["status"]["S"] == "done")
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
def measure_both(tasks: int) -> tuple[CallCounter, CallCounter, int]:
    """(worker's counter, naive loop's counter, tasks the naive loop ran)."""
    naive_tasks = min(tasks, NAIVE_TASKS)
    with cloud.moto_server():
        table = cloud.create_state_table()
        return count_worker(tasks, table), count_naive(naive_tasks, table), naive_tasks


def worker_calls(size: str) -> Result:
    tasks = WORKER_TASKS[size]
    worker, naive, naive_tasks = measure_both(tasks)
    result = Result("worker-calls", size)
    per_task, naive_per_task = worker.total / tasks, naive.total / naive_tasks
    result.add(
        f"AWS calls per task ({tasks:,} no-op tasks, 1 worker)",
        round(per_task, 4),
        round(naive_per_task, 4),
        f"<= {MAX_CALLS_PER_TASK}",
        per_task <= MAX_CALLS_PER_TASK,
    )
    result.add(f"calls, total (worker {tasks:,} tasks, naive {naive_tasks:,})", worker.total, naive.total)
    result.details = {"worker calls": worker.by_operation(), "naive loop calls": naive.by_operation()}
    return result


def charges_per_million(counter: CallCounter, tasks: int) -> dict[str, float]:
    scale = 1e6 / tasks
    return {
        "sqs_requests": counter.sqs_billed_requests * scale,
        "write_units": counter.write_units * scale,
        "items_written": counter.items_written * scale,
        **{
            k: v * scale
            for k, v in request_charges_usd(counter.sqs_billed_requests, counter.write_units).items()
        },
    }


def request_cost(size: str) -> Result:
    tasks = WORKER_TASKS[size]
    worker, naive, naive_tasks = measure_both(tasks)
    ours, theirs = charges_per_million(worker, tasks), charges_per_million(naive, naive_tasks)
    ratio = ours["total_usd"] / theirs["total_usd"]
    result = Result("request-cost", size)
    result.add("USD per 1M tasks, total", round(ours["total_usd"], 4), round(theirs["total_usd"], 4))
    result.add("cost ratio worker / naive", round(ratio, 4), 1.0, "<= 0.3333", ratio <= MAX_COST_RATIO)
    result.add(
        "  SQS billed requests per 1M tasks", round(ours["sqs_requests"]), round(theirs["sqs_requests"])
    )
    result.add("  SQS USD per 1M tasks", round(ours["sqs_usd"], 4), round(theirs["sqs_usd"], 4))
    result.add(
        "  DynamoDB items written per 1M tasks", round(ours["items_written"]), round(theirs["items_written"])
    )
    result.add(
        "  DynamoDB write units per 1M tasks", round(ours["write_units"]), round(theirs["write_units"])
    )
    result.add(
        "  DynamoDB USD per 1M tasks", round(ours["dynamodb_usd"], 4), round(theirs["dynamodb_usd"], 4)
    )
    packed = packed_projection(worker, tasks, PACKED_TASKS_PER_MESSAGE)
    packed_ratio = packed["total_usd"] / theirs["total_usd"]
    result.add(
        f"  projected ratio, {PACKED_TASKS_PER_MESSAGE} tasks per message and per task-log item "
        "(from the counted calls; not built)",
        round(packed_ratio, 4),
        1.0,
        "<= 0.3333",
        None,
    )
    # What the ratio would be if the worker wrote nothing to DynamoDB: the floor SQS batching alone reaches.
    result.details = {
        "projection, k tasks per message": packed,
        "prices": PRICES_AS_OF,
        "tasks measured": f"worker {tasks:,}, naive loop {naive_tasks:,}",
        "worker calls": worker.by_operation(),
        "naive calls": naive.by_operation(),
        "worker ratio with its DynamoDB writes only (SQS at zero)": round(
            ours["dynamodb_usd"] / theirs["total_usd"], 4
        ),
    }
    return result


PACKED_TASKS_PER_MESSAGE = 10


def packed_projection(worker: CallCounter, tasks: int, k: int) -> dict[str, float]:
    """USD per 1M tasks if each SQS message carried ``k`` tasks and each task-log item recorded one message.

    From the counted run: the worker's SQS requests (receive, delete) are per message, so they divide by
    ``k``; its task-log items (BatchWriteItem) divide by ``k`` while each grows to ``k`` entries, so its
    write units are ceil(k x the measured mean item size / 1 KB) per item (keys counted k times: an upper
    bound); the status items (PutItem) stay as they are.
    """
    log_items, _, log_bytes = worker.writes_by_operation.get("BatchWriteItem", [0, 0, 0])
    _, status_units, _ = worker.writes_by_operation.get("PutItem", [0, 0, 0])
    mean_item_bytes = log_bytes / max(log_items, 1)
    units_per_packed_item = math.ceil(k * mean_item_bytes / DYNAMODB_WRU_BYTES)
    write_units = math.ceil(log_items / k) * units_per_packed_item + status_units
    sqs_requests = worker.sqs_billed_requests / k
    scale = 1e6 / tasks
    return {
        "k": k,
        "mean_task_log_item_bytes": round(mean_item_bytes, 1),
        "write_units_per_packed_item": units_per_packed_item,
        **{
            key: round(value * scale, 4)
            for key, value in request_charges_usd(sqs_requests, write_units).items()
        },
    }


# Worker processes side by side; at the smoke test's size one is enough to exercise the code (each process
# costs a Python start-up on a 2-core machine).
THROUGHPUT_WORKERS = {"tiny": (1,), "full": (1, 4)}


# -- throughput and memory (worker processes against a bare loop in processes) ----------------------------


def tasks_per_second(table: str, cluster_id: str, tasks: int) -> float:
    items = cloud.task_log_items(table, cluster_id)
    if len(items) != tasks:
        raise RuntimeError(f"{len(items)} of {tasks} tasks logged for {cluster_id}")
    first = min(float(item["started_at"]["N"]) for item in items)
    last = max(float(item["finished_at"]["N"]) for item in items)
    return tasks / max(last - first, 1e-6)


def run_workers(table: str, tasks: int, count: int, work_dir: Path) -> tuple[float, list[int]]:
    cluster_id = cloud.unique("tput")
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks)
    config_path = work_dir / f"{cluster_id}.json"
    config_path.write_text(json.dumps(worker_config(cluster_id, queue_url, table)))
    command = [sys.executable, "-m", "ec2cluster_worker", "--config", str(config_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    peaks = run_each([(command, {**env, "EC2CLUSTER_WORKER_ID": f"w{i}"}) for i in range(count)])
    return tasks_per_second(table, cluster_id, tasks), peaks


def run_each(processes: list[tuple[list[str], dict[str, str]]]) -> list[int]:
    """Run the processes side by side; each one's peak RSS (KB). Their stderr goes to files: the worker logs
    a line per task, which would fill a pipe nobody reads until the end and block the worker."""
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in processes]
        started = [
            subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
            for (command, env), log in zip(processes, logs, strict=True)
        ]
        peaks = []
        for process, log in zip(started, logs, strict=True):
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                log.seek(0)
                error = log.read()[-4000:].decode(errors="replace")
                raise RuntimeError(f"process exited {process.returncode}: {error}")
            peaks.append(usage.ru_maxrss)
    return peaks


def run_bare(table: str, tasks: int, count: int) -> float:
    cluster_id = cloud.unique("bare")
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "benchmarks.references", "--queue-url", queue_url, "--table", table]
    run_each([([*command, "--cluster", cluster_id, "--worker-id", f"b{i}"], env) for i in range(count)])
    return tasks_per_second(table, cluster_id, tasks)


@functools.cache
def measure_throughput(size: str) -> list[dict[str, Any]]:
    tasks = {"tiny": 60, "full": 2000}[size]
    rows = []
    with cloud.moto_server(), tempfile.TemporaryDirectory(prefix="bench-") as work_dir:
        table = cloud.create_state_table()
        for count in THROUGHPUT_WORKERS[size]:
            worker_tps, peaks = run_workers(table, tasks, count, Path(work_dir))
            bare_tps = run_bare(table, tasks, count)
            rows.append(
                {
                    "workers": count,
                    "tasks": tasks,
                    "worker_tps": worker_tps,
                    "bare_tps": bare_tps,
                    "rss_kb": peaks,
                }
            )
    return rows


def worker_throughput(size: str) -> Result:
    result = Result("worker-throughput", size)
    for row in measure_throughput(size):
        overhead = row["bare_tps"] / row["worker_tps"]
        result.add(
            f"tasks/s, {row['workers']} worker(s), {row['tasks']:,} tasks",
            round(row["worker_tps"], 1),
            round(row["bare_tps"], 1),
        )
        result.add(
            f"  overhead (bare / worker), {row['workers']} worker(s)",
            round(overhead, 3),
            1.0,
            f"<= {MAX_OVERHEAD}",
            overhead <= MAX_OVERHEAD,
        )
        result.add(
            f"  peak RSS per worker, MB, {row['workers']} worker(s)", round(max(row["rss_kb"]) / 1024, 1)
        )
    return result


def worker_memory(size: str) -> Result:
    result = Result("worker-memory", size)
    for row in measure_throughput(size):
        peak_mb = max(row["rss_kb"]) / 1024
        result.add(
            f"peak RSS of a worker process, MB ({row['workers']} worker(s), {row['tasks']:,} tasks)",
            round(peak_mb, 1),
            None,
            f"<= {MAX_WORKER_RSS_MB}",
            peak_mb <= MAX_WORKER_RSS_MB,
        )
    return result
