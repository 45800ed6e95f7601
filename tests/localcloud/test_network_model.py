"""The network model, pure: Describe* answers (dicts in boto3's shapes) in, what an instance reaches out."""

from __future__ import annotations

import dataclasses

import pytest
from ec2cluster_localcloud.network import (
    DESTINATIONS,
    INTERNET,
    Network,
    Reachability,
    destination_of,
    reachability,
)

REGION = "us-east-1"
VPC = "vpc-1"
PUBLIC_SUBNET, PRIVATE_SUBNET = "subnet-public", "subnet-private"
MAIN_TABLE, PUBLIC_TABLE, PRIVATE_TABLE = "rtb-main", "rtb-public", "rtb-private"
IGW, NAT = "igw-1", "nat-1"
DEFAULT_GROUP, OPEN_GROUP, CLOSED_GROUP = "sg-default", "sg-open", "sg-closed"
S3_PREFIX_LIST, DYNAMODB_PREFIX_LIST = "pl-s3", "pl-ddb"
ALL_EGRESS = [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "UserIdGroupPairs": []}]


def route(destination: str, **target: str) -> dict:
    return {"DestinationCidrBlock": destination, "State": "active", "Origin": "CreateRoute", **target}


def table(table_id: str, routes: list[dict], subnet: str | None = None, main: bool = False) -> dict:
    association = {"RouteTableId": table_id, "Main": main, "AssociationState": {"State": "associated"}}
    if subnet:
        association["SubnetId"] = subnet
    return {
        "RouteTableId": table_id,
        "VpcId": VPC,
        "Associations": [association],
        "Routes": [{"DestinationCidrBlock": "10.0.0.0/16", "GatewayId": "local", "State": "active"}, *routes],
    }


def group(group_id: str, egress: list[dict], ingress: list[dict] | None = None, name: str | None = None):
    return {
        "GroupId": group_id,
        "GroupName": name or group_id,
        "VpcId": VPC,
        "IpPermissionsEgress": egress,
        "IpPermissions": ingress or [],
    }


def default_group() -> dict:
    """AWS's default group: all egress, inbound only from its own members."""
    ingress = [{"IpProtocol": "-1", "IpRanges": [], "UserIdGroupPairs": [{"GroupId": DEFAULT_GROUP}]}]
    return group(DEFAULT_GROUP, ALL_EGRESS, ingress, name="default")


def network(**changes) -> Network:
    """A VPC with a public subnet (0.0.0.0/0 to an internet gateway) and a private one (local routes only)."""
    base = Network(
        region=REGION,
        vpcs=[{"VpcId": VPC, "CidrBlock": "10.0.0.0/16", "IsDefault": False}],
        subnets=[
            {"SubnetId": PUBLIC_SUBNET, "VpcId": VPC, "CidrBlock": "10.0.0.0/24"},
            {"SubnetId": PRIVATE_SUBNET, "VpcId": VPC, "CidrBlock": "10.0.1.0/24"},
        ],
        route_tables=[
            table(MAIN_TABLE, [], main=True),
            table(PUBLIC_TABLE, [route("0.0.0.0/0", GatewayId=IGW)], subnet=PUBLIC_SUBNET),
            table(PRIVATE_TABLE, [], subnet=PRIVATE_SUBNET),
        ],
        internet_gateways=[{"InternetGatewayId": IGW, "Attachments": [{"VpcId": VPC, "State": "available"}]}],
        security_groups=[default_group(), group(OPEN_GROUP, ALL_EGRESS), group(CLOSED_GROUP, [])],
    )
    return dataclasses.replace(base, **changes)


def instance(
    subnet: str = PUBLIC_SUBNET, public_ip: str | None = "54.0.0.1", groups=(), nic_groups=()
) -> dict:
    """DescribeInstances' item, as moto answers it (no groups at launch: SecurityGroups [])."""
    answer = {
        "InstanceId": "i-0123",
        "SubnetId": subnet,
        "VpcId": VPC,
        "PrivateIpAddress": "10.0.1.10" if subnet == PRIVATE_SUBNET else "10.0.0.10",
        "SecurityGroups": [{"GroupId": g, "GroupName": g} for g in groups],
        "NetworkInterfaces": [
            {"Attachment": {"DeviceIndex": 0}, "Groups": [{"GroupId": g, "GroupName": g} for g in nic_groups]}
        ],
    }
    if public_ip:
        answer["PublicIpAddress"] = public_ip
    return answer


