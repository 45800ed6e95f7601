"""EC2ClusterLaunchOperator against moto: validation first, one fleet launch, idempotent retry, cleanup."""

from __future__ import annotations

import base64
import os

import boto3
import pytest
from airflow.sdk.exceptions import AirflowException

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.meta import MetaUpdate
from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator
from airflow_ec2cluster.userdata import parse_user_data
from tests.network_layouts import add_nat_gateway, private_vpc
from tests.plugin.conftest import REGION

TABLE = "ec2cluster-state-test"
HANDLER = {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"}


def launch(cluster_id: str, ami_id: str, **kwargs) -> EC2ClusterLaunchOperator:
    params = {
        "task_id": "launch",
        "cluster_id": cluster_id,
        "state_table": TABLE,
        "aws_conn_id": None,
        "region_name": REGION,
        "num_workers": 2,
        "image_id": ami_id,
        "instance_type": "t3.micro",
        "handler": HANDLER,
        "worker_options": {"idle_shutdown_seconds": 60},
    }
    params.update(kwargs)
    return EC2ClusterLaunchOperator(**params)


@pytest.fixture
def queues(aws, context, cluster_id):
    return EC2ClusterEnqueueOperator(
        task_id="enqueue",
        cluster_id=cluster_id,
        state_table=TABLE,
        aws_conn_id=None,
        region_name=REGION,
        tasks=[1],
    ).execute(context)


def record_calls(operator, operation: str) -> list[dict]:
    calls: list[dict] = []

    def on_call(model, params, **_):
        if model.name == operation:
            calls.append(dict(params))

    # The API parameters as given (before-call sees the serialised request instead).
    operator.hook.ec2.meta.events.register("before-parameter-build", on_call)
    return calls


def cluster_instances(cluster_id: str, states=("pending", "running")) -> list[dict]:
    reservations = boto3.client("ec2", region_name=REGION).describe_instances(
        Filters=[
            {"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def test_validation_errors_launch_nothing_and_name_every_field(queues, context, cluster_id, ami_id):
    operator = launch(
        cluster_id,
        "ami-00000000",
        instance_type="t9.nonexistent",
        handler={"type": "python"},
        instance_profile="no-such-profile",
        security_group_ids=["sg-12345678"],
        log_retention_days=10,
    )
    runs = record_calls(operator, "CreateFleet")
    templates = record_calls(operator, "CreateLaunchTemplate")
    with pytest.raises(AirflowException) as raised:
        operator.execute(context)
    message = str(raised.value)
    fields = ("image_id", "instance_type", "handler.target", "instance_profile", "security_group_ids")
    for field in (*fields, "log_retention_days: 10 is not a retention CloudWatch Logs offers"):
        assert field in message
    assert runs == [] and templates == []
    assert boto3.client("logs", region_name=REGION).describe_log_groups()["logGroups"] == []
    assert cluster_instances(cluster_id, ("pending", "running", "stopped")) == []


def test_user_data_too_large_is_a_validation_error(queues, context, cluster_id, ami_id, instance_profile):
    sink = {
        "type": "custom",
        "target": "ec2cluster_worker.sinks:NoSuchSink",
        "options": {"blob": os.urandom(20_000).hex()},
    }
    operator = launch(cluster_id, ami_id, worker_options={"output": sink})
    with pytest.raises(AirflowException, match="user data: .*16,384"):
        operator.execute(context)
    assert cluster_instances(cluster_id) == []


def test_bad_fleet_choices_are_validation_errors(queues, context, cluster_id, ami_id, instance_profile):
    operator = launch(
        cluster_id,
        ami_id,
        instance_type=["t3.micro", "t9.nonexistent"],
        capacity="cheap",
        on_demand_strategy="random",
        max_workers=1,
        max_cost="ten dollars",
        slots_per_instance=0,
    )
    runs = record_calls(operator, "CreateFleet")
    with pytest.raises(AirflowException) as raised:
        operator.execute(context)
    message = str(raised.value)
    for field in (
        "instance_type: 't9.nonexistent'",
        "capacity: 'cheap'",
        "on_demand_strategy",
        "max_workers",
        "max_cost: 'ten dollars' is not a positive number of US dollars",
        "slots_per_instance: 0 is not a number of slots",
    ):
        assert field in message
    assert runs == [] and cluster_instances(cluster_id) == []


def test_slots_per_instance_goes_into_the_worker_configuration(ami_id):
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/ec2cluster-c-tasks"
    assert (
        launch("c", ami_id, slots_per_instance="4").worker_config("c", REGION, url)["slots_per_instance"] == 4
    )
    assert "slots_per_instance" not in launch("c", ami_id).worker_config("c", REGION, url)


def template_data(template_id: str) -> dict:
    ec2 = boto3.client("ec2", region_name=REGION)
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Latest"])
    return versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]


def test_missing_queue_is_reported(aws, context, cluster_id, ami_id, instance_profile):
    with pytest.raises(AirflowException, match="run EC2ClusterEnqueueOperator"):
        launch(cluster_id, ami_id).execute(context)


def test_one_fleet_launch_from_a_launch_template_with_the_right_parameters(
    queues, context, cluster_id, ami_id, instance_profile
):
    operator = launch(cluster_id, ami_id, volume_size_gb=20, tags={"team": "data"})
    runs = record_calls(operator, "CreateFleet")
    descriptor = operator.execute(context)

    assert len(runs) == 1
    params = runs[0]
    assert params["Type"] == "instant" and params["ClientToken"] == f"{cluster_id}-launch"
    assert params["TargetCapacitySpecification"]["TotalTargetCapacity"] == 2
    assert params["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "on-demand"
    assert params["OnDemandOptions"] == {"AllocationStrategy": "lowest-price"} and "SpotOptions" not in params
    tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
    assert (
        tags[TAG_CLUSTER_ID] == cluster_id and tags["ec2cluster:role"] == "worker" and tags["team"] == "data"
    )
    (config,) = params["LaunchTemplateConfigs"]
    template_id = config["LaunchTemplateSpecification"]["LaunchTemplateId"]
    assert descriptor["launch_spec"]["launch_template_id"] == template_id
    # network="public" (the default): one pool per default subnet, a public IP, the cluster's own group.
    ec2 = boto3.client("ec2", region_name=REGION)
    default_subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
        "Subnets"
    ]
    assert {o["SubnetId"] for o in config["Overrides"]} <= {s["SubnetId"] for s in default_subnets}
    assert {o["InstanceType"] for o in config["Overrides"]} == {"t3.micro"}
    data = template_data(template_id)
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["IamInstanceProfile"] == {"Name": instance_profile}
    interface = data["NetworkInterfaces"][0]
    assert interface["AssociatePublicIpAddress"] is True
    (group,) = ec2.describe_security_groups(GroupIds=interface["Groups"])["SecurityGroups"]
    assert group["GroupName"] == f"ec2cluster-{cluster_id}" and group["IpPermissions"] == []
    assert descriptor["launch_spec"]["security_group_ids"] == [group["GroupId"]]
    ebs = data["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True and ebs["VolumeSize"] == 20
    script = parse_user_data(base64.b64decode(data["UserData"]))
    assert cluster_id in script and queues["queue_url"] in script
    # The workers' log group, made before they start: tagged with the cluster, kept 30 days by default;
    # the workers are told it in their configuration, the drain in the launch spec.
    logs = boto3.client("logs", region_name=REGION)
    (group,) = logs.describe_log_groups(logGroupNamePrefix=f"/ec2cluster/{cluster_id}")["logGroups"]
    assert group["logGroupName"] == f"/ec2cluster/{cluster_id}" and group["retentionInDays"] == 30
    assert logs.list_tags_for_resource(resourceArn=group["arn"].removesuffix(":*"))["tags"] == {
        "team": "data",
        TAG_CLUSTER_ID: cluster_id,
    }
    assert f'"log_group": "/ec2cluster/{cluster_id}"' in script
    assert descriptor["launch_spec"]["log_group"] == f"/ec2cluster/{cluster_id}"

    instances = cluster_instances(cluster_id)
    ids = sorted(i["InstanceId"] for i in instances)
    assert sorted(descriptor["instance_ids"]) == ids and len(ids) == 2
    assert all("InstanceLifecycle" not in i for i in instances)  # on-demand
    assert context["ti"].pushed["instance_ids"] == descriptor["instance_ids"]
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id)
    assert sorted(meta.instance_ids) == ids and meta.num_workers == 2 and meta.max_workers == 2
    assert meta.max_cost is None  # no cap given
    assert meta.launch_history[-1]["launched"] == 2 and meta.launch_failures == 0
    assert descriptor["queue_url"] == queues["queue_url"] and descriptor["dlq_url"] == queues["dlq_url"]
    assert descriptor["launch_spec"]["root_device_name"]


def test_spot_and_no_public_ip_when_asked(queues, context, cluster_id, ami_id, instance_profile):
    ec2 = boto3.client("ec2", region_name=REGION)
    layout = private_vpc(ec2)
    add_nat_gateway(ec2, layout)
    subnet = layout.private_subnet
    operator = launch(
        cluster_id, ami_id, spot=True, spot_max_price="0.05", network="private", subnet_id=subnet
    )
    runs = record_calls(operator, "CreateFleet")
    operator.execute(context)
    params = runs[0]
    assert params["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "spot"
    assert params["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
    (override,) = params["LaunchTemplateConfigs"][0]["Overrides"]
    assert override["MaxPrice"] == "0.05" and override["SubnetId"] == subnet
    template_id = params["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["LaunchTemplateId"]
    assert template_data(template_id)["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False
    assert {i.get("InstanceLifecycle") for i in cluster_instances(cluster_id)} == {"spot"}


def test_retried_launch_finds_the_existing_cluster(queues, context, cluster_id, ami_id, instance_profile):
    first = launch(cluster_id, ami_id).execute(context)
    retry = launch(cluster_id, ami_id)
    runs = record_calls(retry, "CreateFleet")
    second = retry.execute(context)
    assert runs == [] and sorted(second["instance_ids"]) == sorted(first["instance_ids"])
    assert len(cluster_instances(cluster_id)) == 2


def test_retry_after_a_crash_before_recording_ids_finds_them_by_tag(
    queues, context, cluster_id, ami_id, instance_profile
):
    first = launch(cluster_id, ami_id).execute(context)
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    hook.update_meta(TABLE, cluster_id, MetaUpdate(instance_ids=[]))  # as if the first try died here
    retry = launch(cluster_id, ami_id)
    runs = record_calls(retry, "CreateFleet")
    second = retry.execute(context)
    assert runs == [] and sorted(second["instance_ids"]) == sorted(first["instance_ids"])
    assert sorted(hook.get_meta(TABLE, cluster_id).instance_ids) == sorted(first["instance_ids"])


def test_failure_after_launch_terminates_what_it_started(
    queues, context, cluster_id, ami_id, instance_profile
):
    def broken_push(key, value):
        raise RuntimeError("xcom backend down")

    context["ti"].xcom_push = broken_push
    with pytest.raises(RuntimeError, match="xcom backend down"):
        launch(cluster_id, ami_id).execute(context)
    assert cluster_instances(cluster_id) == []
    assert len(cluster_instances(cluster_id, ("shutting-down", "terminated"))) == 2
    # The ids were recorded before the failure, so nothing is orphaned even without the tag look-up.
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id)
    assert len(meta.instance_ids) == 2


def test_on_kill_terminates_launched_instances(queues, context, cluster_id, ami_id, instance_profile):
    operator = launch(cluster_id, ami_id)
    operator.execute(context)
    operator.on_kill()
    assert cluster_instances(cluster_id) == []


def test_instance_requirements_add_the_matching_types_after_the_named_ones(
    queues, context, cluster_id, ami_id, instance_profile
):
    operator = launch(cluster_id, ami_id, instance_requirements={"vcpus": [2, 2], "memory_gib": [4, 4]})
    runs = record_calls(operator, "CreateFleet")
    operator.execute(context)
    types = list(dict.fromkeys(o["InstanceType"] for o in runs[0]["LaunchTemplateConfigs"][0]["Overrides"]))
    assert types[0] == "t3.micro" and len(types) > 2
    ec2 = boto3.client("ec2", region_name=REGION)
    for info in ec2.describe_instance_types(InstanceTypes=types[1:])["InstanceTypes"]:
        assert info["VCpuInfo"]["DefaultVCpus"] == 2 and info["MemoryInfo"]["SizeInMiB"] == 4096
