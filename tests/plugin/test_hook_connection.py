"""The hook takes region, endpoints and retries from the Airflow connection (here: the shared moto server)."""

from __future__ import annotations

import json
import uuid

import boto3

from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator


def test_connection_endpoint_region_and_retries(moto_server, monkeypatch, context):
    conn_id = f"ec2c_{uuid.uuid4().hex[:8]}"
    extra = {
        "endpoint_url": moto_server,
        "region_name": "eu-west-1",
        "service_config": {"s3": {"endpoint_url": "http://127.0.0.1:9"}},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "aws", "extra": extra}))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    hook = EC2ClusterHook(aws_conn_id=conn_id)
    assert hook.region == "eu-west-1"
    assert hook.sqs.meta.endpoint_url == moto_server and hook.dynamodb.meta.endpoint_url == moto_server
    assert hook.s3.meta.endpoint_url == "http://127.0.0.1:9"  # per-service endpoint wins
    assert hook.ec2.meta.config.retries["mode"] == "standard"

    cluster_id = f"conn-{uuid.uuid4().hex[:10]}"
    table = f"state-{uuid.uuid4().hex[:8]}"
    result = EC2ClusterEnqueueOperator(
        task_id="enqueue", cluster_id=cluster_id, state_table=table, aws_conn_id=conn_id, tasks=[1, 2, 3]
    ).execute(context)
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="eu-west-1")
    attrs = sqs.get_queue_attributes(
        QueueUrl=result["queue_url"], AttributeNames=["ApproximateNumberOfMessages"]
    )
    # Three tasks, one message (ten tasks to a message by default).
    assert result["enqueued"] == 3 and attrs["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_botocore_config_from_the_operator_wins(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    hook = EC2ClusterHook(aws_conn_id=None, region_name="us-east-1", config={"retries": {"mode": "adaptive"}})
    assert hook.sqs.meta.config.retries["mode"] == "adaptive"
