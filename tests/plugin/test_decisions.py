"""decide() on crafted snapshots: reaping, replacement caps, drained detection, failing fast."""

from __future__ import annotations

from dataclasses import replace

from airflow_ec2cluster.drain.decisions import (
    DEFAULT_DRAINED_CHECKS,
    EXACT_COUNT_ROUNDS,
    REASON_HUNG,
    REASON_IDLE,
    REASON_INSTANCE_STOPPED,
    REASON_NEVER_REPORTED,
    REASON_STOPPED,
    UNCHECKED_DRAINED_CHECKS,
    InstanceInfo,
    Policy,
    QueueCounts,
    Snapshot,
    WorkerStatus,
    decide,
)

NOW = 100_000.0
POLICY = Policy(
    idle_timeout=300,
    heartbeat_timeout=60,
    max_task_seconds=900,
    boot_timeout=600,
    drained_checks=3,
    cluster_size=3,
    replace_reaped=True,
)
WORK = QueueCounts(visible=50, in_flight=5, delayed=0, dead_lettered=0)
EMPTY = QueueCounts(visible=0, in_flight=0, delayed=0, dead_lettered=0)


def instance(iid: str, state: str = "running", launched_ago: float = 1000) -> InstanceInfo:
    return InstanceInfo(iid, state, NOW - launched_ago)


def worker(wid: str, **fields) -> WorkerStatus:
    base = {
        "worker_id": wid,
        "state": "running",
        "started_at": NOW - 900,
        "heartbeat_at": NOW - 5,
        "busy": True,
        "busy_task_id": "t000000001",
        "busy_since": NOW - 10,
        "idle_since": None,
        "last_completion_at": NOW - 11,
        "tasks_done": 10,
    }
    base.update(fields)
    return WorkerStatus(**base)


def snapshot(instances, workers, counts=WORK, **fields) -> Snapshot:
    base = {"now": NOW, "policy": POLICY, "enqueued": 100, "started_at": NOW - 1000}
    base.update(fields)
    return Snapshot(counts=counts, instances=tuple(instances), workers=tuple(workers), **base)


def reasons(decision) -> dict[str, str]:
    return {r.instance_id: r.reason for r in decision.reap}


def test_busy_healthy_workers_are_kept_and_nothing_launched():
    ids = ["i-1", "i-2", "i-3"]
    decision = decide(snapshot([instance(i) for i in ids], [worker(i) for i in ids]))
    assert decision.reap == ()
    assert decision.launch == 0
    assert not decision.drained and decision.failure is None
    assert "done 30/100" in decision.progress and "3 busy/0 idle" in decision.progress


def test_idle_worker_is_reaped_after_idle_timeout_but_not_before():
    idle_long = worker("i-1", busy=False, busy_since=None, idle_since=NOW - 301, last_completion_at=NOW - 301)
    idle_short = worker(
        "i-2", busy=False, busy_since=None, idle_since=NOW - 100, last_completion_at=NOW - 100
    )
    decision = decide(snapshot([instance("i-1"), instance("i-2")], [idle_long, idle_short]))
    assert reasons(decision) == {"i-1": REASON_IDLE}


def test_a_recent_completion_keeps_an_idle_worker():
    recently_done = worker("i-1", busy=False, idle_since=NOW - 1000, last_completion_at=NOW - 20)
    assert decide(snapshot([instance("i-1")], [recently_done])).reap == ()


def test_hung_by_heartbeat_and_by_task_duration():
    silent = worker("i-1", heartbeat_at=NOW - 61)
    stuck = worker("i-2", busy_since=NOW - 901, busy_task_id="t000000007")
    decision = decide(
        snapshot([instance("i-1"), instance("i-2"), instance("i-3")], [silent, stuck, worker("i-3")])
    )
    assert reasons(decision) == {"i-1": REASON_HUNG, "i-2": REASON_HUNG}
    assert any("t000000007" in r.detail for r in decision.reap)


def test_never_reported_only_after_boot_timeout():
    booting = instance("i-1", launched_ago=100)
    lost = instance("i-2", launched_ago=601)
    decision = decide(snapshot([booting, lost, instance("i-3")], [worker("i-3")]))
    assert reasons(decision) == {"i-2": REASON_NEVER_REPORTED}
    assert "1 booting" in decision.progress


