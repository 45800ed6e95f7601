"""What a worker's task must not do, tried from a real worker with its instance credentials, and refused.

The task code runs as root on the instance with the instance profile's role (credentials from the
instance metadata service). The controller launches replacements from the META item (launch spec, cluster
size) and the user data it holds, and they boot the cluster's bundle in S3: a task that could rewrite
META or the bundle could choose what the controller launches, or stop its replacements from booting.
The policies (``ec2cluster iam-policy``) let a worker write its status and task-log items only; the local
cloud enforces them as IAM does.
"""

from __future__ import annotations

import hashlib
import json

import boto3
import pytest
from botocore.exceptions import ClientError

from airflow_ec2cluster.aws.s3 import bundle_object_key
from airflow_ec2cluster.bundle import Target, build_bundle
from airflow_ec2cluster.cluster import task_queue_name
from airflow_ec2cluster.defaults import DEFAULT_BUNDLE_BUCKET_FORMAT, DEFAULT_BUNDLE_PREFIX

from .harness import HANDLERS_MODULE, Job

ACCESS_ERRORS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_task_cannot_rewrite_what_the_controller_launches_from(cloud_env):
    unrelated = boto3.client("sqs").create_queue(QueueName="unrelated-jobs")["QueueUrl"]
    job = Job(cloud_env, "tamper")
    own_queue = f"{cloud_env.endpoint_url}/123456789012/{task_queue_name(job.cluster_id)}"
    # Where the launch will store the cluster's bundle (the default bucket; the bundle's SHA-256 names it).
    bundle = build_bundle([str(HANDLERS_MODULE)], [], Target(python_version=None))
    bucket = DEFAULT_BUNDLE_BUCKET_FORMAT.format(account="123456789012", region=cloud_env.region)
    key = bundle_object_key(DEFAULT_BUNDLE_PREFIX, job.cluster_id, bundle.sha256)
    payload = {
        "region": cloud_env.region,
        "state_table": job.state_table,
        "unrelated_queue_url": unrelated,
        "own_queue_url": own_queue,
        "bundle_bucket": bucket,
        "bundle_key": key,
    }
    job.enqueue([payload])
    job.launch(1, "handlers:tamper")
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
        "overwrite the cluster's bundle",
        "receive from an unrelated queue",
        "delete its own task queue",
    }
    assert all(code in ACCESS_ERRORS for code in answers.values()), answers
    assert (
        meta_after.launch_spec == meta_before.launch_spec
        and meta_after.num_workers == meta_before.num_workers
    )
    stored = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == bundle.sha256  # what replacements boot is unchanged

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
