"""Every statement of the generated policies is needed: without it, a documented path fails with AccessDenied.

One local cloud with IAM enforced. The controller is a user holding ``ec2cluster iam-policy --side
controller``; the worker side runs the worker's own modules with the worker role's session credentials
(what an instance gets from its metadata). For each statement there is a probe: the call path of the
project that the statement exists for. Each probe passes with the whole policy, and fails with an access
error once its statement is removed (the other statements kept). A statement without a probe fails the
test, so a statement added later must come with the path that needs it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import boto3
import botocore
import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.project import CONTROLLER_USER, apply_project_policies, iam_policy_documents
from ec2cluster_worker import boot, records
from ec2cluster_worker.aws import AwsClients
from ec2cluster_worker.cloudwatch import LogShipper
from ec2cluster_worker.config import S3OutputSpec
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.results import TaskResult
from ec2cluster_worker.sinks import DynamoDBTableSink, S3Sink, SinkContext
from ec2cluster_worker.status import StatusWriter, WorkerStatus
from ec2cluster_worker.tasklog import TaskLog
from ec2cluster_worker.taskqueue import TaskQueue

from airflow_ec2cluster.aws.fleet import create_launch_template_params
from airflow_ec2cluster.aws.s3 import bundle_object_key, cluster_bundles_prefix
from airflow_ec2cluster.calls import run_sync
from airflow_ec2cluster.capacity import launch_workers
from airflow_ec2cluster.cluster import LaunchSpec, cluster_tags, log_group_name
from airflow_ec2cluster.defaults import DEFAULT_BUNDLE_PREFIX
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.meta import MetaUpdate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OUTPUT_TABLE = "ec2cluster-necessity-out"
BUCKET = "ec2cluster-necessity"
MANIFEST = f"s3://{BUCKET}/in/tasks.jsonl"
STATE_TABLE = "ec2cluster-state"
# HeadBucket and HeadObject answer a bare HTTP status: 403 is their AccessDenied.
ACCESS_ERRORS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403"}
SPOT_ROLE = "AWSServiceRoleForEC2Spot"
HEAD_ACTIONS = {"HeadBucket": "s3:ListBucket", "HeadObject": "s3:GetObject"}
BUNDLE_FILE = Path(__file__)  # any file will do as a bundle's bytes


class Denied(Exception):
    """A probe's path was refused by IAM."""


