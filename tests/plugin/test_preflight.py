"""The launch's network preflight (and ``ec2cluster doctor``): broken layouts launch nothing and say why.

On moto in-process, whose default VPC the local cloud's patches make like AWS's (an internet gateway, the
route 0.0.0.0/0 to it). Each layout is built with the EC2 API as a user would build it.
"""

from __future__ import annotations

import argparse

import boto3
import pytest
from airflow.sdk.exceptions import AirflowException

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID
from airflow_ec2cluster.commands import doctor
from airflow_ec2cluster.operators import EC2ClusterTeardownOperator
from tests.network_layouts import (
    add_endpoints,
    add_nat_gateway,
    default_vpc,
    group_without_egress,
    private_vpc,
)
from tests.plugin.conftest import REGION
from tests.plugin.test_launch import TABLE, cluster_instances, launch, record_calls, template_data
from tests.plugin.test_launch import queues as queues  # noqa: F401  (the fixture)


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name=REGION)


def cluster_groups(ec2, cluster_id: str) -> list[str]:
    found = ec2.describe_security_groups(Filters=[{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}])
    return [g["GroupId"] for g in found["SecurityGroups"]]


def refused(operator, context) -> str:
    runs = record_calls(operator, "CreateFleet")
    with pytest.raises(AirflowException) as raised:
        operator.execute(context)
    assert runs == []
    return str(raised.value)


