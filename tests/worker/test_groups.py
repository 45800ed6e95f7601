"""Grouped messages: one task-log item per message; a redelivery runs only what is not done."""

from __future__ import annotations

import signal
from collections import Counter

from ec2cluster_worker import records
from ec2cluster_worker.messages import Delivery, group_body, task_body
from ec2cluster_worker.results import done_result
from ec2cluster_worker.tasklog import MAX_INLINE_RESULT_BYTES, MessageRun, fit_inline_results

from ..localcloud.helpers import wait_for
from .cloud import (
    WorkerProcess,
    create_task_queue,
    queue_counts,
    receive_all,
    send_bodies,
    task_log,
    worker_config,
    worker_statuses,
)


def groups(count: int, size: int, payload=lambda n: {"n": n}) -> list[list[tuple[str, object]]]:
    return [[(f"t{g * size + i:04d}", payload(g * size + i)) for i in range(size)] for g in range(count)]


def task_events(worker: WorkerProcess, name: str) -> Counter:
    return Counter(event["task_id"] for event in worker.events() if event.get("event") == name)


def test_groups_and_single_tasks_each_get_one_item(cluster, state_table, tmp_path):
    queue_url, _ = create_task_queue(cluster)
    grouped = groups(3, 10)
    send_bodies(queue_url, [group_body(group) for group in grouped] + [task_body("single", {"n": -1})])
    config = worker_config(
        cluster, queue_url, state_table, handler={"type": "python", "target": "sample_handlers:echo"}
    )
    worker = WorkerProcess(config, tmp_path)
    assert worker.wait() == 0, worker.log_path.read_text()

    log = task_log(state_table, cluster)
    assert set(log) == {"t0000", "t0010", "t0020", "single"}  # one item per message, under its first id
    for group in grouped:
        item = log[group[0][0]]
        assert item["status"] == records.TASK_DONE
        assert (item["task_count"], item["tasks_done"], item["tasks_failed"]) == (10, 10, 0)
        assert [entry["task_id"] for entry in item["tasks"]] == [task_id for task_id, _ in group]
        assert all(entry["status"] == records.TASK_DONE for entry in item["tasks"])
        assert '"echo":{"n":' in item["tasks"][3]["result"]
    assert log["single"]["status"] == records.TASK_DONE and "tasks" not in log["single"]
    [status] = worker_statuses(state_table, cluster).values()
    assert (status["tasks_done"], status["messages_done"], status["messages_failed"]) == (31, 4, 0)
    assert queue_counts(queue_url) == {"visible": 0, "in_flight": 0}
    # Each task ran once, and the receives asked for about ten tasks: one group at a time.
    assert set(task_events(worker, "task.done").values()) == {1}


def test_a_redelivered_group_runs_only_what_is_not_done(cluster, state_table, tmp_path):
    queue_url, dlq_url = create_task_queue(cluster, max_receive_count=2)
    group = [(f"g{i}", {"i": i}) for i in range(6)]
    group[2] = ("g2", {"fail_once": True})
    group[4] = ("g4", {"fail": "always"})
    send_bodies(queue_url, [group_body(group)])
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:fail_first_attempt"},
        idle_shutdown_seconds=300,
    )
    worker = WorkerProcess(config, tmp_path)
    # Stopped once the second attempt is logged (observed), not by an idle timer racing the retry delay.
    wait_for(
        lambda: task_log(state_table, cluster).get("g0", {}).get("attempt") == 2,
        60,
        "the second attempt's task-log item",
        interval=0.1,
    )
    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=90) == 0, worker.log_path.read_text()

    # Attempt 1 runs all six (g2 and g4 fail); attempt 2 reruns only g2 (now done) and g4 (fails again).
    assert task_events(worker, "task.done") == {"g0": 1, "g1": 1, "g2": 1, "g3": 1, "g5": 1}
    assert task_events(worker, "task.failed") == {"g2": 1, "g4": 2}
    item = task_log(state_table, cluster)["g0"]
    assert item["status"] == records.TASK_FAILED and item["attempt"] == 2
    assert (item["tasks_done"], item["tasks_failed"]) == (5, 1)
    entries = {entry["task_id"]: entry for entry in item["tasks"]}
    assert set(entries) == {task_id for task_id, _ in group}
    assert (
        entries["g4"]["status"] == records.TASK_FAILED and "asked to fail: always" in entries["g4"]["error"]
    )
    assert item["error"].startswith("1 of 6 tasks failed; g4: ")
    # The whole message goes to the dead-letter queue after maxReceiveCount receives (the next receive
    # moves it): nothing lost.
    dead = wait_for(lambda: receive_all(queue_url) or receive_all(dlq_url), 15, "the message in the DLQ")
    assert [message["Body"] for message in dead] == [group_body(group)]


def test_results_that_overflow_the_group_item_fail_with_the_fix():
    delivery = Delivery("m", "rh", 1)
    big = "x" * (MAX_INLINE_RESULT_BYTES // 2)
    results = [
        done_result(
            task_id=f"t{i}", attempt=1, worker_id="w", message_id="m", started_at=0, finished_at=1, result=big
        )
        for i in range(3)
    ]
    run = MessageRun("t0", delivery, grouped=True, task_count=3, results=results)
    attributes = {r.task_id: {"result": r.result_json} for r in results}
    fit_inline_results(run, attributes)
    assert [r.done for r in run.results] == [True, False, False]
    assert "use an s3 output, or enqueue fewer tasks per message" in run.results[1].error