def refused(error: Exception) -> bool:
    if isinstance(error, botocore.exceptions.ClientError):
        return error.response["Error"]["Code"] in ACCESS_ERRORS
    if isinstance(error, boto3.exceptions.S3UploadFailedError):  # boto3's transfer wraps the ClientError
        return "(AccessDenied)" in str(error)
    return isinstance(error, Denied)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with (
        LocalCloud(work_dir=tmp_path_factory.mktemp("necessity-cloud")) as cloud,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("AWS_ENDPOINT_URL", cloud.endpoint_url)  # every client of this module: the local cloud
        options = ("--output-table", OUTPUT_TABLE, "--state-table", STATE_TABLE)
        controller = apply_project_policies(cloud, *options)
        documents = iam_policy_documents(cloud.region, *options)
        root_ddb = cloud.client("dynamodb")
        for table in (STATE_TABLE, OUTPUT_TABLE):
            root_ddb.create_table(TableName=table, **records.STATE_TABLE_SCHEMA)
        cloud.client("s3").create_bucket(Bucket=BUCKET)
        cloud.client("s3").put_object(Bucket=BUCKET, Key="in/tasks.jsonl", Body=b'{"n": 1}\n')
        yield cloud, controller, documents


def controller_hook(cloud: LocalCloud, controller: dict[str, str], monkeypatch) -> EC2ClusterHook:
    monkeypatch.setenv(
        "AIRFLOW_CONN_NECESSITY",
        cloud.airflow_conn_env("necessity", credentials=controller)["AIRFLOW_CONN_NECESSITY"],
    )
    return EC2ClusterHook(aws_conn_id="necessity", region_name=cloud.region)


def worker_clients(cloud: LocalCloud) -> AwsClients:
    """The worker role's session credentials (an instance gets the same from its metadata)."""
    role = cloud.client("iam").get_role(RoleName=cloud.instance_profile_name)["Role"]["Arn"]
    credentials = cloud.client("sts").assume_role(RoleArn=role, RoleSessionName="i-necessity")["Credentials"]
    session = boto3.session.Session(
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
    )
    return AwsClients(cloud.region, session=session)


def probes(cloud: LocalCloud, hook: EC2ClusterHook) -> dict[str, Callable[[], None]]:
    """Statement Sid -> the documented path that needs it."""
    cluster = f"nec-{uuid.uuid4().hex[:8]}"
    root_ec2, root_iam = cloud.client("ec2"), cloud.client("iam")

    def spec(**extra) -> LaunchSpec:
        return LaunchSpec(
            **{"image_id": cloud.ami_id, "instance_type": "t3.micro", "user_data_b64": "", **extra}
        )

    def launch(**extra) -> None:
        """The launch: the cluster's launch template, then a fleet over it (its errors raised)."""
        launch_spec = spec(**extra)
        launch_spec = replace(
            launch_spec, launch_template_id=hook.ensure_launch_template(cluster, launch_spec)
        )
        outcome = run_sync(launch_workers(cluster, launch_spec, 1, uuid.uuid4().hex), hook)
        for error in outcome.errors:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": error.code, "Message": error.message}}, "CreateFleet"
            )

    def create_template() -> None:
        hook.ensure_launch_template(cluster, spec(user_data_b64=uuid.uuid4().hex))

    def delete_template() -> None:
        launch_spec = spec(user_data_b64=uuid.uuid4().hex)
        root_ec2.create_launch_template(**create_launch_template_params(cluster, launch_spec))
        assert hook.delete_launch_templates(cluster)

    def spot_launch_in_a_new_account() -> None:
        if any(
            r["RoleName"] == SPOT_ROLE for r in root_iam.list_roles(PathPrefix="/aws-service-role/")["Roles"]
        ):
            root_iam.delete_role(RoleName=SPOT_ROLE)
        launch(spot=True)

    def tagged_instance() -> str:
        tags = [{"Key": k, "Value": v} for k, v in cluster_tags(cluster, {}).items()]
        return root_ec2.run_instances(
            ImageId=cloud.ami_id,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]["InstanceId"]

    def terminate() -> None:
        hook.terminate_instances([tagged_instance()], wait=False)

    def read_console() -> None:
        hook.console_output(tagged_instance())

    default_vpc = root_ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]

    def create_group() -> None:
        hook.ensure_cluster_security_group(f"{cluster}-{uuid.uuid4().hex[:6]}", default_vpc["VpcId"])

    def delete_group() -> None:
        from airflow_ec2cluster.aws.ec2 import create_security_group_params

        params = create_security_group_params(f"{cluster}-{uuid.uuid4().hex[:6]}", default_vpc["VpcId"])
        params["TagSpecifications"][0]["Tags"][0]["Value"] = cluster  # the cluster tag the policy scopes
        hook.delete_security_group(root_ec2.create_security_group(**params)["GroupId"])

    def check_output_table() -> None:
        assert hook.table_exists(OUTPUT_TABLE)

    def store_and_delete_bundle() -> None:
        # What the launch and the teardown do with the cluster's bundle (the bucket exists already).
        key = bundle_object_key(DEFAULT_BUNDLE_PREFIX, cluster, "0" * 64)
        hook.put_bundle(BUNDLE_FILE, BUCKET, key, "0" * 64)
        assert hook.delete_objects_under(BUCKET, cluster_bundles_prefix(DEFAULT_BUNDLE_PREFIX, cluster)) == 1

    def check_profile() -> None:
        assert hook.instance_profile_exists(cloud.instance_profile_name)

    def make_and_read_log_group() -> None:
        # The launch makes the cluster's log group (tagged, with a retention); the drain and
        # `ec2cluster logs` read it.
        group = log_group_name(cluster)
        hook.ensure_log_group(group, cluster, 7)
        list(hook.log_events(group))

    return {
        "ClusterQueues": lambda: hook.ensure_queues(cluster),
        "StateTable": lambda: hook.update_meta(STATE_TABLE, cluster, MetaUpdate(num_workers=1)),
        "BundleBucket": lambda: hook.ensure_bundle_bucket(f"ec2cluster-nec-{uuid.uuid4().hex[:8]}"),
        "ClusterBundles": store_and_delete_bundle,
        "CheckOutputTable": check_output_table,
        "DescribeEC2": lambda: hook.network_facts(hook.default_subnet_ids(), []),
        "LaunchFleet": launch,
        "LaunchTaggedWorkers": launch,
        "CreateClusterLaunchTemplate": create_template,
        "TagLaunchTemplateAtCreation": create_template,
        "LaunchFromClusterTemplate": lambda: (launch(), delete_template()),
        "LaunchSpot": lambda: launch(spot=True),
        "LaunchFrom": launch,
        "TagAtLaunchOnly": launch,
        "TerminateClusterInstances": terminate,
        "ReadClusterConsoles": read_console,
        "CreateClusterSecurityGroup": create_group,
        "CreateSecurityGroupInVpc": create_group,
        "TagSecurityGroupAtCreation": create_group,
        "DeleteClusterSecurityGroup": delete_group,
        "PassWorkerRole": launch,
        "CheckInstanceProfile": check_profile,
        "SpotServiceLinkedRole": spot_launch_in_a_new_account,
        "ReadManifests": lambda: list(hook.iter_s3_lines(MANIFEST)),
        "ClusterLogGroups": make_and_read_log_group,
    }


