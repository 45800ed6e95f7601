"""VPC layouts the networking tests build with any EC2 client (moto in-process, or the local cloud's).

A layout is a VPC (10.<n>.0.0/16) with a public subnet (route 0.0.0.0/0 to an internet gateway) and a
private subnet with a route table of its own: nothing else, until a NAT gateway or VPC endpoints are added.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

_second_octet = itertools.count(20)


@dataclass(frozen=True)
class Layout:
    vpc_id: str
    cidr: str
    public_subnet: str
    private_subnet: str
    private_table: str


def private_vpc(ec2, zone: str = "us-east-1a") -> Layout:
    n = next(_second_octet)
    cidr = f"10.{n}.0.0/16"
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    public = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.{n}.0.0/24", AvailabilityZone=zone)["Subnet"][
        "SubnetId"
    ]
    private = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.{n}.1.0/24", AvailabilityZone=zone)["Subnet"][
        "SubnetId"
    ]
    gateway = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc)
    public_table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=public_table, DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway)
    ec2.associate_route_table(RouteTableId=public_table, SubnetId=public)
    private_table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=private_table, SubnetId=private)
    return Layout(vpc, cidr, public, private, private_table)


def add_nat_gateway(ec2, layout: Layout) -> str:
    nat = ec2.create_nat_gateway(SubnetId=layout.public_subnet)["NatGateway"]["NatGatewayId"]
    ec2.create_route(RouteTableId=layout.private_table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    return nat


def add_endpoints(ec2, layout: Layout, region: str, services=("dynamodb", "sqs", "s3")) -> list[str]:
    """Gateway endpoints for S3 and DynamoDB on the private table; interface endpoints (private DNS) for
    the others, with a group that admits HTTPS from the VPC (without one, the VPC's default group would
    admit only its own members)."""
    group = None
    ids = []
    for service in services:
        name = f"com.amazonaws.{region}.{service}"
        if service in ("s3", "dynamodb"):
            answer = ec2.create_vpc_endpoint(
                VpcId=layout.vpc_id,
                ServiceName=name,
                VpcEndpointType="Gateway",
                RouteTableIds=[layout.private_table],
            )
        else:
            if group is None:
                group = https_from(ec2, layout, "endpoints")
            answer = ec2.create_vpc_endpoint(
                VpcId=layout.vpc_id,
                ServiceName=name,
                VpcEndpointType="Interface",
                SubnetIds=[layout.private_subnet],
                SecurityGroupIds=[group],
                PrivateDnsEnabled=True,
            )
        ids.append(answer["VpcEndpoint"]["VpcEndpointId"])
    return ids


def https_from(ec2, layout: Layout, name: str) -> str:
    group = ec2.create_security_group(
        GroupName=f"{name}-{layout.vpc_id}", Description=name, VpcId=layout.vpc_id
    )
    ec2.authorize_security_group_ingress(
        GroupId=group["GroupId"],
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": layout.cidr}]}
        ],
    )
    return group["GroupId"]


def group_without_egress(ec2, vpc_id: str, name: str = "locked-down") -> str:
    """A hardened account's group: EC2's default all-egress rule removed."""
    group = ec2.create_security_group(GroupName=f"{name}-{vpc_id}", Description=name, VpcId=vpc_id)["GroupId"]
    ec2.revoke_security_group_egress(
        GroupId=group, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    return group


def default_vpc(ec2) -> str:
    return ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