def gateway_endpoint(service: str, tables: list[str]) -> dict:
    return {
        "VpcEndpointId": f"vpce-{service}",
        "VpcEndpointType": "Gateway",
        "VpcId": VPC,
        "ServiceName": f"com.amazonaws.{REGION}.{service}",
        "State": "available",
        "RouteTableIds": tables,
        "SubnetIds": [],
        "Groups": [],
        "PrivateDnsEnabled": True,
    }


def with_gateway_endpoint(net: Network, service: str, prefix_list: str, table_id: str) -> Network:
    """CreateVpcEndpoint of a gateway: the endpoint, and its prefix-list route on the table (as moto does)."""
    tables = []
    for item in net.route_tables:
        if item["RouteTableId"] == table_id:
            item = {
                **item,
                "Routes": [
                    *item["Routes"],
                    {
                        "DestinationPrefixListId": prefix_list,
                        "GatewayId": f"vpce-{service}",
                        "State": "active",
                    },
                ],
            }
        tables.append(item)
    endpoints = [*net.vpc_endpoints, gateway_endpoint(service, [table_id])]
    return dataclasses.replace(net, route_tables=tables, vpc_endpoints=endpoints)


def interface_endpoint(service: str, subnets=(PRIVATE_SUBNET,), groups=(), private_dns: bool = True) -> dict:
    return {
        "VpcEndpointId": f"vpce-{service}",
        "VpcEndpointType": "Interface",
        "VpcId": VPC,
        "ServiceName": f"com.amazonaws.{REGION}.{service}",
        "State": "available",
        "RouteTableIds": [],
        "SubnetIds": list(subnets),
        "Groups": [{"GroupId": g, "GroupName": g} for g in groups],
        "PrivateDnsEnabled": private_dns,
    }


def reached(verdicts: Reachability) -> set[str]:
    return set(verdicts.reachable)


def test_a_public_ip_behind_an_internet_gateway_reaches_everything():
    verdicts = reachability(instance(), network())
    assert reached(verdicts) == set(DESTINATIONS)
    assert verdicts.verdicts["sqs"].path == f"internet gateway {IGW}"
    assert verdicts.unreachable == {}


def test_no_public_ip_behind_an_internet_gateway_reaches_nothing():
    verdicts = reachability(instance(public_ip=None), network())
    assert reached(verdicts) == set()
    assert all("no public IP" in reason and IGW in reason for reason in verdicts.unreachable.values())
    assert "AssociatePublicIpAddress=true" in verdicts.unreachable["sqs"]


def test_an_internet_gateway_not_attached_to_the_vpc_carries_nothing():
    net = network(internet_gateways=[{"InternetGatewayId": IGW, "Attachments": []}])
    verdicts = reachability(instance(), net)
    assert reached(verdicts) == set()
    assert "not attached" in verdicts.unreachable[INTERNET]


def test_a_subnet_without_its_own_table_uses_the_main_table():
    subnets = [*network().subnets, {"SubnetId": "subnet-other", "VpcId": VPC, "CidrBlock": "10.0.2.0/24"}]
    tables = [
        table(MAIN_TABLE, [route("0.0.0.0/0", GatewayId=IGW)], main=True),
        *network().route_tables[1:],
    ]
    verdicts = reachability(instance(subnet="subnet-other"), network(subnets=subnets, route_tables=tables))
    assert reached(verdicts) == set(DESTINATIONS)
    # The private subnet's own table has no default route: the main table's does not apply to it.
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET), network(route_tables=tables))
    assert reached(verdicts) == set()
    assert PRIVATE_TABLE in verdicts.unreachable["sqs"] and "0.0.0.0/0" in verdicts.unreachable["sqs"]


def test_a_blackhole_route_reaches_nothing():
    tables = [
        table(PUBLIC_TABLE, [{**route("0.0.0.0/0", GatewayId=IGW), "State": "blackhole"}], PUBLIC_SUBNET)
    ]
    verdicts = reachability(instance(), network(route_tables=tables))
    assert reached(verdicts) == set() and "blackhole" in verdicts.unreachable["s3"]


