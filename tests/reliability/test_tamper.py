"""What a worker's task must not do, tried from a real worker with its instance credentials, and refused.

The task code runs as root on the instance with the instance profile's role (credentials from the
instance metadata service). The controller launches replacements from the META item (launch spec, cluster
size) and the user data it holds: if a task could rewrite META, it could make the controller launch
instances of its choosing. The policies (``ec2cluster iam-policy``) let a worker write its status and
task-log items only; the local cloud enforces them as IAM does.
"""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.exceptions import ClientError

from airflow_ec2cluster.cluster import task_queue_name

from .harness import Job

ACCESS_ERRORS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_task_cannot_rewrite_what_the_controller_launches_from(cloud_env):
    unrelated = boto3.client("sqs").create_queue(QueueName="unrelated-jobs")["QueueUrl"]
    job = Job(cloud_env, "tamper")
    own_queue = f"{cloud_env.endpoint_url}/123456789012/{task_queue_name(job.cluster_id)}"
    payload = {
        "region": cloud_env.region,
        "state_table": job.state_table,
        "unrelated_queue_url": unrelated,
        "own_queue_url": own_queue,
    }
    job.enqueue([payload])
    job.launch(1, "tests.reliability.handlers:tamper")
    meta_before = job.hook.get_meta(job.state_table, job.cluster_id)
    summary = job.drain(timeout=120)
    meta_after = job.hook.get_meta(job.state_table, job.cluster_id)

    [result] = job.results()
    answers = result["result"]
    assert summary["tasks_done"] == 1, summary
    assert set(answers) == {
        "put META",
        "update META",
        "delete META",
        "overwrite the worker bundle",
        "receive from an unrelated queue",
        "delete its own task queue",
    }
    assert all(code in ACCESS_ERRORS for code in answers.values()), answers
    assert (
        meta_after.launch_spec == meta_before.launch_spec
        and meta_after.num_workers == meta_before.num_workers
    )

    # The controller cannot touch what is not a cluster's either.
    controller = {}
    try:
        job.hook.delete_queue(unrelated)
    except ClientError as error:
        controller["delete an unrelated queue"] = error.response["Error"]["Code"]
    untagged = boto3.client("ec2").run_instances(ImageId=cloud_env.ami_id, MinCount=1, MaxCount=1)
    untagged_id = untagged["Instances"][0]["InstanceId"]
    try:
        job.hook.terminate_instances([untagged_id], wait=False)
    except ClientError as error:
        controller["terminate an instance of no cluster"] = error.response["Error"]["Code"]
    boto3.client("ec2").terminate_instances(InstanceIds=[untagged_id])  # the root cleans up
    boto3.client("sqs").delete_queue(QueueUrl=unrelated)
    assert controller == {
        "delete an unrelated queue": "AccessDenied",
        "terminate an instance of no cluster": "UnauthorizedOperation",
    }
    job.teardown()
    job.assert_nothing_left()
    print(f"\nRELIABILITY tamper: worker={json.dumps(answers)} controller={json.dumps(controller)}")