def worker_probes(cloud: LocalCloud, hook: EC2ClusterHook) -> dict[str, Callable[[], None]]:
    cluster = f"nec-{uuid.uuid4().hex[:8]}"
    queue_url, _ = cloud_queues(cloud, cluster)
    clients = worker_clients(cloud)
    context = SinkContext(
        cluster_id=cluster,
        worker_id="i-necessity",
        log_shards=records.DEFAULT_LOG_SHARDS,
        retention_seconds=3600,
        clients=clients,
    )
    now = time.time()
    done = [TaskResult("t1", records.TASK_DONE, 1, "i-necessity", "m1", now, now, 1, "1")]

    def status() -> None:
        status_writer(clients, cluster).put()

    def sink(kind) -> Callable[[], None]:
        def write() -> None:
            outcome = kind().write(done)["t1"]
            if "error" in outcome:
                raise (
                    Denied(outcome["error"])
                    if "AccessDenied" in outcome["error"]
                    else AssertionError(outcome)
                )

        return write

    def ship_logs() -> None:
        # The worker's shipper: its stream in the cluster's log group (made by the launch), and its lines.
        group = log_group_name(cluster)
        with contextlib.suppress(cloud.client("logs").exceptions.ResourceAlreadyExistsException):
            cloud.client("logs").create_log_group(logGroupName=group)

        def denied(event: str, error: str) -> None:
            raise Denied(f"{event}: {error}")

        shipper = LogShipper(clients.client("logs"), group, "i-necessity", on_error=denied)
        shipper.add(time.time(), "a line")
        shipper.flush()

    task_log = TaskLog(
        clients.dynamodb,
        STATE_TABLE,
        cluster_id=cluster,
        log_shards=records.DEFAULT_LOG_SHARDS,
        retention_seconds=3600,
    )
    return {
        "TaskQueue": lambda: TaskQueue(clients.sqs, queue_url).receive(
            max_messages=1, wait_time_seconds=0, visibility_timeout=30
        ),
        "ReadClusterRecords": lambda: task_log.done_before(["t1"]),
        "ShipLogs": ship_logs,
        "WriteStatusAndTaskLog": status,
        "OutputTable": sink(lambda: DynamoDBTableSink(OUTPUT_TABLE, context)),
        "S3Output": sink(lambda: S3Sink(S3OutputSpec(bucket=BUCKET, prefix="out"), context)),
        "ReadClusterBundle": lambda: fetch_bundle_as_the_boot_loader(cloud, cluster),
        # A task's attempt to rewrite its cluster's bundle (S3Output's default allows any bucket).
        "ProtectClusterBundles": lambda: clients.client("s3").put_object(
            Bucket=BUCKET, Key=bundle_object_key(DEFAULT_BUNDLE_PREFIX, cluster, "0" * 64), Body=b"evil"
        ),
    }


def fetch_bundle_as_the_boot_loader(cloud: LocalCloud, cluster: str) -> None:
    """The boot loader's signed S3 GetObject of the cluster's bundle, with the worker role's credentials."""
    key = bundle_object_key(DEFAULT_BUNDLE_PREFIX, cluster, "0" * 64)
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=b"zip")  # as the launch stored it
    role = cloud.client("iam").get_role(RoleName=cloud.instance_profile_name)["Role"]["Arn"]
    issued = cloud.client("sts").assume_role(RoleArn=role, RoleSessionName="i-necessity")["Credentials"]
    # As instance metadata gives them.
    credentials = {"AccessKeyId": issued["AccessKeyId"], "SecretAccessKey": issued["SecretAccessKey"]}
    credentials["Token"] = issued["SessionToken"]
    try:
        boot.aws_request(
            "s3",
            "GET",
            boot.s3_object_url(BUCKET, key, cloud.region),
            region=cloud.region,
            credentials=credentials,
        ).read()
    except boot.BootError as error:
        if error.status == 403:
            raise Denied(str(error)) from error
        raise


def status_writer(clients: AwsClients, cluster: str) -> StatusWriter:
    """The worker's own status writer (its heartbeat's PutItem), for ``cluster``."""
    return StatusWriter(
        clients.dynamodb,
        STATE_TABLE,
        WorkerStatus(),
        cluster_id=cluster,
        worker_id="i-necessity",
        retention_seconds=3600,
        log=EventLog(),
    )


