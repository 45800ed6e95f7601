"""A stop request does not wait out a long poll: the worker stops within about a second, loses nothing.

Every wait here is on an observed state (the status item, the calls in flight through a loopback proxy,
the process's exit), never on a sleep; the reaction time is measured and printed, not asserted, since a
busy machine may stretch it. What is asserted is that the worker exited while its 20 s poll was still in
flight, i.e. it did not wait for the poll.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from botocore.exceptions import ClientError
from ec2cluster_worker import records
from ec2cluster_worker.receiver import Receiver

from tests.localcloud.helpers import wait_for

from .callproxy import CallProxy
from .cloud import (
    WorkerProcess,
    create_task_queue,
    queue_counts,
    send_tasks,
    task_log,
    worker_config,
    worker_env,
    worker_statuses,
)

LONG_POLL = {
    "wait_time_seconds": 20,
    "idle_shutdown_seconds": 300,
    "heartbeat_seconds": 60,
    "visibility_timeout_seconds": 60,
    "stop_when_queue_empty": False,  # an idle worker stays in its long polls until the test stops it
}


def state_of(table: str, cluster: str) -> str | None:
    return worker_statuses(table, cluster).get("w-test", {}).get("state")


def test_sigterm_during_an_idle_long_poll(cluster, state_table, tmp_path, aws_endpoint):
    queue_url, _ = create_task_queue(cluster, visibility=60)
    config = worker_config(cluster, queue_url, state_table, **LONG_POLL)
    with CallProxy(aws_endpoint) as proxy:
        worker = WorkerProcess(config, tmp_path, env=worker_env(AWS_ENDPOINT_URL=proxy.url))
        try:
            # 'running' is written after the signal handlers are installed; the poll is seen at the proxy.
            wait_for(
                lambda: (
                    state_of(state_table, cluster) == records.STATE_RUNNING
                    and proxy.count("in_flight", "ReceiveMessage") == 1
                ),
                60,
                "the worker to be running and in a long poll",
                interval=0.02,
            )
            worker.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_for(
                lambda: state_of(state_table, cluster) == records.STATE_STOPPED,
                60,
                "the status item to say stopped",
                interval=0.02,
            )
            stopped_after = time.monotonic() - signalled
            exit_code = worker.wait(timeout=60)
            exited_after = time.monotonic() - signalled
            polls_in_flight = proxy.count("in_flight", "ReceiveMessage")
        finally:
            worker.kill()

    assert exit_code == 0, worker.log_path.read_text()
    assert polls_in_flight == 1, "the worker waited for its long poll to end"
    status = worker_statuses(state_table, cluster)["w-test"]
    assert (status["state"], status["stop_reason"]) == (records.STATE_STOPPED, "signal:SIGTERM")
    events = [event["event"] for event in worker.events()]
    assert "queue.receive_abandoned" in events and events[-1] == "worker.stopped"
    print(
        f"\nSIGTERM during a 20 s long poll: status 'stopped' after {stopped_after:.2f} s, "
        f"process exited after {exited_after:.2f} s"
    )


def test_messages_a_stopping_worker_still_receives_are_handed_back_at_once(
    cluster, state_table, tmp_path, aws_endpoint
):
    queue_url, _ = create_task_queue(cluster, visibility=60)
    tasks = {f"late-{n}": {"n": n} for n in range(3)}
    send_tasks(queue_url, tasks)
    config = worker_config(cluster, queue_url, state_table, **LONG_POLL)
    with CallProxy(aws_endpoint) as proxy:
        # The answer to the worker's receive (its first: one message, their size unknown yet) is held back
        # until the worker writes its 'stopped' status item: it arrives after the worker stopped waiting.
        proxy.gate.clear()

        def open_gate_on_stopped(action: str, body: bytes) -> None:
            if action == "PutItem" and b'"stopped"' in body:
                proxy.gate.set()

        proxy.on_request = open_gate_on_stopped
        worker = WorkerProcess(config, tmp_path, env=worker_env(AWS_ENDPOINT_URL=proxy.url))
        try:
            wait_for(
                lambda: proxy.held == 1 and state_of(state_table, cluster) == records.STATE_RUNNING,
                60,
                "a receive answer to be held back",
                interval=0.02,
            )
            worker.process.send_signal(signal.SIGTERM)
            exit_code = worker.wait(timeout=60)
        finally:
            worker.kill()

    assert exit_code == 0, worker.log_path.read_text()
    # Visible again at once (not hidden for the 60 s visibility timeout), and none of them was run.
    assert queue_counts(queue_url) == {"visible": len(tasks), "in_flight": 0}
    assert task_log(state_table, cluster) == {}
    released = [event for event in worker.events() if event.get("event") == "batch.released"]
    assert [(e["messages"], e["refused"], e.get("after_stop")) for e in released] == [(1, 0, True)]
    status = worker_statuses(state_table, cluster)["w-test"]
    assert status["stop_reason"] == "signal:SIGTERM" and status["tasks_done"] == 0


# -- the receiver thread alone, with a stand-in queue whose receive returns when the test says so ----------


class BlockingQueue:
    def __init__(self, answer: list | Exception) -> None:
        self.answer = answer
        self.called = threading.Event()
        self.release = threading.Event()

    def receive(self, **params) -> list:
        self.called.set()
        assert self.release.wait(30)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def make_receiver(answer: list | Exception) -> tuple[Receiver, BlockingQueue, list]:
    handed_back: list = []
    fake = BlockingQueue(answer)
    receiver = Receiver(fake, handed_back.extend)
    receiver.start()
    return receiver, fake, handed_back


def test_receiver_returns_what_the_receive_brings_and_raises_what_it_raised():
    receiver, fake, _ = make_receiver([{"MessageId": "m1"}])
    fake.release.set()
    assert receiver.receive(lambda: False) == [{"MessageId": "m1"}]
    error = ClientError({"Error": {"Code": "OverLimit", "Message": "x"}}, "ReceiveMessage")
    receiver, fake, _ = make_receiver(error)
    fake.release.set()
    with pytest.raises(ClientError, match="OverLimit"):
        receiver.receive(lambda: False)


def test_a_stop_cuts_the_wait_short_and_a_late_answer_is_handed_back():
    receiver, fake, handed_back = make_receiver([{"MessageId": "late"}])
    assert receiver.receive(lambda: fake.called.is_set()) == []  # stopped while the receive waits
    receiver.abandon()
    fake.release.set()
    assert receiver.join()
    assert handed_back == [{"MessageId": "late"}]


def test_an_answer_that_came_just_as_the_loop_stopped_waiting_is_handed_back():
    receiver, fake, handed_back = make_receiver([{"MessageId": "unclaimed"}])

    def stop_once_answered() -> bool:
        fake.release.set()
        return receiver._answered.wait(30)  # the answer is stored, but the loop returns [] (a stop)

    assert receiver.receive(stop_once_answered) == []
    receiver.abandon()
    assert receiver.join()
    assert handed_back == [{"MessageId": "unclaimed"}]


def test_abandoning_an_idle_receiver_waits_for_nothing():
    receiver, _, handed_back = make_receiver([])
    receiver.abandon()
    assert receiver.join()  # the thread ended
    assert handed_back == []