def test_the_default_vpc_works_in_public_mode_and_teardown_deletes_the_clusters_group(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    descriptor = launch(cluster_id, ami_id).execute(context)
    (group,) = cluster_groups(ec2, cluster_id)
    assert descriptor["launch_spec"]["security_group_ids"] == [group]
    assert descriptor["launch_spec"]["associate_public_ip"] is True
    assert len(descriptor["launch_spec"]["subnet_ids"]) == 6  # one default subnet per zone of us-east-1
    result = EC2ClusterTeardownOperator(
        task_id="teardown",
        cluster_id=cluster_id,
        state_table=TABLE,
        aws_conn_id=None,
        region_name=REGION,
        waiter_delay=1,
    ).execute(context)
    assert result["security_groups_deleted"] == [group] and cluster_groups(ec2, cluster_id) == []


def test_a_private_subnet_with_neither_nat_nor_endpoints_launches_nothing(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    layout = private_vpc(ec2)
    message = refused(
        launch(cluster_id, ami_id, network="private", subnet_ids=[layout.private_subnet]),
        context,
    )
    assert f"subnet {layout.private_subnet} (us-east-1a) of {layout.vpc_id}" in message
    assert "cannot reach dynamodb, sqs" in message and "has no route for 0.0.0.0/0" in message
    assert f"gateway endpoint com.amazonaws.{REGION}.dynamodb" in message
    assert f"interface endpoint com.amazonaws.{REGION}.sqs" in message and "NAT gateway" in message
    # Nothing was created: no instance, no security group.
    assert cluster_instances(cluster_id, ("pending", "running", "stopped")) == []
    assert cluster_groups(ec2, cluster_id) == []


def test_public_mode_in_a_private_subnet_says_what_would_work(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    layout = private_vpc(ec2)
    message = refused(launch(cluster_id, ami_id, subnet_id=layout.private_subnet), context)
    assert f"route table {layout.private_table} has no route for 0.0.0.0/0" in message
    assert "a subnet whose route table sends 0.0.0.0/0 to an internet gateway" in message
    # With a NAT gateway the same subnet works in either mode (a public IP would only be billed).
    add_nat_gateway(ec2, layout)
    launch(cluster_id, ami_id, subnet_id=layout.private_subnet, network="private").execute(context)


def test_endpoints_without_s3_refuse_the_launch_the_bundle_could_not_reach_the_instances(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    layout = private_vpc(ec2)
    add_endpoints(ec2, layout, REGION, services=("dynamodb", "sqs"))
    operator = launch(cluster_id, ami_id, network="private", subnet_ids=[layout.private_subnet])
    message = refused(operator, context)
    assert "cannot reach s3" in message and "gateway endpoint" in message
    assert "dynamodb" not in message.split("Fix:")[0]  # the endpoints carry those


def test_endpoints_launch_in_a_private_subnet_without_internet(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    layout = private_vpc(ec2)
    add_endpoints(ec2, layout, REGION)
    operator = launch(cluster_id, ami_id, network="private", subnet_ids=[layout.private_subnet])
    runs = record_calls(operator, "CreateFleet")
    operator.execute(context)
    (params,) = runs
    (config,) = params["LaunchTemplateConfigs"]
    assert [o["SubnetId"] for o in config["Overrides"]] == [layout.private_subnet]
    template = template_data(config["LaunchTemplateSpecification"]["LaunchTemplateId"])
    assert template["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False


def test_an_interface_endpoint_in_the_default_group_does_not_admit_the_cluster(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    layout = private_vpc(ec2)
    add_endpoints(ec2, layout, REGION, services=("dynamodb",))
    ec2.create_vpc_endpoint(  # no security group: the VPC's default one, which admits only its members
        VpcId=layout.vpc_id,
        ServiceName=f"com.amazonaws.{REGION}.sqs",
        VpcEndpointType="Interface",
        SubnetIds=[layout.private_subnet],
        PrivateDnsEnabled=True,
    )
    message = refused(
        launch(cluster_id, ami_id, network="private", subnet_ids=[layout.private_subnet]),
        context,
    )
    assert "for sqs does not admit the instances on TCP 443" in message and "default group" in message


def test_a_security_group_without_egress_launches_nothing(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    group = group_without_egress(ec2, default_vpc(ec2))
    message = refused(launch(cluster_id, ami_id, security_group_ids=[group]), context)
    assert f"security groups {group} allow no HTTPS egress (TCP 443) towards dynamodb, sqs" in message
    assert "leave security_group_ids out" in message


def test_an_image_of_another_architecture_than_the_instance_type(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    message = refused(launch(cluster_id, ami_id, instance_type="c7g.large"), context)
    assert "is x86_64 but instance_type c7g.large runs arm64" in message


def test_subnets_of_two_vpcs_and_an_unknown_network_mode(
    queues, context, cluster_id, ami_id, instance_profile, ec2
):
    first, second = private_vpc(ec2), private_vpc(ec2)
    message = refused(
        launch(cluster_id, ami_id, subnet_ids=[first.public_subnet, second.public_subnet]),
        context,
    )
    assert "the subnets are in several VPCs" in message
    message = refused(launch(cluster_id, ami_id, network="internet"), context)
    assert "network: 'internet' is not a network mode" in message


def run_doctor(*argv: str) -> int:
    """The command's handler in this process (``ec2cluster`` itself would reconfigure logging for good)."""
    parser = argparse.ArgumentParser()
    doctor.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--region", REGION, *argv])
    return args.handler(args)


def test_doctor_prints_each_subnets_paths_and_the_problems(aws, ec2, capsys):
    layout = private_vpc(ec2)
    add_endpoints(ec2, layout, REGION)
    args = ["--network", "private", "--subnet-ids", layout.private_subnet]
    assert run_doctor(*args) == 0
    out = capsys.readouterr().out
    assert f"ok   {layout.private_subnet} (us-east-1a): dynamodb via gateway endpoint vpce-" in out
    assert "sqs via interface endpoint vpce-" in out and "No problem found" in out

    assert "s3 via gateway endpoint vpce-" in out

    without_s3 = private_vpc(ec2)
    add_endpoints(ec2, without_s3, REGION, services=("dynamodb", "sqs"))
    assert run_doctor("--network", "private", "--subnet-ids", without_s3.private_subnet) == 1
    out = capsys.readouterr().out
    assert f"FAIL {without_s3.private_subnet} (us-east-1a)" in out and "s3: NO PATH" in out
    assert "1 problem(s); the launch would launch nothing" in out

    assert run_doctor() == 0  # the default VPC, public
    out = capsys.readouterr().out
    assert "Checked 6 subnet(s), network=public" in out and "via internet gateway igw-" in out
