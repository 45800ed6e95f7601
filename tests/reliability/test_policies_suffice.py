"""The generated policies suffice: spot workers, S3 output, an output table and a redrive, with IAM enforced.

The controller is the user holding exactly ``ec2cluster iam-policy --side controller``, the workers the
role holding exactly ``--side worker`` (see conftest.py); the example DAG, status and teardown run that way
in the other end-to-end tests. Anything either side lacked would fail here with AccessDenied.
"""

from __future__ import annotations

import json

import boto3
import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.cluster import dead_letter_queue_name, task_queue_name
from airflow_ec2cluster.operators import EC2ClusterRedriveOperator

from .conftest import OUTPUT_TABLE
from .harness import Job

BUCKET = "ec2cluster-reliability-output"
TASKS = 30
POISON = {4, 17}


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_spot_workers_write_s3_output_and_the_controller_redrives_dead_letters(cloud_env):
    boto3.client("s3").create_bucket(Bucket=BUCKET)  # the account's root: the user's own bucket
    job = Job(cloud_env, "suffice")
    job.enqueue([{"n": n, "poison": n in POISON} for n in range(TASKS)], max_receive_count=1)
    job.launch(
        2,
        "handlers:poison_if_asked",
        launch_options={"spot": True},
        output={"type": "s3", "bucket": BUCKET, "prefix": "results"},
    )
    instances = job.instances(("pending", "running", "stopping", "stopped", "shutting-down", "terminated"))
    assert {i.get("InstanceLifecycle") for i in instances} == {"spot"}
    summary = job.drain(timeout=150)
    assert summary["tasks_done"] == TASKS - len(POISON) and summary["dead_lettered"] == len(POISON), summary
    keys = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"results/{job.cluster_id}/")["Contents"]
    assert len(keys) == TASKS - len(POISON)

    job.teardown()  # the workers go (a redrive with them alive would feed them the poison again)
    job.assert_nothing_left()
    redrive = EC2ClusterRedriveOperator(task_id="redrive", max_messages=len(POISON), **job.common)
    redriven = redrive.execute(job.context)
    assert redriven["redriven"] == len(POISON), redriven
    assert sorted(redriven["task_ids"]) == [f"t{n:09d}" for n in sorted(POISON)]
    sqs = boto3.client("sqs")  # the test's own clean-up: the redriven work stays queued otherwise
    for name in (task_queue_name(job.cluster_id), dead_letter_queue_name(job.cluster_id)):
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
    print(f"\nRELIABILITY policies suffice (spot, s3, redrive): summary={json.dumps(summary)[:200]}")


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_workers_write_an_output_table(cloud_env):
    dynamodb = boto3.client("dynamodb")
    if OUTPUT_TABLE not in dynamodb.list_tables()["TableNames"]:
        dynamodb.create_table(TableName=OUTPUT_TABLE, **records.STATE_TABLE_SCHEMA)
    job = Job(cloud_env, "outtable")
    job.enqueue([{"n": n} for n in range(20)])
    job.launch(2, "handlers:double", output={"type": "dynamodb", "table": OUTPUT_TABLE})
    summary = job.drain(timeout=120)
    job.teardown()
    job.assert_nothing_left()
    assert summary["tasks_done"] == 20, summary
    pages = dynamodb.get_paginator("scan").paginate(TableName=OUTPUT_TABLE)
    mine = [item for page in pages for item in page["Items"] if job.cluster_id in item["pk"]["S"]]
    assert len(mine) == 20
