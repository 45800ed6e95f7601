"""Issue #15, worker side: a rebalance recommendation stops the worker like an early spot interruption,
and the status item says where the worker runs (instance type, zone, lifecycle) for the replacement.

The instance metadata here is the local cloud's own service (``ec2cluster_localcloud.metadata``) on a
loopback port, so the rebalance document is the one the local cloud posts; it counts the paths read. Every
wait is on an observed state (status items, task-log items, queue counts, metadata reads, the process's
exit), never on a sleep.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from ec2cluster_localcloud.metadata import InstanceFacts, InstanceMetadataService
from ec2cluster_worker import records
from ec2cluster_worker.identity import InstanceMetadata, read_placement
from ec2cluster_worker.status import WorkerStatus, status_item

from tests.localcloud.helpers import wait_for

from .cloud import (
    REGION,
    WorkerProcess,
    create_task_queue,
    queue_counts,
    receive_all,
    send_tasks,
    task_log,
    worker_config,
    worker_env,
    worker_statuses,
)

INSTANCE_ID = "i-0rebalance0000001"
SPOT_PATH = "spot/instance-action"
REBALANCE_PATH = "events/recommendations/rebalance"


class RecordingMetadata(InstanceMetadataService):
    """The local cloud's metadata service, counting the paths read, optionally with instance-life-cycle."""

    def __init__(self, lifecycle: str | None = None) -> None:
        facts = InstanceFacts(
            instance_id=INSTANCE_ID,
            instance_type="c7g.large",
            availability_zone="us-east-1b",
            region=REGION,
            image_id="ami-0123456789abcdef0",
        )
        super().__init__(facts, issue_credentials=lambda facts: {})
        self.lifecycle = lifecycle
        self.reads: Counter = Counter()

    def documents(self) -> dict[str, Callable[[], str]]:
        documents = super().documents()
        if self.lifecycle is not None:
            documents["instance-life-cycle"] = lambda: self.lifecycle or ""
        return documents

    def meta_data(self, path: str) -> str | None:
        self.reads[path] += 1
        return super().meta_data(path)


@pytest.fixture
def metadata() -> Iterator[RecordingMetadata]:
    service = RecordingMetadata()
    service.start()
    yield service
    service.close()


def metadata_env(service: RecordingMetadata) -> dict[str, str]:
    """A worker on the 'instance': its id and placement from metadata, as the runner's instances get them."""
    return worker_env(worker_id=None, EC2CLUSTER_IMDS_URL=service.url)


# -- A. rebalance recommendations -------------------------------------------------------------------------


def test_a_rebalance_recommendation_stops_the_worker_after_the_task_at_hand(
    cluster, state_table, tmp_path, metadata
):
    queue_url, _ = create_task_queue(cluster, visibility=60)
    tasks = {f"r{n:03d}": {"sleep": 0.2} for n in range(60)}  # 12 s of work: more than a watch period
    send_tasks(queue_url, tasks)
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        handler={"type": "python", "target": "sample_handlers:sleepy"},
        idle_shutdown_seconds=300,
        visibility_timeout_seconds=60,
    )
    worker = WorkerProcess(config, tmp_path, env=metadata_env(metadata))
    try:
        worker.wait_for_event("task.done", count=2)
        metadata.inject_rebalance_recommendation()
        exit_code = worker.wait(timeout=60)
    finally:
        worker.kill()

    assert exit_code == 0, worker.log_path.read_text()
    done = {task_id for task_id, item in task_log(state_table, cluster).items() if item["status"] == "done"}
    assert 2 <= len(done) < len(tasks)
    # The messages it held and had not started are visible again at once (not after the 60 s visibility).
    assert queue_counts(queue_url) == {"visible": len(tasks) - len(done), "in_flight": 0}
    assert {json.loads(m["Body"])["task_id"] for m in receive_all(queue_url)} == set(tasks) - done
    status = worker_statuses(state_table, cluster)[INSTANCE_ID]
    assert (status["state"], status["stop_reason"]) == (records.STATE_STOPPED, "rebalance-recommendation")
    assert status["tasks_done"] == len(done) and status["busy"] is False
    # Where it ran, for the controller's replacement elsewhere (the local cloud's metadata, as EC2's,
    # serves instance-life-cycle: these facts are an on-demand instance's).
    assert (status["instance_type"], status["availability_zone"]) == ("c7g.large", "us-east-1b")
    assert status["lifecycle"] == "on-demand"
    notices = [e for e in worker.events() if e.get("event") == "spot.rebalance_recommendation"]
    assert len(notices) == 1 and "noticeTime" in notices[0]["notice"]
    # One more metadata read per watch period: the rebalance document right after the interruption notice.
    assert metadata.reads[REBALANCE_PATH] == metadata.reads[SPOT_PATH] >= 1


def test_stop_on_rebalance_false_ignores_the_recommendation(cluster, state_table, tmp_path):
    service = RecordingMetadata(lifecycle="spot")
    service.start()
    service.inject_rebalance_recommendation()  # posted before the worker starts
    queue_url, _ = create_task_queue(cluster)
    config = worker_config(
        cluster,
        queue_url,
        state_table,
        idle_shutdown_seconds=300,
        stop_on_rebalance=False,
        stop_when_queue_empty=False,  # stays until the test has seen it watch, then stopped by SIGTERM
    )
    worker = WorkerProcess(config, tmp_path, env=metadata_env(service))
    try:
        wait_for(lambda: service.reads[SPOT_PATH] >= 2, 30, "two watch periods", interval=0.05)
        send_tasks(queue_url, {"after-notice": {"n": 1}})
        wait_for(lambda: "after-notice" in task_log(state_table, cluster), 30, "the task run", interval=0.05)
        worker.process.send_signal(signal.SIGTERM)
        exit_code = worker.wait(timeout=30)
    finally:
        worker.kill()
        service.close()

    assert exit_code == 0, worker.log_path.read_text()
    assert service.reads[REBALANCE_PATH] == 0  # not even read
    status = worker_statuses(state_table, cluster)[INSTANCE_ID]
    assert (status["stop_reason"], status["tasks_done"]) == ("signal:SIGTERM", 1)
    assert (status["instance_type"], status["availability_zone"], status["lifecycle"]) == (
        "c7g.large",
        "us-east-1b",
        "spot",
    )


# -- B. where the worker runs -----------------------------------------------------------------------------


def test_placement_from_metadata_and_what_is_left_out():
    service = RecordingMetadata(lifecycle="on-demand")
    service.start()
    try:
        placement = read_placement(InstanceMetadata(service.url))
    finally:
        service.close()
    assert placement == {
        "instance_type": "c7g.large",
        "availability_zone": "us-east-1b",
        "lifecycle": "on-demand",
    }
    # No metadata at all (a closed port): nothing, quickly, without trying each path.
    assert read_placement(InstanceMetadata("http://127.0.0.1:9", timeout=1)) == {}

    status = WorkerStatus(started_at=1.0)
    status.set_placement({"instance_type": "m7i.large", "availability_zone": "eu-west-1a"})
    item = status_item(status.snapshot(), cluster_id="c", worker_id="w", now=2.0, retention_seconds=10)
    assert (item["instance_type"], item["availability_zone"]) == ("m7i.large", "eu-west-1a")
    assert "lifecycle" not in item
    unknown = status_item(
        WorkerStatus(1.0).snapshot(), cluster_id="c", worker_id="w", now=2.0, retention_seconds=1
    )
    assert not {"instance_type", "availability_zone", "lifecycle"} & set(unknown)