def test_private_subnet_with_a_gateway_endpoint_and_an_interface_endpoint():
    net = with_gateway_endpoint(network(), "dynamodb", DYNAMODB_PREFIX_LIST, PRIVATE_TABLE)
    net = dataclasses.replace(net, vpc_endpoints=[*net.vpc_endpoints, interface_endpoint("sqs")])
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net)
    assert reached(verdicts) == {"sqs", "dynamodb"}
    assert verdicts.verdicts["dynamodb"].path == "gateway endpoint vpce-dynamodb"
    assert verdicts.verdicts["sqs"].path == "interface endpoint vpce-sqs (private DNS)"
    assert "no route to 0.0.0.0/0" in verdicts.unreachable["s3"]


def test_a_gateway_endpoint_serves_only_the_route_tables_it_is_on():
    net = with_gateway_endpoint(network(), "s3", S3_PREFIX_LIST, PUBLIC_TABLE)
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net)
    assert "s3" not in reached(verdicts)
    # In the public subnet it takes S3's traffic, public IP or not (the prefix list is the longer match).
    verdicts = reachability(instance(public_ip=None), net)
    assert reached(verdicts) == {"s3"}


def test_an_interface_endpoint_without_private_dns_is_not_where_the_service_name_resolves():
    net = network(vpc_endpoints=[interface_endpoint("sqs", private_dns=False)])
    assert "sqs" not in reached(reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net))


def test_an_interface_endpoint_without_groups_admits_only_the_default_groups_members():
    """The default group's inbound rule admits only its own members: an instance in another group is out."""
    net = network(vpc_endpoints=[interface_endpoint("sqs")])
    assert "sqs" in reached(reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net))
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None, groups=[OPEN_GROUP]), net)
    assert "sqs" not in reached(verdicts)
    reason = verdicts.unreachable["sqs"]
    assert (
        "vpce-sqs" in reason and "inbound" in reason and DEFAULT_GROUP in reason and "default group" in reason
    )
    # Private DNS answers for the whole VPC: the public instance's SQS traffic goes there too.
    assert "sqs" not in reached(reachability(instance(groups=[OPEN_GROUP]), net))


def test_an_interface_endpoint_group_admitting_the_vpc_cidr_serves_every_instance():
    admit = [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]
    endpoint_group = group("sg-endpoint", [], admit)
    net = network(
        vpc_endpoints=[interface_endpoint("sts", groups=["sg-endpoint"])],
        security_groups=[*network().security_groups, endpoint_group],
    )
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None, groups=[OPEN_GROUP]), net)
    assert reached(verdicts) == {"sts"}


def test_interface_endpoint_egress_needs_a_cidr_covering_the_endpoints_subnet():
    narrow = [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "10.0.0.0/24"}]}]
    wide = [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]
    admit_all = [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    groups = [
        default_group(),
        group("sg-narrow", narrow),
        group("sg-wide", wide),
        group("sg-ep", [], admit_all),
    ]
    net = network(vpc_endpoints=[interface_endpoint("sqs", groups=["sg-ep"])], security_groups=groups)
    private = {"subnet": PRIVATE_SUBNET, "public_ip": None}
    assert "sqs" not in reached(reachability(instance(**private, groups=["sg-narrow"]), net))
    assert reached(reachability(instance(**private, groups=["sg-wide"]), net)) == {"sqs"}


def test_nat_gateway_in_a_public_subnet_reaches_everything():
    nat = {
        "NatGatewayId": NAT,
        "State": "available",
        "SubnetId": PUBLIC_SUBNET,
        "VpcId": VPC,
        "NatGatewayAddresses": [{"PublicIp": "3.0.0.1", "PrivateIp": "10.0.0.5"}],
    }
    tables = [
        *network().route_tables[:2],
        table(PRIVATE_TABLE, [route("0.0.0.0/0", NatGatewayId=NAT)], PRIVATE_SUBNET),
    ]
    net = network(route_tables=tables, nat_gateways=[nat])
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net)
    assert reached(verdicts) == set(DESTINATIONS)
    assert verdicts.verdicts[INTERNET].path == f"NAT gateway {NAT}"

    # A NAT gateway in a subnet without a route to an internet gateway reaches nothing.
    misplaced = network(route_tables=tables, nat_gateways=[{**nat, "SubnetId": PRIVATE_SUBNET}])
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), misplaced)
    assert reached(verdicts) == set() and "public subnet" in verdicts.unreachable[INTERNET]
    # Not yet available, or private: nothing either.
    for broken in ({**nat, "State": "pending"}, {**nat, "ConnectivityType": "private"}):
        verdicts = reachability(
            instance(subnet=PRIVATE_SUBNET, public_ip=None),
            network(route_tables=tables, nat_gateways=[broken]),
        )
        assert reached(verdicts) == set()


