"""Fixtures for the plugin tests: moto in-process, a minimal task context, a cluster id per test."""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
from ec2cluster_localcloud.server import make_ec2_like_aws, make_logs_like_aws
from moto import mock_aws

REGION = "us-east-1"


class FakeTaskInstance:
    """What the operators use of ``ti``: its dag id and XCom push."""

    def __init__(self, dag_id: str, run_id: str) -> None:
        self.dag_id = dag_id
        self.run_id = run_id
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


@pytest.fixture
def aws(monkeypatch):
    """moto's in-process AWS, with the EC2 behaviours of AWS the local cloud adds; never the shared server."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    make_ec2_like_aws()
    make_logs_like_aws()  # CloudWatch Logs' JSON filter patterns
    with mock_aws():
        yield


@pytest.fixture
def context():
    run_id = f"manual__{uuid.uuid4().hex}"
    return {"ti": FakeTaskInstance("plugin_test", run_id), "run_id": run_id}


@pytest.fixture
def cluster_id():
    return f"test-{uuid.uuid4().hex[:12]}"


# One of the AMIs moto registers by default (listing them all takes seconds).
MOTO_AMI_ID = "ami-03cf127a"


@pytest.fixture
def ami_id(aws):
    images = boto3.client("ec2", region_name=REGION).describe_images(ImageIds=[MOTO_AMI_ID])["Images"]
    assert images and images[0]["RootDeviceName"]
    return MOTO_AMI_ID


@pytest.fixture
def instance_profile(aws):
    boto3.client("iam", region_name=REGION).create_instance_profile(InstanceProfileName="ec2cluster-worker")
    return "ec2cluster-worker"


def enqueue_and_launch(context, cluster_id: str, ami_id: str, table: str, tasks: int, **launch_args) -> dict:
    """A cluster on moto: ``tasks`` tasks enqueued and 2 workers launched (``launch_args``: the launch's
    other arguments); the XComs of both, merged.

    One task per message: these tests play the workers' part by hand, a message standing for a task.
    """
    from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator

    common = {"state_table": table, "aws_conn_id": None, "region_name": REGION}
    enqueued = EC2ClusterEnqueueOperator(
        task_id="enqueue",
        cluster_id=cluster_id,
        tasks=[{"n": i} for i in range(tasks)],
        tasks_per_message=1,
        **common,
    ).execute(context)
    descriptor = EC2ClusterLaunchOperator(
        task_id="launch",
        cluster_id=cluster_id,
        num_workers=2,
        image_id=ami_id,
        instance_type="t3.micro",
        handler={"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
        **common,
        **launch_args,
    ).execute(context)
    return {**enqueued, **descriptor}


def write_worker_status(table: str, cluster_id: str, worker_id: str, **fields) -> None:
    """A worker status item as the worker writes it: running, busy, fresh heartbeat; ``fields`` override."""
    from ec2cluster_worker import records

    now = time.time()
    item = {
        "pk": records.workers_pk(cluster_id),
        "sk": worker_id,
        "worker_id": worker_id,
        "cluster_id": cluster_id,
        "state": "running",
        "started_at": int(now - 60),
        "heartbeat_at": int(now - 1),
        "busy": True,
        "busy_task_id": "t000000000",
        "busy_since": int(now - 1),
        "tasks_done": 0,
        "tasks_failed": 0,
        **fields,
    }
    boto3.resource("dynamodb", region_name=REGION).Table(table).put_item(Item=item)
