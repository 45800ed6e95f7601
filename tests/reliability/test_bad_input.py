"""Bad input gets a clear error naming the field and the fix, and launches nothing."""

from __future__ import annotations

import json
import uuid

import boto3
import pytest
from airflow.sdk.exceptions import AirflowException
from ec2cluster_localcloud.server import make_ec2_like_aws
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto import mock_aws

from airflow_ec2cluster.cluster import QUEUE_NAME_PREFIX
from airflow_ec2cluster.hooks.sqs_send import MessageTooLarge
from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator
from airflow_ec2cluster.packing import MAX_MESSAGE_BYTES

from .harness import HANDLERS_MODULE, TaskInstance

REGION = "us-east-1"
MOTO_AMI_ID = "ami-03cf127a"
HANDLER = {"type": "python", "target": "handlers:double"}


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    make_ec2_like_aws()  # AWS's EC2 behaviours, a default VPC's internet gateway among them
    with mock_aws():
        boto3.client("iam", region_name=REGION).create_instance_profile(
            InstanceProfileName="ec2cluster-worker"
        )
        yield


@pytest.fixture
def job(aws):
    cluster_id = f"bad-{uuid.uuid4().hex[:8]}"
    ti = TaskInstance("reliability", f"manual__{cluster_id}")
    common = {
        "cluster_id": cluster_id,
        "aws_conn_id": None,
        "region_name": REGION,
        "state_table": "bad-input",
    }
    EC2ClusterEnqueueOperator(task_id="enqueue", tasks=[{"n": 1}], **common).execute(
        {"ti": ti, "run_id": ti.run_id}
    )
    return {"common": common, "context": {"ti": ti, "run_id": ti.run_id}}


def launch(job, **overrides):
    params = {
        "task_id": "launch",
        "num_workers": 2,
        "image_id": MOTO_AMI_ID,
        "instance_type": "t3.micro",
        "handler": HANDLER,
        "code": [str(HANDLERS_MODULE)],
        **job["common"],
        **overrides,
    }
    return EC2ClusterLaunchOperator(**params).execute(job["context"])


def instances() -> list:
    reservations = boto3.client("ec2", region_name=REGION).describe_instances()["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


@pytest.mark.parametrize(
    ("overrides", "field", "fix"),
    [
        ({"instance_type": "t9.nonsense"}, "instance_type", "instance type"),
        ({"image_id": "ami-00000000000000000"}, "image_id", "check the id and region"),
        ({"num_workers": 0}, "num_workers", "positive integer"),
        ({"num_workers": -3}, "num_workers", "positive integer"),
        ({"num_workers": 2, "min_workers": 3}, "min_workers", "more than num_workers"),
        ({"min_workers": 0}, "min_workers", "below 1"),
        ({"requirements": [f"package-{uuid.uuid4().hex}==1"]}, "requirements: no wheel of 'package-", "AMI"),
        ({"requirements": ["s3://bucket/wheel.whl"]}, "requirements", "pip cannot install s3://"),
        ({"code": ["/no/such/module.py"]}, "code", "not found"),
        (
            {"handler": {"type": "python", "target": "mytasks:run"}},
            "handler.target: module 'mytasks'",
            "code=",
        ),
        (
            {"worker_options": {"output": {"type": "custom", "target": "mysinks:Sink"}}},
            "output.target: module 'mysinks'",
            "code=",
        ),
        ({"python_version": "3.x"}, "python_version", ""),
        ({"boot_timeout": 1}, "boot_timeout", "at least 10"),
        ({"handler": {"type": "python", "target": "not an import path"}}, "handler.target", ""),
        ({"worker_options": {"max_messages": 0}}, "max_messages", ""),
        ({"worker_options": {"visibility_timeout_seconds": -1}}, "visibility_timeout_seconds", ""),
        ({"worker_options": {"wait_time_seconds": 21}}, "wait_time_seconds", ""),
    ],
)
def test_bad_launch_input_names_the_field_and_launches_nothing(job, overrides, field, fix):
    with pytest.raises(AirflowException, match="nothing was launched") as raised:
        launch(job, **overrides)
    assert field in str(raised.value) and fix in str(raised.value)
    assert instances() == []


def test_a_queue_url_of_another_region_is_refused(job):
    other = "https://sqs.eu-west-1.amazonaws.com/123456789012/other-tasks"
    with pytest.raises(AirflowException, match="queue_url"):
        launch(job, queue_url=other)
    assert instances() == []


def test_a_missing_output_table_is_refused(job):
    with pytest.raises(AirflowException, match="output.table"):
        launch(job, worker_options={"output": {"type": "dynamodb", "table": "no-such-table"}})
    assert instances() == []


def enqueue(aws_job_common, context, **source):
    return EC2ClusterEnqueueOperator(task_id="enqueue", **aws_job_common, **source).execute(context)


def queues_of(cluster_id: str) -> list[str]:
    """The cluster's queues: bad input creates none."""
    return (
        boto3.client("sqs", region_name=REGION)
        .list_queues(QueueNamePrefix=QUEUE_NAME_PREFIX + cluster_id)
        .get("QueueUrls", [])
    )


def fresh(aws_common: dict) -> dict:
    return {**aws_common, "cluster_id": f"bad-{uuid.uuid4().hex[:8]}"}


def test_a_payload_that_is_not_json_is_refused_before_sending(job):
    common = fresh(job["common"])
    with pytest.raises(Exception, match=r"tasks\[0\]: payload of task t000000000 is not JSON-serialisable"):
        enqueue(common, job["context"], tasks=[{"when": object()}])
    assert queues_of(common["cluster_id"]) == []


def test_a_payload_over_the_sqs_limit_is_refused_naming_the_task_and_limit(job):
    common = fresh(job["common"])
    with pytest.raises(Exception, match=f"t000000000 .*{MAX_MESSAGE_BYTES:,} bytes") as raised:
        enqueue(common, job["context"], tasks=[{"blob": "x" * MAX_MESSAGE_BYTES}])
    assert isinstance(raised.value, MessageTooLarge) or isinstance(raised.value.__cause__, MessageTooLarge)
    assert queues_of(common["cluster_id"]) == []


def test_the_sqs_size_limit_is_defined_once():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    holders = [
        str(p.relative_to(root))
        for p in [*root.joinpath("airflow_ec2cluster").rglob("*.py"), *root.joinpath("worker").rglob("*.py")]
        if "localcloud" not in p.parts and ("1_048_576" in p.read_text() or "1048576" in p.read_text())
    ]
    assert holders == ["airflow_ec2cluster/packing.py"]


def test_a_broken_manifest_line_is_reported_by_line_number(job):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="manifests")
    lines = [json.dumps({"n": 1}), json.dumps({"n": 2}), "", '{"n": 3', json.dumps({"n": 4})]
    s3.put_object(Bucket="manifests", Key="job.jsonl", Body="\n".join(lines).encode())
    common = fresh(job["common"])
    with pytest.raises(Exception, match=r"line 4 of s3_uri s3://manifests/job.jsonl: not valid JSON"):
        enqueue(common, job["context"], s3_uri="s3://manifests/job.jsonl")


