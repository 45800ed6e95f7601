"""Driving a whole job on the local cloud through the operators and the sensor, and faults to inject.

A ``Job`` is one cluster: enqueue, launch, drain (the sensor's poke loop, with a hook called between pokes to
inject faults), teardown; then what the cloud holds afterwards (task log, worker logs, live instances).

Faults are injected on observed progress, never on the clock: messages done (read from the queue, whose
counts are exact on the local cloud), worker states (their status items). A worker counts as started only
when its status item says ``running``: it installs its SIGTERM handler before writing that.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow.sdk import PokeReturnValue
from ec2cluster_localcloud import LocalCloud
from ec2cluster_worker import records

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import (
    EC2ClusterEnqueueOperator,
    EC2ClusterLaunchOperator,
    EC2ClusterTeardownOperator,
)
from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor
from tests.localcloud.helpers import wait_for

# Every state in which an instance still costs something or could come back.
NOT_GONE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
INSTANCE_TYPE = "t3.micro"
# The tests' handlers, shipped to the workers in the cluster's bundle (targets "handlers:<function>").
HANDLERS_MODULE = Path(__file__).resolve().parent / "handlers.py"
# Short worker timings: a killed worker's messages come back within seconds, idle workers leave soon.
FAST_WORKER = {
    "wait_time_seconds": 1,
    "heartbeat_seconds": 1,
    "idle_shutdown_seconds": 6,
    "visibility_timeout_seconds": 15,
    "task_timeout_seconds": 10,
}
FAST_SENSOR = {
    "idle_timeout": 60,
    "heartbeat_timeout": 15,
    "boot_timeout": 30,
    "drained_checks": 2,
    "poke_interval": 0.5,
}


class TaskInstance:
    """What the operators use of ``ti``: dag/run ids and XCom push (kept, so tests can scan them)."""

    def __init__(self, dag_id: str, run_id: str) -> None:
        self.dag_id = dag_id
        self.run_id = run_id
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def worker_pids(cloud: LocalCloud, instance_ids: set[str] | None = None) -> dict[str, int]:
    """Instance id -> pid of its live ``python -m ec2cluster_worker`` process (child of the user data)."""
    groups = {
        info["pgid"]: iid
        for iid, info in cloud.worker_processes().items()
        if info["alive"] and (instance_ids is None or iid in instance_ids)
    }
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in groups and b"ec2cluster_worker" in cmdline:
            found[groups[int(fields[2])]] = int(entry.name)
    return found


class Job:
    """One cluster on the local cloud, driven as the example DAG drives it."""

    def __init__(self, cloud: LocalCloud, name: str, *, aws_conn_id: str = "aws_default") -> None:
        self.cloud = cloud
        self.cluster_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.state_table = f"rel-state-{uuid.uuid4().hex[:8]}"
        self.ti = TaskInstance("reliability", f"manual__{uuid.uuid4().hex}")
        self.context: dict[str, Any] = {"ti": self.ti, "run_id": self.ti.run_id}
        self.common = {
            "cluster_id": self.cluster_id,
            "state_table": self.state_table,
            "aws_conn_id": aws_conn_id,
        }
        self.hook = EC2ClusterHook(aws_conn_id=aws_conn_id)
        self.xcom: dict[str, Any] = {}
        self.pokes = 0

    # -- the DAG's tasks --------------------------------------------------------------------------------

    def enqueue(self, tasks: list[Any], **options: Any) -> dict[str, Any]:
        operator = EC2ClusterEnqueueOperator(task_id="enqueue", tasks=tasks, **self.common, **options)
        self.xcom["enqueue"] = operator.execute(self.context)
        return self.xcom["enqueue"]

    def launch(
        self,
        num_workers: int,
        handler: str,
        *,
        launch_options: dict[str, Any] | None = None,
        **worker_options: Any,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "task_id": "launch",
            "num_workers": num_workers,
            "image_id": self.cloud.ami_id,
            "instance_type": INSTANCE_TYPE,
            "instance_profile": self.cloud.instance_profile_name,
            "handler": {"type": "python", "target": handler},
            "worker_options": {**FAST_WORKER, **worker_options},
            "code": [str(HANDLERS_MODULE)],
            **self.common,
        }
        operator = EC2ClusterLaunchOperator(**{**params, **(launch_options or {})})
        self.xcom["launch"] = operator.execute(self.context)
        return self.xcom["launch"]

    def sensor(self, **options: Any) -> QueueDrainedSensor:
        return QueueDrainedSensor(task_id="drain", **self.common, **{**FAST_SENSOR, **options})

    def drain(
        self, timeout: float, between_pokes: Callable[[], None] | None = None, **options: Any
    ) -> dict[str, Any]:
        """Poke until drained (the summary), as the sensor's poke loop would; fail after ``timeout`` s."""
        sensor = self.sensor(**options)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pokes += 1
            answer = sensor.poke(self.context)
            if isinstance(answer, PokeReturnValue) and answer.is_done:
                self.xcom["drain"] = answer.xcom_value
                return answer.xcom_value
            if between_pokes is not None:
                between_pokes()
            time.sleep(float(sensor.poke_interval))
        raise AssertionError(f"cluster {self.cluster_id} did not drain in {timeout} s")

    def teardown(self, **options: Any) -> dict[str, Any]:
        operator = EC2ClusterTeardownOperator(task_id="teardown", waiter_delay=1, **self.common, **options)
        self.xcom["teardown"] = operator.execute(self.context)
        return self.xcom["teardown"]

    # -- progress, as observed --------------------------------------------------------------------------

    @functools.cached_property
    def _sqs(self) -> Any:
        return self.cloud.client("sqs")

    @functools.cached_property
    def _dynamodb(self) -> Any:
        return self.cloud.client("dynamodb")

    def messages_left(self) -> int:
        """Messages of the task queue not deleted yet: visible, in flight (held by a worker) or delayed."""
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        answer = self._sqs.get_queue_attributes(
            QueueUrl=self.xcom["enqueue"]["queue_url"], AttributeNames=names
        )
        return sum(int(answer["Attributes"][name]) for name in names)

    def messages_done(self) -> int:
        """Messages deleted from the task queue (every task in them done)."""
        return int(self.xcom["enqueue"]["enqueued_messages"]) - self.messages_left()

    def worker_states(self) -> dict[str, str]:
        """Worker id (instance id) -> the state its status item says."""
        pages = self._dynamodb.get_paginator("query").paginate(
            TableName=self.state_table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": records.workers_pk(self.cluster_id)}},
        )
        return {item["sk"]["S"]: item["state"]["S"] for page in pages for item in page["Items"]}

    def running_worker_pids(self) -> dict[str, int]:
        """Instance id -> pid of each live worker whose status item says running (its handlers are set)."""
        states = self.worker_states()
        pids = worker_pids(self.cloud, self.instance_ids())
        return {iid: pid for iid, pid in pids.items() if states.get(iid) == records.STATE_RUNNING}

    # -- what the cloud holds ---------------------------------------------------------------------------

    def instances(self, states: tuple[str, ...] = NOT_GONE_STATES) -> list[dict[str, Any]]:
        return self.hook.list_cluster_instances(self.cluster_id, states)

    def instance_ids(self) -> set[str]:
        every = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated")
        return {i["InstanceId"] for i in self.instances(every)}

    def results(self) -> list[dict[str, Any]]:
        return list(self.hook.iter_results(self.state_table, self.cluster_id))

    def live_processes(self) -> list[str]:
        ids = self.instance_ids()
        return [iid for iid, info in self.cloud.worker_processes().items() if iid in ids and info["alive"]]

    def worker_events(self, event: str) -> list[dict[str, Any]]:
        """Every ``event`` line the cluster's workers logged (their instance logs, JSON lines)."""
        found = []
        for iid in self.instance_ids():
            path = Path(self.cloud.work_dir) / "logs" / f"{iid}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if f'"event":"{event}"' not in line:
                    continue
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def executions(self) -> Counter:
        """How many times each task ran to completion (duplicates are allowed: SQS is at-least-once)."""
        return Counter(e["task_id"] for e in self.worker_events("task.done"))

    def assert_nothing_left(self) -> None:
        """No instance of the cluster in a billable state, and no worker process alive."""
        wait_for(lambda: not self.live_processes(), 30, "the cluster's worker processes to end")
        left = [(i["InstanceId"], i["State"]["Name"]) for i in self.instances()]
        assert left == [], f"instances left: {left}"


def kill_worker(pid: int, signum: int = signal.SIGKILL) -> None:
    os.kill(pid, signum)


def tagged(cluster_id: str) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}]