def booting_item(wid: str, step: str, last_sign_ago: float) -> WorkerStatus:
    """The boot loader's item (ec2cluster_worker.boot): state booting, its step, no counts."""
    return WorkerStatus(
        worker_id=wid,
        state="booting",
        started_at=NOW - 5000,
        heartbeat_at=NOW - last_sign_ago,
        busy=False,
        tasks_done=0,
        tasks_failed=0,
        step=step,
    )


def test_a_long_install_is_kept_while_it_shows_signs_of_life_and_reaped_once_silent():
    # Both launched long ago (past boot_timeout): one still writes its booting item, one stopped writing.
    moving = booting_item("i-1", "fetching bundle (900 of 2100 MB)", last_sign_ago=20)
    stalled = booting_item("i-2", "unpacking bundle", last_sign_ago=601)
    decision = decide(
        snapshot(
            [instance("i-1", launched_ago=5000), instance("i-2", launched_ago=5000), instance("i-3")],
            [moving, stalled, worker("i-3")],
        )
    )
    assert reasons(decision) == {"i-2": REASON_NEVER_REPORTED}
    assert "booting (unpacking bundle), no sign of life for 601s" in decision.reap[0].detail
    # A booting instance is capacity, not a worker: counted as booting, never as idle or busy.
    assert "1 busy/0 idle/1 booting" in decision.progress, decision.progress
    assert decision.launch == 1  # the reaped one is replaced


def test_stopped_worker_on_running_instance_and_stopped_instance_are_reaped():
    exited = worker("i-1", state="stopped", stop_reason="idle", busy=False)
    decision = decide(snapshot([instance("i-1"), instance("i-2", state="stopped")], [exited, worker("i-2")]))
    assert reasons(decision) == {"i-1": REASON_STOPPED, "i-2": REASON_INSTANCE_STOPPED}


def test_replacements_fill_up_to_cluster_size_only():
    # Two kept, one hung: one replacement, not more, so the cluster never exceeds its size.
    ws = [worker("i-1"), worker("i-2"), worker("i-3", heartbeat_at=NOW - 500)]
    decision = decide(snapshot([instance(i) for i in ("i-1", "i-2", "i-3")], ws))
    assert reasons(decision) == {"i-3": REASON_HUNG}
    assert decision.launch == 1


def test_booting_and_replacement_instances_count_toward_the_size():
    ws = [worker("i-1", heartbeat_at=NOW - 500)]
    decision = decide(
        snapshot([instance("i-1"), instance("i-2", launched_ago=5), instance("i-3", launched_ago=5)], ws)
    )
    assert decision.launch == 1


def test_in_flight_messages_count_as_work():
    # The only worker is reaped while it holds the last messages: they come back when their visibility
    # expires, so one worker must be there to take them; not a drain, not a failure.
    in_flight_only = QueueCounts(visible=0, in_flight=2, delayed=0, dead_lettered=0)
    decision = decide(
        snapshot([instance("i-1")], [worker("i-1", heartbeat_at=NOW - 500)], counts=in_flight_only)
    )
    assert decision.launch == 1
    assert decision.consecutive_empty == 0 and not decision.drained and decision.failure is None


def test_no_replacement_for_messages_a_live_worker_holds():
    # Two workers exited idle at the tail while the third holds the last 10 messages: new workers could
    # receive nothing, so none is launched.
    tail = QueueCounts(visible=0, in_flight=10, delayed=0, dead_lettered=0)
    gone = [instance("i-1", state="terminated"), instance("i-2", state="terminated")]
    decision = decide(snapshot([*gone, instance("i-3")], [worker("i-3")], counts=tail))
    assert decision.launch == 0 and decision.failure is None


def test_replacements_only_for_messages_a_new_worker_can_receive():
    some_visible = QueueCounts(visible=1, in_flight=10, delayed=0, dead_lettered=0)
    decision = decide(snapshot([instance("i-3")], [worker("i-3")], counts=some_visible))
    assert decision.launch == 1


def test_no_replacements_without_work():
    ws = [worker("i-1", state="stopped", busy=False)]
    decision = decide(snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=0))
    assert decision.launch == 0 and decision.failure is None


def test_fail_fast_when_work_remains_and_replacement_is_off():
    policy = replace(POLICY, replace_reaped=False)
    ws = [worker("i-1", heartbeat_at=NOW - 500)]
    decision = decide(snapshot([instance("i-1")], ws, policy=policy))
    assert decision.launch == 0
    assert (
        decision.failure
        and "55 messages of tasks remain" in decision.failure
        and "replace_reaped is off" in decision.failure
    )


