"""Slots and receive sizing: one worker in this process against the local cloud's moto server.

- ``slot-throughput``: tasks per second of one worker with a CPU-bound Python handler in process isolation,
  at ``slots_per_instance`` 1 and at the machine's cores (the same tasks, a fresh queue each), timed from the
  task log: first task's start to last task's end. Beside it, in the same pairs, the machine's own ceiling:
  the same tasks run by bare processes (no worker, no SQS) at 1 and at the cores, since a shared machine's
  cores give two processes less than 2x (another tenant's load, a host's turbo), and that part is not the
  worker's.
- ``receive-sizing``: AWS calls per task for short tasks (what a receive of 10 messages of 10 tasks brings),
  and the effect of sizing receives on a mix of short and long tasks run by two workers: how long the job
  takes against the ideal (its work spread evenly over the slots) and calls per task, with the receive
  sized (the worker's rule), with the rule before slots (``max_messages // tasks in the last message``: 10
  messages on the first receive, then one message of 10 tasks a receive) and with every receive taking 10
  messages.
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
from ec2cluster_worker import loop
from ec2cluster_worker.config import WorkerConfig, instance_vcpus
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import run_worker

from . import cloud, handlers
from .counting import CallCounter
from .result import Result
from .workers import task_times

MIN_SPEEDUP = 1.8
MAX_CALLS_PER_TASK = 0.05
# CPU-bound tasks: steps of benchmarks.handlers:burn (about 0.13 s each here) and how many: enough that the
# last task's imbalance between slots (at most one task) is a few percent of the run.
BURN_STEPS = 1_500_000
BURN_TASKS = {"tiny": 4, "full": 48}
PAIRS = {"tiny": 1, "full": 5}
SHORT_TASKS = {"tiny": 600, "full": 2000}
# The mix: messages of 10 tasks, the first LONG_MESSAGES of long tasks (sent first, so the first receives
# meet them), the rest of 1 ms tasks; two workers of one slot each, a 10 s visibility timeout (2.5 s of
# work per receive and slot).
MIX = {
    "tiny": {"messages": 8, "long_messages": 2, "long_s": 0.05},
    "full": {"messages": 40, "long_messages": 4, "long_s": 0.25},
}
SHORT_S = 0.001
MIX_VISIBILITY = 10
TASKS_PER_MESSAGE = 10


def config(
    cluster_id: str, queue_url: str, table: str, handler: dict[str, Any], **fields: Any
) -> WorkerConfig:
    return WorkerConfig.from_dict(
        {**cloud.noop_worker_config(cluster_id, queue_url, table), "handler": handler, **fields}
    )


def run(worker_config: WorkerConfig, worker_id: str, counter: CallCounter | None = None) -> None:
    session = boto3.session.Session()
    if counter is not None:
        counter.attach_session(session)
    log = io.StringIO()
    code = run_worker(
        worker_config, environ={"EC2CLUSTER_WORKER_ID": worker_id}, session=session, log=EventLog(log)
    )
    if code != 0:
        raise RuntimeError(f"worker {worker_id} exited {code}: {log.getvalue()[-3000:]}")


def span(table: str, cluster_id: str, messages: int) -> float:
    """Seconds from the first task's start to the last one's end (task log)."""
    times = task_times(table, cluster_id, messages)
    return max(t.finished_at for t in times) - min(t.started_at for t in times)


# -- slot-throughput ---------------------------------------------------------------------------------------


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_slots(table: str, tasks: int, slots: int) -> dict[str, float]:
    """One worker at ``slots`` on a fresh queue of ``tasks`` CPU-bound tasks: tasks/s over the task log's
    span, and the cores its children got over that span (their CPU seconds, from getrusage once the worker
    has waited for them, over the span: what a loaded machine gave them)."""
    handler = {"type": "python", "target": "benchmarks.handlers:burn", "isolation": "process"}
    cluster_id = cloud.unique(f"slots{slots}")
    queue_url = cloud.create_queue(cluster_id)
    cloud.send_payloads(queue_url, [{"n": BURN_STEPS}] * tasks, 1)
    before = child_cpu_seconds()
    run(config(cluster_id, queue_url, table, handler, slots_per_instance=slots), f"s{slots}")
    seconds = span(table, cluster_id, tasks)
    return {"tps": tasks / seconds, "cores": (child_cpu_seconds() - before) / seconds}


def _burn(tasks: int) -> None:
    for _ in range(tasks):
        handlers.burn({"n": BURN_STEPS}, None)


def run_bare(tasks: int, processes: int) -> float:
    """Tasks/s of ``tasks`` burns split over ``processes`` bare processes (forked, no worker, no SQS)."""
    context = multiprocessing.get_context("fork")
    shares = [tasks // processes + (index < tasks % processes) for index in range(processes)]
    started = time.perf_counter()
    children = [context.Process(target=_burn, args=(share,)) for share in shares]
    for child in children:
        child.start()
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"a bare burn process exited {child.exitcode}")
    return tasks / (time.perf_counter() - started)


@functools.cache
def measure_slots(size: str) -> dict[str, Any]:
    """PAIRS pairs of runs (1 slot, then the cores; the order alternating from pair to pair, so neither
    setting always gets the quieter moment of a shared machine), each pair followed by the same tasks in
    bare processes at 1 and at the cores; the figures are medians of paired ratios."""
    tasks = BURN_TASKS[size]
    cores = instance_vcpus()
    pairs = []
    load = os.getloadavg()[0]
    with cloud.moto_server():
        table = cloud.create_state_table()
        for index in range(PAIRS[size]):
            order = (1, cores) if index % 2 == 0 else (cores, 1)
            pair = {slots: run_slots(table, tasks, slots) for slots in order}
            pair["bare"] = {processes: run_bare(tasks, processes) for processes in order}
            pairs.append(pair)
    return {"cores": cores, "tasks": tasks, "pairs": pairs, "load": (load, os.getloadavg()[0])}


def slot_throughput(size: str) -> Result:
    measured = measure_slots(size)
    cores, pairs = measured["cores"], measured["pairs"]
    one = statistics.median(pair[1]["tps"] for pair in pairs)
    result = Result("slot-throughput", size)
    result.add(
        f"tasks/s, 1 slot ({measured['tasks']} CPU-bound tasks, isolation 'process'; median of {len(pairs)})",
        round(one, 2),
    )
    result.add(
        "  cores the tasks got, 1 slot (child CPU s / s)",
        round(statistics.median(p[1]["cores"] for p in pairs), 2),
    )
    if cores > 1:
        many = statistics.median(pair[cores]["tps"] for pair in pairs)
        speedup = statistics.median(pair[cores]["tps"] / pair[1]["tps"] for pair in pairs)
        result.add(f"tasks/s, {cores} slots (the machine's cores)", round(many, 2), round(one, 2))
        result.add(
            f"  cores the tasks got, {cores} slots (child CPU s / s)",
            round(statistics.median(p[cores]["cores"] for p in pairs), 2),
        )
        result.add(
            f"  speed-up, {cores} slots / 1 slot (median of {len(pairs)} paired ratios)",
            round(speedup, 2),
            1.0,
            f">= {MIN_SPEEDUP}" if cores == 2 else "",
            speedup >= MIN_SPEEDUP if cores == 2 else None,
        )
        bare = statistics.median(pair["bare"][cores] / pair["bare"][1] for pair in pairs)
        result.add(
            f"  the machine's ceiling: bare processes, {cores} / 1 (no worker, no SQS; same pairs)",
            round(bare, 2),
        )
        result.details["paired ratios, in run order"] = ", ".join(
            f"{pair[cores]['tps'] / pair[1]['tps']:.2f}" for pair in pairs
        )
        result.details["bare processes' paired ratios"] = ", ".join(
            f"{pair['bare'][cores] / pair['bare'][1]:.2f}" for pair in pairs
        )
    result.details["machine"] = (
        f"{cores} vCPUs usable (os.sched_getaffinity), shared with the moto server and other jobs: load "
        f"average {measured['load'][0]:.1f} before, {measured['load'][1]:.1f} after"
    )
    return result


# -- receive-sizing ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def receive_rule(rule: Callable[..., int] | None) -> Iterator[None]:
    """The loop's receive-size rule replaced for a comparison (None: the worker's own)."""
    if rule is None:
        yield
        return
    original = loop.receive_size
    loop.receive_size = rule
    try:
        yield
    finally:
        loop.receive_size = original


def rule_before_slots(mean, free_slots, visibility, tasks_per_message, max_messages=10, **_) -> int:
    """The worker before slots: about ``max_messages`` tasks a receive (1 message of 10 tasks)."""
    return max(1, min(max_messages, max_messages // max(1, tasks_per_message or 1)))


def rule_always_ten(mean, free_slots, visibility, tasks_per_message, max_messages=10, **_) -> int:
    return max_messages


RULES = {
    "sized (the worker's rule)": None,
    "before slots (10 // tasks in the last message)": rule_before_slots,
    "always 10 messages": rule_always_ten,
}


def count_short(size: str, table: str) -> tuple[CallCounter, int]:
    tasks = SHORT_TASKS[size]
    cluster_id = cloud.unique("short")
    queue_url = cloud.create_queue(cluster_id)
    cloud.fill_queue(queue_url, tasks, TASKS_PER_MESSAGE)
    counter = CallCounter()
    run(config(cluster_id, queue_url, table, cloud.NOOP_HANDLER), "short", counter)
    done = cloud.tasks_done(cloud.task_log_items(table, cluster_id))
    if done != tasks:
        raise RuntimeError(f"{done} of {tasks} short tasks done")
    return counter, tasks


def run_mix(size: str, table: str, rule: Callable[..., int] | None) -> dict[str, float]:
    mix = MIX[size]
    cluster_id = cloud.unique("mix")
    queue_url = cloud.create_queue(cluster_id)
    long_tasks = mix["long_messages"] * TASKS_PER_MESSAGE
    short_tasks = (mix["messages"] - mix["long_messages"]) * TASKS_PER_MESSAGE
    payloads = [{"s": mix["long_s"]}] * long_tasks + [{"s": SHORT_S}] * short_tasks
    cloud.send_payloads(queue_url, payloads, TASKS_PER_MESSAGE)
    handler = {"type": "python", "target": "benchmarks.handlers:sleep_for"}
    worker_config = config(
        cluster_id, queue_url, table, handler, visibility_timeout_seconds=MIX_VISIBILITY, slots_per_instance=1
    )
    counters = [CallCounter(), CallCounter()]
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            run(worker_config, f"mix{index}", counters[index])
        except BaseException as error:  # reported below, in this thread
            errors.append(error)

    with receive_rule(rule):
        threads = [threading.Thread(target=one, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    work = long_tasks * mix["long_s"] + short_tasks * SHORT_S
    took = span(table, cluster_id, mix["messages"])
    calls = sum(counter.total for counter in counters)
    return {"seconds": took, "ideal": work / 2, "calls_per_task": calls / (long_tasks + short_tasks)}


@functools.cache
def measure_sizing(size: str) -> dict[str, Any]:
    with cloud.moto_server():
        table = cloud.create_state_table()
        short = count_short(size, table)
        mixes = {label: run_mix(size, table, rule) for label, rule in RULES.items()}
    return {"short": short, "mixes": mixes}


def receive_sizing(size: str) -> Result:
    measured = measure_sizing(size)
    counter, tasks = measured["short"]
    per_task = counter.total / tasks
    result = Result("receive-sizing", size)
    result.add(
        f"AWS calls per task ({tasks:,} no-op tasks, {TASKS_PER_MESSAGE} tasks/message, 1 worker)",
        round(per_task, 4),
        0.29,
        f"<= {MAX_CALLS_PER_TASK}",
        per_task <= MAX_CALLS_PER_TASK,
    )
    mix = MIX[size]
    result.details["short tasks, calls"] = counter.by_operation()
    result.details["mix"] = (
        f"{mix['messages']} messages of {TASKS_PER_MESSAGE} tasks, the first {mix['long_messages']} of "
        f"{mix['long_s']} s tasks, the rest {SHORT_S} s; 2 workers of 1 slot; visibility {MIX_VISIBILITY} s"
    )
    for label, figures in measured["mixes"].items():
        result.add(
            f"mix, {label}: job length / ideal",
            round(figures["seconds"] / figures["ideal"], 2),
            round(figures["ideal"], 2),
        )
        result.add(f"mix, {label}: AWS calls per task", round(figures["calls_per_task"], 4))
    return result