def cloud_queues(cloud: LocalCloud, cluster: str) -> tuple[str, str]:
    from airflow_ec2cluster.cluster import dead_letter_queue_name, task_queue_name

    sqs = cloud.client("sqs")
    return (
        sqs.create_queue(QueueName=task_queue_name(cluster))["QueueUrl"],
        sqs.create_queue(QueueName=dead_letter_queue_name(cluster))["QueueUrl"],
    )


def without(document: dict, sid: str) -> dict:
    return {**document, "Statement": [s for s in document["Statement"] if s["Sid"] != sid]}


@pytest.mark.parametrize("side", ["controller", "worker"])
def test_each_statement_is_needed_by_a_documented_path(world, monkeypatch, side):
    cloud, controller, documents = world
    document = documents[side]
    hook = controller_hook(cloud, controller, monkeypatch)
    apply = (
        (lambda d: cloud.set_user_policy(CONTROLLER_USER, d))
        if side == "controller"
        else cloud.set_worker_policy
    )
    make = probes if side == "controller" else worker_probes
    sids = [s["Sid"] for s in document["Statement"] if s["Effect"] == "Allow"]
    denials = [s["Sid"] for s in document["Statement"] if s["Effect"] == "Deny"]
    assert sorted(make(cloud, hook)) == sorted(sids + denials), (
        "every statement needs a probe, and only those"
    )
    outcome = {}
    try:
        for sid in denials:
            # A Deny is needed when, without it, what it refuses would be allowed.
            apply(document)
            with pytest.raises(Exception) as caught:
                make(cloud, hook)[sid]()
            assert refused(caught.value), f"{sid}: {caught.value!r}"
            apply(without(document, sid))
            make(cloud, hook)[sid]()
            outcome[sid] = "allowed without it"
        for sid in sids:
            apply(document)
            make(cloud, hook)[sid]()  # passes with the whole policy
            apply(without(document, sid))
            with pytest.raises(Exception) as caught:
                make(cloud, hook)[sid]()
            assert refused(caught.value), f"{sid}: removed, its path failed otherwise: {caught.value!r}"
            # The refusal names an action of the removed statement: it is that statement the path needed.
            actions = next(s["Action"] for s in document["Statement"] if s["Sid"] == sid)
            # (HEAD requests get a bare 403, without a message: their action is the operation's.)
            head = HEAD_ACTIONS.get(getattr(caught.value, "operation_name", ""))
            assert head in actions or any(f"perform: {action} " in str(caught.value) for action in actions), (
                sid,
                caught.value,
            )
            outcome[sid] = getattr(caught.value, "response", {}).get("Error", {}).get("Code", "Denied")
    finally:
        apply(document)
    print(f"\nIAM necessity ({side}): " + json.dumps(outcome))


def test_a_role_per_dag_keeps_each_dags_workers_to_its_own_clusters(world, monkeypatch):
    cloud, controller, documents = world
    from ec2cluster_localcloud.project import iam_policy_documents as documents_for

    from airflow_ec2cluster.cluster import cluster_id_for

    scoped = documents_for(cloud.region, "--dag-id", "nightly_etl", "--state-table", STATE_TABLE)
    own, other = cluster_id_for("nightly_etl", "run-1"), cluster_id_for("hourly_report", "run-1")
    found = {}
    try:
        cloud.set_worker_policy(scoped["worker"])
        cloud.set_user_policy(CONTROLLER_USER, scoped["controller"])
        clients = worker_clients(cloud)
        for cluster in (own, other):
            try:
                status_writer(clients, cluster).put()
                found[f"worker writes status of {cluster}"] = "allowed"
            except botocore.exceptions.ClientError as error:
                found[f"worker writes status of {cluster}"] = error.response["Error"]["Code"]
            hook = controller_hook(cloud, controller, monkeypatch)
            try:
                hook.ensure_queues(cluster)
                found[f"controller creates queues of {cluster}"] = "allowed"
            except botocore.exceptions.ClientError as error:
                found[f"controller creates queues of {cluster}"] = error.response["Error"]["Code"]
    finally:
        cloud.set_worker_policy(documents["worker"])
        cloud.set_user_policy(CONTROLLER_USER, documents["controller"])
    assert found == {
        f"worker writes status of {own}": "allowed",
        f"controller creates queues of {own}": "allowed",
        f"worker writes status of {other}": "AccessDeniedException",
        f"controller creates queues of {other}": "AccessDenied",
    }
    print("\nIAM role per DAG: " + json.dumps(found))