@pytest.mark.parametrize(
    ("egress", "expected"),
    [
        ([], set()),
        (
            [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
            set(DESTINATIONS),
        ),
        (
            [{"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
            set(DESTINATIONS),
        ),
        ([{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}], set()),
        (
            [{"IpProtocol": "udp", "FromPort": 0, "ToPort": 65535, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
            set(),
        ),
        # A narrower public CIDR is not taken to cover AWS's addresses.
        ([{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "52.0.0.0/8"}]}], set()),
        # The prefix list of a gateway endpoint: that service only.
        (
            [
                {
                    "IpProtocol": "tcp",
                    "FromPort": 443,
                    "ToPort": 443,
                    "PrefixListIds": [{"PrefixListId": DYNAMODB_PREFIX_LIST}],
                }
            ],
            {"dynamodb"},
        ),
    ],
    ids=["no-egress", "https", "all-tcp", "http-only", "udp-only", "narrow-public-cidr", "prefix-list"],
)
def test_security_group_egress(egress, expected):
    net = with_gateway_endpoint(network(), "dynamodb", DYNAMODB_PREFIX_LIST, PUBLIC_TABLE)
    net = dataclasses.replace(net, security_groups=[*net.security_groups, group("sg-test", egress)])
    verdicts = reachability(instance(groups=["sg-test"]), net)
    assert reached(verdicts) == expected
    if not expected:
        assert "sg-test" in verdicts.unreachable["sqs"] and "egress" in verdicts.unreachable["sqs"]


def test_groups_come_from_the_primary_interface_and_default_to_the_vpcs_default_group():
    # RunInstances with NetworkInterfaces[0].Groups: moto answers SecurityGroups [] and the groups on the ENI.
    assert reached(reachability(instance(nic_groups=[CLOSED_GROUP]), network())) == set()
    verdicts = reachability(instance(), network())  # no groups: the default group (all egress)
    assert reached(verdicts) == set(DESTINATIONS)
    closed_default = network(security_groups=[group(DEFAULT_GROUP, [], name="default")])
    verdicts = reachability(instance(), closed_default)
    assert reached(verdicts) == set() and "the VPC's default group" in verdicts.unreachable["sqs"]


def test_an_instance_in_no_subnet_reaches_nothing():
    verdicts = reachability({"InstanceId": "i-1"}, network())
    assert reached(verdicts) == set() and set(verdicts.unreachable) == set(DESTINATIONS)


def test_endpoints_of_another_region_or_vpc_do_not_count():
    other_region = {**interface_endpoint("sqs"), "ServiceName": "com.amazonaws.eu-west-1.sqs"}
    other_vpc = {**interface_endpoint("dynamodb"), "VpcId": "vpc-2"}
    net = network(vpc_endpoints=[other_region, other_vpc])
    assert reached(reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net)) == set()


def test_reachability_round_trips_and_reads_in_one_line():
    net = with_gateway_endpoint(network(), "dynamodb", DYNAMODB_PREFIX_LIST, PRIVATE_TABLE)
    verdicts = reachability(instance(subnet=PRIVATE_SUBNET, public_ip=None), net)
    again = Reachability.from_dict(verdicts.instance_id, verdicts.to_dict())
    assert again.reachable == verdicts.reachable and again.unreachable == verdicts.unreachable
    summary = verdicts.summary()
    assert summary.startswith("reaches dynamodb through gateway endpoint vpce-dynamodb; not sqs, s3, sts")
    assert summary.count("no route to 0.0.0.0/0") == 1  # one reason, said once


def test_signing_names_map_to_destinations():
    assert destination_of("sqs") == "sqs" and destination_of("logs") == "logs"
    assert destination_of("iam") == INTERNET and destination_of("monitoring") == INTERNET