def test_fail_fast_when_replacement_budget_is_used_up():
    policy = replace(POLICY, max_replacements=4)
    decision = decide(snapshot([], [], policy=policy, replacements_launched=4))
    assert decision.failure and "budget" in decision.failure


def test_replacement_budget_caps_the_launch():
    policy = replace(POLICY, max_replacements=4)
    decision = decide(snapshot([], [], policy=policy, replacements_launched=3))
    assert decision.launch == 1 and decision.failure is None


def test_drained_only_after_consecutive_empty_checks():
    ws = [worker("i-1", busy=False, tasks_done=100)]
    first = decide(snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=0))
    assert first.consecutive_empty == 1 and not first.drained
    second = decide(snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=1))
    assert not second.drained
    third = decide(snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=2))
    assert third.drained and third.launch == 0 and third.failure is None


def test_a_non_empty_reading_resets_the_count():
    decision = decide(snapshot([instance("i-1")], [worker("i-1")], consecutive_empty=2))
    assert decision.consecutive_empty == 0 and not decision.drained


def test_dead_letters_count_toward_accounted_tasks():
    counts = QueueCounts(0, 0, 0, dead_lettered=4)
    ws = [worker("i-1", busy=False, tasks_done=96)]
    assert decide(snapshot([instance("i-1")], ws, counts=counts, consecutive_empty=2)).drained


def test_short_worker_sum_asks_for_exact_count_then_drains_on_it():
    ws = [worker("i-1", busy=False, tasks_done=90)]  # a killed worker's last 10 never reached its status item
    base = snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=2)
    asked = decide(base)
    assert not asked.drained and asked.needs_exact_count
    assert decide(replace(base, exact_finished=100)).drained


def test_exact_count_short_keeps_waiting_then_fails():
    ws = [worker("i-1", busy=False, tasks_done=90)]
    checks = POLICY.drained_checks
    waiting = decide(
        snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=checks, exact_finished=95)
    )
    assert not waiting.drained and waiting.failure is None and not waiting.needs_exact_count
    last = EXACT_COUNT_ROUNDS * checks - 1
    failed = decide(snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=last, exact_finished=95))
    assert failed.failure and "95 of 100" in failed.failure


def test_exact_count_is_asked_only_every_drained_checks_pokes():
    ws = [worker("i-1", busy=False, tasks_done=90)]
    asked = [
        decide(snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=n)).needs_exact_count
        for n in range(2, 9)
    ]
    assert asked == [True, False, False, True, False, False, True]


def test_not_drained_while_enqueue_is_incomplete():
    ws = [worker("i-1", busy=False, tasks_done=100)]
    decision = decide(
        snapshot([instance("i-1")], ws, counts=EMPTY, consecutive_empty=5, enqueue_complete=False)
    )
    assert not decision.drained


def test_progress_line_has_rate_and_eta():
    ws = [worker("i-1", tasks_done=50)]
    decision = decide(snapshot([instance("i-1")], ws, started_at=NOW - 100))
    assert "done 50/100 (50.0%)" in decision.progress
    assert "rate 30.0/min" in decision.progress and "ETA 1m40s" in decision.progress


def test_progress_uses_the_exact_count_when_there_is_one():
    """The last rounds read the task log exactly; the line must agree with it, not with stale counters."""
    ws = [worker("i-1", tasks_done=0, busy=False), worker("i-2", tasks_done=0, busy=False)]
    decision = decide(
        snapshot([instance("i-1"), instance("i-2")], ws, counts=EMPTY, exact_tasks_finished=100)
    )
    assert decision.finished == 100
    assert "done 100/100 (100.0%)" in decision.progress
    assert "rate -" not in decision.progress


def test_progress_never_goes_backwards():
    # An earlier round reported 80 (an exact count, or a worker since restarted); the counters say 30.
    ws = [worker("i-1", tasks_done=30)]
    decision = decide(snapshot([instance("i-1")], ws, finished_before=80))
    assert decision.finished == 80 and "done 80/100" in decision.progress
    assert (
        decide(snapshot([instance("i-1")], [worker("i-1", tasks_done=90)], finished_before=80)).finished == 90
    )


def test_progress_never_passes_the_job_size():
    # The counters count attempts: 30 poison tasks tried twice make 130 "finished" of a 100-task job.
    ws = [worker("i-1", tasks_done=70, tasks_failed=60)]
    decision = decide(snapshot([instance("i-1")], ws))
    assert decision.finished == 100 and "done 100/100 (100.0%)" in decision.progress


