"""Graceful stop under load: SIGTERM to every worker mid-run; new workers finish; no message is held back.

Mid-run is observed, not timed: every worker's status item says running (its SIGTERM handler is
installed before it writes that) and some messages are done. The job is long enough (about 12 s of work for
the four) that the signal comes well before its end, whatever the machine's load.
"""

from __future__ import annotations

import signal
import time

import pytest

from .harness import Job, kill_worker, wait_for, worker_pids

TASKS = 1000
WORKERS = 4
TASK_SECONDS = 0.05
# Long: a message a stopping worker kept would show as in flight after the workers exited.
VISIBILITY_SECONDS = 60


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_sigterm_to_every_worker_hands_back_its_messages(cloud_env):
    job = Job(cloud_env, "sigterm")
    tasks = [{"n": n, "sleep": TASK_SECONDS} for n in range(TASKS)]
    job.enqueue(tasks, visibility_timeout=VISIBILITY_SECONDS)
    job.launch(WORKERS, "handlers:double", visibility_timeout_seconds=VISIBILITY_SECONDS)
    observed: dict[str, object] = {}

    def queue_counts():
        return job.hook.queue_counts(job.xcom["enqueue"]["queue_url"], job.xcom["enqueue"]["dlq_url"])

    def stop_everyone() -> None:
        if "signalled_at" in observed:
            return
        running = job.running_worker_pids()
        if len(running) < WORKERS or job.messages_done() < 1:
            return
        for pid in running.values():
            kill_worker(pid, signal.SIGTERM)
        observed["signalled_at"] = time.monotonic()
        observed["stopped"] = sorted(running)
        observed["left_at_signal"] = job.messages_left()
        wait_for(lambda: not set(worker_pids(job.cloud)) & set(running), 60, "the signalled workers to exit")
        observed["exit_seconds"] = round(time.monotonic() - observed["signalled_at"], 1)
        # Nothing the stopped workers held stays invisible: they finished their task and released the rest.
        counts = queue_counts()
        observed["in_flight_after_stop"] = counts.in_flight
        observed["visible_after_stop"] = counts.visible

    summary = job.drain(timeout=200, between_pokes=stop_everyone)
    job.teardown()
    job.assert_nothing_left()

    assert "signalled_at" in observed, "the job ended before its workers were all running: make it longer"
    finished_after = time.monotonic() - observed["signalled_at"]
    assert observed["in_flight_after_stop"] == 0, observed
    assert 0 < observed["visible_after_stop"] < job.xcom["enqueue"]["enqueued_messages"], observed
    results = job.results()
    assert sorted(r["task_id"] for r in results) == [f"t{n:09d}" for n in range(TASKS)]
    assert all(r["status"] == "done" and r["result"] == {"n": 2 * int(r["task_id"][1:])} for r in results)
    stops = job.worker_events("worker.stopped")
    by_signal = [e for e in stops if e["worker_id"] in observed["stopped"]]
    assert sorted(e["worker_id"] for e in by_signal) == observed["stopped"]
    assert {e["reason"] for e in by_signal} == {"signal:SIGTERM"}
    assert all(e["exit_code"] == 0 for e in by_signal)
    executions = job.executions()
    print(
        f"\nRELIABILITY graceful-stop: tasks={TASKS} sigterm={len(by_signal)} "
        f"messages_left_at_signal={observed['left_at_signal']} exit_within_s={observed['exit_seconds']} "
        f"in_flight_after_stop={observed['in_flight_after_stop']} "
        f"finished_after_signal_s={finished_after:.1f} visibility_s={VISIBILITY_SECONDS} "
        f"replacements={summary['replacements_launched']} "
        f"duplicate_executions={sum(c - 1 for c in executions.values())} results={len(results)} lost=0"
    )
