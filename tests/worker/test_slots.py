"""Slots: several tasks at once on one worker (slots.py), the receive sized by what free slots can finish
(sizing.py), and Python handlers in child processes (isolation.py)."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest
from ec2cluster_worker import records
from ec2cluster_worker.config import ConfigError, PythonHandlerSpec, WorkerConfig, default_slots
from ec2cluster_worker.handlers import HandlerError, TaskContext, TaskFailure, TaskTimeout, build_handler
from ec2cluster_worker.isolation import ProcessHandler
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.runtime import EXIT_STARTUP_FAILED, run_worker
from ec2cluster_worker.sizing import DurationStats, receive_size
from ec2cluster_worker.slots import SlotPool

from .cloud import (
    REGION,
    WorkerProcess,
    create_state_table,
    create_task_queue,
    queue_counts,
    send_tasks,
    task_log,
    unique,
    worker_config,
    worker_env,
    worker_statuses,
)

# -- the receive's size (pure) -----------------------------------------------------------------------------


def test_short_tasks_fill_a_receive():
    # 1 ms tasks, 10 a message: 2 free slots finish thousands within a quarter of 120 s: 10 messages.
    assert receive_size(0.001, 2, 120, 10) == 10
    assert receive_size(0.001, 1, 120, 1) == 10
    # never past max_messages, nor past SQS's 10
    assert receive_size(0.001, 2, 120, 10, max_messages=4) == 4
    assert receive_size(0.0, 64, 43200, 1, max_messages=50) == 10


def test_long_tasks_take_only_what_the_free_slots_start():
    # 60 s tasks, 120 s visibility (30 s budget): no more than one task per free slot, so none waits here.
    assert receive_size(60.0, 1, 120, 1) == 1
    assert receive_size(60.0, 4, 120, 1) == 4
    assert receive_size(60.0, 16, 120, 1) == 10
    # groups of 10 long tasks: one message, even for 16 free slots would be 2 (every slot gets one).
    assert receive_size(60.0, 2, 120, 10) == 1
    assert receive_size(60.0, 16, 120, 10) == 2


def test_medium_tasks_get_what_finishes_within_a_quarter_of_the_visibility_timeout():
    # 1 s tasks, 2 free slots, 120 s visibility: 2 * 30 / 1 = 60 tasks, 6 messages of 10.
    assert receive_size(1.0, 2, 120, 10) == 6
    # A longer visibility timeout allows more; a longer task less.
    assert receive_size(1.0, 2, 240, 10) == 10
    assert receive_size(3.0, 2, 120, 10) == 2


def test_no_free_slot_no_receive_and_the_first_receive_is_one_message():
    assert receive_size(0.001, 0, 120, 10) == 0
    # No message seen, its size unknown: a message per free slot (each holds a task at least).
    assert receive_size(None, 8, 120, None) == 8 and receive_size(None, 1, 120, None) == 1
    assert receive_size(None, 16, 120, None) == 10
    assert receive_size(None, 8, 120, 1) == 8  # no duration yet: one task per free slot
    assert receive_size(None, 8, 120, 10) == 1


def test_duration_stats_follow_recent_tasks():
    stats = DurationStats(window=3)
    assert stats.mean() is None and stats.tasks_per_message is None
    for seconds in (10.0, 1.0, 1.0, 1.0):
        stats.add(seconds)
    assert stats.mean() == 1.0  # the 10 s task has left the window
    stats.saw_messages([1, 10, 3])
    assert stats.tasks_per_message == 10


# -- configuration -----------------------------------------------------------------------------------------


def base(handler):
    return {
        "cluster_id": "c-1",
        "region": REGION,
        "queue_url": "https://sqs/q",
        "handler": handler,
    }


PYTHON = {"type": "python", "target": "m:f"}
COMMAND = {"type": "command", "argv": ["true"]}


def test_slots_per_instance_is_checked_and_defaults_by_how_tasks_run():
    assert WorkerConfig.from_dict({**base(PYTHON), "slots_per_instance": 4}).slots_per_instance == 4
    assert WorkerConfig.from_dict({**base(PYTHON), "slots_per_instance": None}).slots_per_instance is None
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ConfigError, match=r"^slots_per_instance: .* whole number from 1 to"):
            WorkerConfig.from_dict({**base(PYTHON), "slots_per_instance": bad})
    with pytest.raises(ConfigError, match=r"^handler.isolation: 'fork' is not 'thread' or 'process'"):
        WorkerConfig.from_dict(base({**PYTHON, "isolation": "fork"}))
    threads = WorkerConfig.from_dict(base(PYTHON))
    processes = WorkerConfig.from_dict(base({**PYTHON, "isolation": "process"}))
    command = WorkerConfig.from_dict(base(COMMAND))
    assert [default_slots(c.handler, 16) for c in (threads, processes, command)] == [1, 16, 16]
    # the document round-trips (the controller validates what it renders into the user data)
    assert WorkerConfig.from_dict(processes.to_dict()) == processes
    assert processes.to_dict()["handler"] == {"type": "python", "target": "m:f", "isolation": "process"}


# -- the slot pool -----------------------------------------------------------------------------------------


class Job:
    def __init__(self, gate: threading.Event, log: list[str], name: str) -> None:
        self.gate, self.log, self.name = gate, log, name

    def run(self) -> None:
        self.log.append(f"start {self.name}")
        self.gate.wait(30)
        self.log.append(f"end {self.name}")

    def skip(self) -> None:
        self.log.append(f"skip {self.name}")


def test_a_pool_runs_as_many_jobs_as_slots_and_hands_back_the_rest():
    gate, log = threading.Event(), []
    pool = SlotPool(2)
    pool.submit([Job(gate, log, name) for name in "abcd"])
    deadline = time.monotonic() + 30
    while pool.busy() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.busy() == 2 and pool.free() == -2  # two running, two waiting for a slot
    skipped = pool.cancel_pending()
    for job in skipped:
        job.skip()
    gate.set()
    assert pool.wait_idle(30)
    assert sorted(log) == ["end a", "end b", "skip c", "skip d", "start a", "start b"]
    assert pool.free() == 2
    pool.close()


# -- a worker with two slots -------------------------------------------------------------------------------


def test_two_slots_run_two_python_tasks_at_once_in_threads(aws_endpoint):
    """Each task returns only once the other is running beside it (a barrier of two): one slot could not
    finish either."""
    cluster = unique("slots")
    table = create_state_table()
    queue_url, _ = create_task_queue(cluster)
    send_tasks(queue_url, {f"t{n}": {"name": cluster, "parties": 2} for n in range(2)})
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            table,
            handler={"type": "python", "target": "tests.worker.sample_handlers:meet"},
            slots_per_instance=2,
            task_timeout_seconds=60,
        )
    )
    stream = io.StringIO()
    code = run_worker(config, environ={"EC2CLUSTER_WORKER_ID": "w-2"}, log=EventLog(stream=stream))
    assert code == 0, stream.getvalue()[-3000:]
    log = task_log(table, cluster)
    assert {task_id: item["status"] for task_id, item in log.items()} == {"t0": "done", "t1": "done"}, log


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def two_slot_job(name: str, tasks: dict, target: str, visibility: int | None = None, **fields):
    """A fresh table and queue holding ``tasks``, and a worker configuration of 2 slots running ``target``
    in child processes: (cluster id, table, queue URL, configuration)."""
    cluster = unique(name)
    table = create_state_table()
    queue_url, _ = create_task_queue(cluster, **({} if visibility is None else {"visibility": visibility}))
    send_tasks(queue_url, tasks)
    handler = {"type": "python", "target": target, "isolation": "process"}
    config = worker_config(cluster, queue_url, table, handler=handler, slots_per_instance=2, **fields)
    return cluster, table, queue_url, config


def test_each_slot_keeps_its_message_hidden_and_a_stop_waits_for_both(aws_endpoint, tmp_path):
    """Two slots, each holding a task (in a child process of its own) past the visibility timeout: both
    messages are extended, the status item counts two busy slots, and SIGTERM lets both tasks finish (and
    deletes their messages) without taking the third message."""
    cluster, table, queue_url, config = two_slot_job(
        "slotstop",
        {"a": {"dir": str(tmp_path)}, "b": {"dir": str(tmp_path)}},
        "sample_handlers:hold_until_released",
        visibility=10,
        task_timeout_seconds=120,
        visibility_timeout_seconds=10,
        idle_shutdown_seconds=60,
        stop_when_queue_empty=False,
    )
    worker = WorkerProcess(config, tmp_path)
    try:
        wait_for(lambda: all((tmp_path / f"{t}.started").exists() for t in "ab"), "both tasks to start")
        # Sent now: the worker, both slots busy, must not take it.
        send_tasks(queue_url, {"c": {"dir": str(tmp_path)}})
        busy = wait_for(
            lambda: next(
                (s for s in worker_statuses(table, cluster).values() if s.get("busy_slots") == 2), None
            ),
            "a status item with two busy slots",
        )
        assert busy["busy"] is True and busy["slots"] == 2
        pids = {(tmp_path / f"{t}.started").read_text() for t in "ab"}
        assert len(pids) == 2 and str(worker.process.pid) not in pids  # two children, not the worker

        def extended() -> int:
            return sum(
                e.get("messages", 0) for e in worker.events() if e.get("event") == "visibility.extended"
            )

        # Each message extended twice: the second extension comes after the first timeout would have ended.
        wait_for(lambda: extended() >= 4, "two extensions of both messages", timeout=60)
        assert queue_counts(queue_url) == {"visible": 1, "in_flight": 2}

        worker.process.send_signal(signal.SIGTERM)
        worker.wait_for_event("worker.stopping")
        (tmp_path / "release").write_text("go")
        assert worker.wait(timeout=60) == 0, worker.log_path.read_text()
    finally:
        worker.kill()
    log = task_log(table, cluster)
    assert {t: (item["status"], int(item["attempt"])) for t, item in log.items()} == {
        "a": ("done", 1),
        "b": ("done", 1),
    }
    assert not (tmp_path / "c.started").exists()
    assert queue_counts(queue_url) == {"visible": 1, "in_flight": 0}
    (status,) = worker_statuses(table, cluster).values()
    assert (status["state"], status["stop_reason"], status["busy_slots"]) == (
        records.STATE_STOPPED,
        "signal:SIGTERM",
        0,
    )


def test_the_heartbeat_goes_on_while_the_slots_children_import_the_handler(aws_endpoint, tmp_path):
    """Children that take long to import the handler (held here by a gate) keep the worker's status item
    fresh, so the drain does not take the worker for hung; no message is received until they are ready."""
    cluster, table, queue_url, config = two_slot_job(
        "slowimport", {"a": {"n": 1}, "b": {"n": 2}}, "child_import_handlers:echo", heartbeat_seconds=0.2
    )
    gate = tmp_path / "gate"
    worker = WorkerProcess(config, tmp_path, env={**worker_env(), "EC2CLUSTER_TEST_IMPORT_GATE": str(gate)})
    try:
        first = wait_for(lambda: next(iter(worker_statuses(table, cluster).values()), None), "a status item")
        later = wait_for(
            lambda: next(
                (
                    s
                    for s in worker_statuses(table, cluster).values()
                    if s["heartbeat_at"] > first["heartbeat_at"]
                ),
                None,
            ),
            "a heartbeat while the children import",
        )
        assert later["state"] == records.STATE_STARTING
        assert queue_counts(queue_url) == {"visible": 2, "in_flight": 0}  # nothing taken yet
        gate.write_text("go")
        assert worker.wait(timeout=60) == 0, worker.log_path.read_text()
    finally:
        worker.kill()
    assert {t: item["status"] for t, item in task_log(table, cluster).items()} == {"a": "done", "b": "done"}


def test_a_worker_whose_children_cannot_import_the_handler_stops_at_start(aws_endpoint, tmp_path):
    cluster, table, queue_url, config = two_slot_job(
        "childimport", {"a": {"n": 1}}, "child_import_handlers:echo"
    )
    env = {**worker_env(), "EC2CLUSTER_TEST_IMPORT_FAILS": "libfoo.so.1: cannot open shared object file"}
    worker = WorkerProcess(config, tmp_path, env=env)
    try:
        assert worker.wait(timeout=60) == EXIT_STARTUP_FAILED, worker.log_path.read_text()
    finally:
        worker.kill()
    (status,) = worker_statuses(table, cluster).values()
    assert status["state"] == records.STATE_STOPPED
    assert status["stop_reason"].startswith(
        "startup-failed: handler.target: 'child_import_handlers:echo' could not be loaded in a child process"
    )
    assert "libfoo.so.1: cannot open shared object file" in worker.log_path.read_text()  # the child's stderr
    assert queue_counts(queue_url) == {"visible": 1, "in_flight": 0}  # nothing received


# -- process isolation -------------------------------------------------------------------------------------

CONTEXT = TaskContext("t-1", 1, "w-1", "c-1")


def process_handler(name: str):
    return build_handler(
        PythonHandlerSpec(target=f"tests.worker.sample_handlers:{name}", isolation="process")
    )


def test_a_process_handler_runs_tasks_in_a_child_and_reuses_it():
    handler = process_handler("chatty")
    try:
        first = handler({"n": 1}, CONTEXT, 30)  # its print goes to stderr, not into the answer
        second = handler({"n": 2}, CONTEXT, 30)
        assert first["pid"] == second["pid"] != os.getpid() and first["attempt"] == 1
    finally:
        handler.close()


def test_children_started_ahead_are_ready_and_run_the_first_tasks():
    handler = process_handler("chatty")
    try:
        handler.start(2)
        ready = {child.process.pid for child in handler._idle}
        assert len(ready) == 2 and all(child._ready for child in handler._idle)
        first = handler({"n": 1}, CONTEXT, 30)
        assert first["pid"] in ready  # no third interpreter: the task went to a child already started
    finally:
        handler.close()


def test_a_child_that_cannot_load_the_handler_stops_the_start_with_the_field_named():
    # The parent's own check passes for a target the child cannot import (another environment, a module
    # that fails in a fresh interpreter): the start says so, before any message is received.
    handler = ProcessHandler("tests.worker.sample_handlers:no_such_function")
    with pytest.raises(HandlerError) as error:
        handler.start(2)
    assert str(error.value) == (
        "handler.target: 'tests.worker.sample_handlers:no_such_function' could not be loaded in a child "
        "process: the handler's process exited with status 2 while importing the handler (handler.isolation "
        "'process'); the child's error is on the worker's stderr"
    )
    assert handler._idle == []


def test_a_process_handler_reports_errors_and_kills_a_task_past_its_time():
    failing = process_handler("fail_if_asked")
    hanging = process_handler("hang_if_asked")
    try:
        with pytest.raises(TaskFailure) as failure:
            failing({"fail": "7"}, CONTEXT, 30)
        assert str(failure.value) == "ValueError: asked to fail: 7"
        assert "fail_if_asked" in failure.value.detail
        assert failing({"ok": 1}, CONTEXT, 30) == {"ok": {"ok": 1}}  # the child goes on after a failure
        unserialisable = process_handler("not_serialisable")
        with pytest.raises(TaskFailure, match="not JSON-serialisable"):
            unserialisable({}, CONTEXT, 30)
        unserialisable.close()
        started = time.monotonic()
        with pytest.raises(TaskTimeout):
            hanging({"hang": True}, CONTEXT, 1)
        assert time.monotonic() - started < 20
        assert hanging({}, CONTEXT, 30) == {"ok": {}}  # a new child for the next task
    finally:
        failing.close()
        hanging.close()