# -- arbitrary message bodies never crash a worker ----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.text(max_size=300),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"task_id": st.one_of(st.text(max_size=30), json_values), "payload": json_values}
    ).map(json.dumps),
)


@pytest.fixture(scope="module")
def worker():
    """A real Worker on moto in-process, with a handler that raises on odd payloads."""
    import io

    from ec2cluster_worker.aws import AwsClients
    from ec2cluster_worker.config import WorkerConfig
    from ec2cluster_worker.handlers import PythonHandler
    from ec2cluster_worker.logs import EventLog
    from ec2cluster_worker.loop import Worker
    from ec2cluster_worker.sinks import InlineDynamoDBSink
    from ec2cluster_worker.status import StatusWriter, WorkerStatus

    with mock_aws():
        from tests.worker.cloud import create_state_table

        table = create_state_table()
        queue_url = boto3.client("sqs", region_name=REGION).create_queue(QueueName="fuzz-tasks")["QueueUrl"]
        config = WorkerConfig.from_dict(
            {
                "cluster_id": "fuzz",
                "region": REGION,
                "queue_url": queue_url,
                "state_table": table,
                "handler": HANDLER,
            }
        )
        clients = AwsClients(REGION)
        status = WorkerStatus()
        log = EventLog(io.StringIO())
        writer = StatusWriter(
            clients.dynamodb, table, status, cluster_id="fuzz", worker_id="w", retention_seconds=60, log=log
        )
        yield Worker(
            config=config,
            worker_id="w",
            clients=clients,
            handler=PythonHandler(lambda payload, context: {"n": 2 * payload["n"]}),
            sink=InlineDynamoDBSink(),
            log=log,
            status=status,
            status_writer=writer,
        )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_arbitrary_message_bodies_never_crash_a_worker(worker, body):
    message = {
        "MessageId": str(uuid.uuid4()),
        "ReceiptHandle": "not-a-real-receipt-handle",
        "Body": body,
        "Attributes": {"ApproximateReceiveCount": "1"},
    }
    worker.process_batch([message])  # must not raise
    assert worker.exit_code == 0