def test_worker_status_from_item():
    item = {"worker_id": "i-9", "state": "running", "started_at": 10, "heartbeat_at": 20, "busy": False}
    status = WorkerStatus.from_item(item)
    assert status.heartbeat_at == 20.0 and status.last_completion_at is None and status.last_activity == 10
    assert (status.busy, status.busy_slots, status.slots) == (False, 0, 1)


def test_a_worker_with_any_busy_slot_is_busy():
    base = {"worker_id": "i-9", "state": "running", "started_at": 10, "heartbeat_at": 20}
    slotted = WorkerStatus.from_item({**base, "busy": True, "busy_slots": 3, "slots": 4})
    assert (slotted.busy, slotted.busy_slots, slotted.slots) == (True, 3, 4)
    # busy_slots alone says busy too; an older worker's busy flag alone is one busy slot.
    assert WorkerStatus.from_item({**base, "busy_slots": 1}).busy
    older = WorkerStatus.from_item({**base, "busy": True})
    assert (older.busy, older.busy_slots, older.slots) == (True, 1, 1)
    # A busy worker is not idle, however long ago its last task ended: the drain does not reap it.
    idle_long = {**base, "busy": False, "busy_slots": 2, "slots": 2, "busy_since": NOW - 5, "idle_since": 11}
    busy = replace(WorkerStatus.from_item(idle_long), heartbeat_at=NOW)
    assert not decide(snapshot([instance("i-9")], [busy])).reap


def test_default_is_two_empty_reads_with_the_task_log_agreeing():
    policy = replace(POLICY, drained_checks=DEFAULT_DRAINED_CHECKS)
    done = [worker("i-1", busy=False, tasks_done=100)]
    assert DEFAULT_DRAINED_CHECKS == 2
    assert decide(snapshot([instance("i-1")], done, counts=EMPTY, policy=policy, consecutive_empty=1)).drained
    once = decide(snapshot([instance("i-1")], done, counts=EMPTY, policy=policy, consecutive_empty=0))
    assert not once.drained


def test_two_empty_reads_are_not_enough_when_tasks_are_unaccounted_for():
    # A stale zero while messages are held: the counters show work missing, so no drain on the queue alone.
    policy = replace(POLICY, drained_checks=DEFAULT_DRAINED_CHECKS)
    short = [worker("i-1", busy=False, tasks_done=60)]
    base = snapshot([instance("i-1")], short, counts=EMPTY, policy=policy, consecutive_empty=1)
    assert not decide(base).drained and decide(base).needs_exact_count
    assert not decide(replace(base, exact_finished=60)).drained


def test_without_an_enqueued_count_three_empty_reads_are_required():
    policy = replace(POLICY, drained_checks=DEFAULT_DRAINED_CHECKS)
    ws = [worker("i-1", busy=False, tasks_done=0)]
    reads = [
        decide(
            snapshot([instance("i-1")], ws, counts=EMPTY, policy=policy, enqueued=None, consecutive_empty=n)
        ).drained
        for n in range(UNCHECKED_DRAINED_CHECKS)
    ]
    assert reads == [False] * (UNCHECKED_DRAINED_CHECKS - 1) + [True]


def test_a_console_tail_keeps_the_last_non_empty_lines_cut_short():
    from airflow_ec2cluster.drain.decisions import CONSOLE_LINE_CHARS, console_tail

    console = "\n".join(["boot"] + [f"line {n}" for n in range(8)] + ["", "x" * 500, "   "])
    assert console_tail(console) == ["line 4", "line 5", "line 6", "line 7", "x" * CONSOLE_LINE_CHARS]
    assert console_tail("") == []


def test_boot_failures_are_shown_newest_last_and_capped():
    from airflow_ec2cluster.drain.decisions import BOOT_FAILURES_SHOWN, boot_failures_shown

    failures = {f"i-{n:03d}": {"at": float(n), "reason": "", "console": [f"c{n}"]} for n in range(30)}
    failures["i-999"] = {"at": 99.0, "reason": "cannot reach sqs", "console": []}
    shown = boot_failures_shown(failures)
    assert len(shown) == BOOT_FAILURES_SHOWN and shown[-1]["instance_id"] == "i-999"
    assert shown[-1]["reason"] == "cannot reach sqs" and shown[0] == {
        "instance_id": "i-011",
        "reason": None,
        "console": ["c11"],
    }
