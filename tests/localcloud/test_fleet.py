"""CreateFleet Type=instant on the local cloud: pools, allocation strategies, partial fulfilment, MinTarget,
ClientToken, and instances that really boot through RunInstances (user data, profile, spot lifecycle)."""

from __future__ import annotations

import base64
import math
import shlex
import sys

import botocore.exceptions
import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.fleet import MarketOptions, Pool, Unlimited, allocate, target_units

from .helpers import wait_for, wait_for_log_line

# What a fleet's instance prints: its id, type and role from its metadata (IMDSv2), as a worker finds them.
REPORT = r"""
import os, urllib.request
base = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"].rstrip("/")
token = urllib.request.urlopen(urllib.request.Request(base + "/latest/api/token", method="PUT",
    headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read().decode()
def get(path):
    request = urllib.request.Request(base + "/latest/meta-data/" + path,
        headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(request).read().decode()
role = get("iam/security-credentials/").strip()
print("fleet-instance", get("instance-id"), get("instance-type"), role, flush=True)
"""
USER_DATA = f"#!/bin/bash\n{shlex.quote(sys.executable)} - <<'EOF'\n{REPORT}\nEOF\nexec sleep 600\n"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with LocalCloud(work_dir=tmp_path_factory.mktemp("fleet-cloud"), grace_seconds=5) as started:
        yield started


@pytest.fixture(scope="module")
def subnets(cloud) -> dict[str, str]:
    """zone -> default subnet."""
    found = cloud.client("ec2").describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    return {subnet["AvailabilityZone"]: subnet["SubnetId"] for subnet in found["Subnets"]}


def template(cloud, name: str, **data) -> str:
    """A launch template as the controller writes one: user data, profile, IMDSv2, a public IP, gp3."""
    launch_data = {
        "ImageId": cloud.ami_id,
        "InstanceType": "t3.micro",
        "UserData": base64.b64encode(USER_DATA.encode()).decode(),
        "IamInstanceProfile": {"Name": cloud.instance_profile_name},
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "NetworkInterfaces": [
            {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "DeleteOnTermination": True}
        ],
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/xvda", "Ebs": {"Encrypted": True, "VolumeType": "gp3", "VolumeSize": 8}}
        ],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": "from-template", "Value": "yes"}]}
        ],
        **data,
    }
    answer = cloud.client("ec2").create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData=launch_data
    )
    return answer["LaunchTemplate"]["LaunchTemplateId"]


def instances_of(answer: dict) -> list[str]:
    return [instance_id for item in answer.get("Instances", []) for instance_id in item["InstanceIds"]]


def described(cloud, ids: list[str]) -> dict[str, dict]:
    reservations = cloud.client("ec2").describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i for r in reservations for i in r["Instances"]}


def terminate(cloud, answer: dict) -> None:
    ids = instances_of(answer)
    if ids:
        cloud.client("ec2").terminate_instances(InstanceIds=ids)


def test_an_instant_fleet_launches_from_its_template_through_run_instances(cloud, subnets):
    """Several types x subnets, spot: every instance boots with the template's user data, profile, metadata
    options, network interface and volume, tagged by the template and the fleet, spot lifecycle; a repeated
    ClientToken answers with the same fleet and launches nothing."""
    template_id = template(cloud, "fleet-boots")
    zones = sorted(subnets)[:2]
    request = {
        "Type": "instant",
        "ClientToken": "fleet-boots-1",
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template_id, "Version": "$Latest"},
                "Overrides": [
                    {"InstanceType": instance_type, "SubnetId": subnets[zone]}
                    for instance_type in ("c5.large", "m5.large")
                    for zone in zones
                ],
            }
        ],
        "TargetCapacitySpecification": {"TotalTargetCapacity": 3, "DefaultTargetCapacityType": "spot"},
        "SpotOptions": {"AllocationStrategy": "price-capacity-optimized"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": "ec2cluster:cluster-id", "Value": "fleet-boots"}]},
            {"ResourceType": "fleet", "Tags": [{"Key": "purpose", "Value": "test"}]},
        ],
    }
    ec2 = cloud.client("ec2")
    answer = ec2.create_fleet(**request)
    try:
        assert answer["Errors"] == []
        ids = instances_of(answer)
        assert len(ids) == 3
        # Unlimited pools: price-capacity-optimized takes the cheapest spot pool (c5.large: 0.0306 an hour).
        (item,) = answer["Instances"]
        assert item["Lifecycle"] == "spot" and item["InstanceType"] == "c5.large"
        assert (
            item["LaunchTemplateAndOverrides"]["LaunchTemplateSpecification"]["LaunchTemplateId"]
            == template_id
        )
        assert item["LaunchTemplateAndOverrides"]["Overrides"] == {
            "InstanceType": "c5.large",
            "SubnetId": subnets[zones[0]],
        }
        instances = described(cloud, ids)
        role_arn = cloud.client("iam").get_role(RoleName=cloud.instance_profile_name)["Role"]["Arn"]
        for instance_id, instance in instances.items():
            assert instance["InstanceLifecycle"] == "spot"
            assert instance["IamInstanceProfile"]["Arn"].endswith(
                f"instance-profile/{cloud.instance_profile_name}"
            )
            assert instance["MetadataOptions"]["HttpTokens"] == "required"
            assert instance["Placement"]["AvailabilityZone"] == zones[0]
            assert instance["SubnetId"] == subnets[zones[0]]
            assert instance.get("PublicIpAddress")
            tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
            assert tags["from-template"] == "yes" and tags["ec2cluster:cluster-id"] == "fleet-boots"
            assert tags["aws:ec2:fleet-id"] == answer["FleetId"]
            attribute = ec2.describe_instance_attribute(
                InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
            )
            assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
            volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
            volume = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
            assert volume["Encrypted"] and volume["VolumeType"] == "gp3"
            # The runner started it: its user data ran, and its metadata gives the role.
            log = wait_for_log_line(cloud, instance_id, "fleet-instance", timeout=60)
            line = next(line for line in log.splitlines() if line.startswith("fleet-instance"))
            assert line.split() == ["fleet-instance", instance_id, "c5.large", cloud.instance_profile_name]
        assert role_arn
        # The account's first spot launch made the spot service-linked role, as RunInstances does.
        cloud.client("iam").get_role(RoleName="AWSServiceRoleForEC2Spot")
        # The same ClientToken: the same fleet and instances, nothing launched.
        before = len(cloud.worker_processes())
        again = ec2.create_fleet(**request)
        assert again["FleetId"] == answer["FleetId"] and instances_of(again) == ids
        assert len(cloud.worker_processes()) == before
        fleets = ec2.describe_fleets(FleetIds=[answer["FleetId"]])["Fleets"]
        assert fleets[0]["Type"] == "instant" and fleets[0]["FulfilledCapacity"] == 3.0
        assert {"Key": "purpose", "Value": "test"} in fleets[0]["Tags"]
    finally:
        terminate(cloud, answer)


def test_template_by_name_and_version_on_demand(cloud, subnets):
    """A template named by its name and version number; on-demand by default; no overrides: its own type,
    over the default subnets."""
    template(cloud, "fleet-by-name", InstanceType="t3.small")
    ec2 = cloud.client("ec2")
    answer = ec2.create_fleet(
        Type="instant",
        LaunchTemplateConfigs=[
            {"LaunchTemplateSpecification": {"LaunchTemplateName": "fleet-by-name", "Version": "1"}}
        ],
        TargetCapacitySpecification={"TotalTargetCapacity": 2},
    )
    try:
        assert answer["Errors"] == []
        ids = instances_of(answer)
        assert len(ids) == 2 and {item["Lifecycle"] for item in answer["Instances"]} == {"on-demand"}
        for instance in described(cloud, ids).values():
            assert instance["InstanceType"] == "t3.small" and "InstanceLifecycle" not in instance
            assert instance["SubnetId"] in subnets.values()
        wait_for(
            lambda: all(cloud.worker_processes().get(i, {}).get("alive") for i in ids), 60, "both to run"
        )
    finally:
        terminate(cloud, answer)


# -- Allocation, pure -----------------------------------------------------------------------------------


def pools(*specs) -> list[Pool]:
    return [
        Pool(
            order=n,
            template_specification={},
            overrides=None,
            params={},
            instance_type=t,
            availability_zone=z,
            priority=p,
        )
        for n, (t, z, p) in enumerate(specs)
    ]


class Rooms(Unlimited):
    def __init__(self, rooms: dict[tuple[str, str], float]):
        self.rooms = dict(rooms)

    def fits(self, instance_type, availability_zone, market):
        return self.rooms.get((instance_type, availability_zone), math.inf)

    def take(self, instance_type, availability_zone, market, count):
        self.rooms[(instance_type, availability_zone)] = (
            self.fits(instance_type, availability_zone, market) - count
        )

    def copy(self):
        return Rooms(self.rooms)


def test_target_units_split_by_market():
    assert target_units({"TotalTargetCapacity": 5}) == (5, 0)
    assert target_units({"TotalTargetCapacity": 5, "SpotTargetCapacity": 2}) == (3, 2)
    assert target_units(
        {"TotalTargetCapacity": 5, "OnDemandTargetCapacity": 1, "DefaultTargetCapacityType": "spot"}
    ) == (1, 4)


def test_allocation_strategies():
    three = pools(("m5.large", "a", 2.0), ("c5.large", "a", 1.0), ("r5.large", "b", math.inf))
    spot = "spot"
    # lowest-price: c5.large is the cheapest spot pool (0.085 x 0.36).
    found = allocate(three, 4, spot, MarketOptions("lowest-price"), Unlimited())
    assert found.counts == {1: 4}
    # ... with two pools to use: spread over the two cheapest (c5.large, r5.large at 0.126 x 0.28).
    found = allocate(three, 4, spot, MarketOptions("lowest-price", pools_to_use=2), Unlimited())
    assert found.counts == {1: 2, 2: 2}
    # price-capacity-optimized: the cheapest of the pools that can take it all; c5 has room for 1 only.
    found = allocate(three, 3, spot, MarketOptions("price-capacity-optimized"), Rooms({("c5.large", "a"): 1}))
    assert found.counts == {2: 3}
    # diversified: evenly.
    assert allocate(three, 3, spot, MarketOptions("diversified"), Unlimited()).counts == {0: 1, 1: 1, 2: 1}
    # On-demand prioritized: lowest Priority first; when it runs dry, the next.
    found = allocate(three, 3, "on-demand", MarketOptions("prioritized"), Rooms({("c5.large", "a"): 2}))
    assert found.counts == {1: 2, 0: 1}
    # On-demand lowest-price: c5.large (0.085).
    assert allocate(three, 2, "on-demand", MarketOptions("lowest-price"), Unlimited()).counts == {1: 2}
    # Short: the pools without room say why.
    found = allocate(
        three,
        5,
        spot,
        MarketOptions("capacity-optimized"),
        Rooms({k: 1 for k in [("m5.large", "a"), ("c5.large", "a"), ("r5.large", "b")]}),
    )
    assert found.units == 3 and sorted(found.errors) == [0, 1, 2]
    # SingleInstanceType: one type only, the first that gives everything.
    single = MarketOptions("lowest-price", single_instance_type=True)
    found = allocate(three, 2, spot, single, Rooms({("c5.large", "a"): 1}))
    assert found.counts == {2: 2} and found.errors == {}


# -- With capacity limits ----------------------------------------------------------------------------------


@pytest.fixture
def limits(cloud):
    """Capacity for one test; everything unlimited again, and its instances gone, after it."""
    yield cloud
    cloud.set_capacity_document(None)
    ec2 = cloud.client("ec2")
    live = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    ids = [i["InstanceId"] for r in live["Reservations"] for i in r["Instances"]]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)


def fleet(cloud, template_id: str, overrides: list[dict], capacity: dict, **options) -> dict:
    answer = cloud.client("ec2").create_fleet(
        Type="instant",
        LaunchTemplateConfigs=[
            {"LaunchTemplateSpecification": {"LaunchTemplateId": template_id}, "Overrides": overrides}
        ],
        TargetCapacitySpecification=capacity,
        **options,
    )
    answer.pop("ResponseMetadata")
    return answer


def every_instance_id(cloud) -> set[str]:
    """The ids of every instance EC2 lists, in any state."""
    pages = cloud.client("ec2").get_paginator("describe_instances").paginate()
    return {i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]}


def placed(cloud, answer: dict) -> list[tuple[str, str]]:
    """(type, zone) of each instance the fleet launched, sorted."""
    return sorted(
        (i["InstanceType"], i["Placement"]["AvailabilityZone"])
        for i in described(cloud, instances_of(answer)).values()
    )


def test_spot_price_capacity_optimized_skips_an_empty_pool(limits, subnets):
    cloud = limits
    template_id = template(cloud, "fleet-pco")
    a, b = "us-east-1a", "us-east-1b"
    cloud.set_capacity("c5.large", a, "spot", 0)  # the cheapest spot pool is dry in zone a
    overrides = [
        {"InstanceType": t, "SubnetId": subnets[z]} for t in ("c5.large", "m5.large") for z in (a, b)
    ]
    answer = fleet(
        cloud,
        template_id,
        overrides,
        {"TotalTargetCapacity": 2, "DefaultTargetCapacityType": "spot"},
        SpotOptions={"AllocationStrategy": "price-capacity-optimized"},
    )
    assert answer["Errors"] == []
    assert placed(cloud, answer) == [("c5.large", b), ("c5.large", b)]


def test_on_demand_prioritized_fills_the_first_priority_then_the_next(limits, subnets):
    cloud = limits
    template_id = template(cloud, "fleet-prioritized")
    a = "us-east-1a"
    cloud.set_capacity("m5.large", a, "on-demand", 1)
    overrides = [
        {"InstanceType": "m5.large", "SubnetId": subnets[a], "Priority": 1.0},
        {"InstanceType": "c5.large", "SubnetId": subnets[a], "Priority": 2.0},
    ]
    answer = fleet(
        cloud,
        template_id,
        overrides,
        {"TotalTargetCapacity": 3, "DefaultTargetCapacityType": "on-demand"},
        OnDemandOptions={"AllocationStrategy": "prioritized"},
    )
    assert answer["Errors"] == []
    assert placed(cloud, answer) == [("c5.large", a), ("c5.large", a), ("m5.large", a)]
    assert {item["Lifecycle"] for item in answer["Instances"]} == {"on-demand"}


def test_partial_fulfilment_lists_each_pools_error_and_min_target_launches_nothing(limits, subnets):
    cloud = limits
    template_id = template(cloud, "fleet-partial")
    a = "us-east-1a"
    cloud.set_capacity("c5.large", a, "spot", 1)
    cloud.set_capacity("m5.large", a, "spot", 1)
    overrides = [{"InstanceType": t, "SubnetId": subnets[a]} for t in ("c5.large", "m5.large")]
    spot = {"TotalTargetCapacity": 4, "DefaultTargetCapacityType": "spot"}
    answer = fleet(
        cloud, template_id, overrides, spot, SpotOptions={"AllocationStrategy": "capacity-optimized"}
    )
    assert placed(cloud, answer) == [("c5.large", a), ("m5.large", a)]
    assert sorted(
        (
            e["LaunchTemplateAndOverrides"]["Overrides"]["InstanceType"],
            e["Lifecycle"],
            e["ErrorCode"],
            e["ErrorMessage"],
        )
        for e in answer["Errors"]
    ) == [
        (
            "c5.large",
            "spot",
            "InsufficientInstanceCapacity",
            "There is no Spot capacity available that matches your request.",
        ),
        (
            "m5.large",
            "spot",
            "InsufficientInstanceCapacity",
            "There is no Spot capacity available that matches your request.",
        ),
    ]
    # MinTargetCapacity that cannot be met: nothing launched, the errors said.
    # (EC2's instances, not the runner's processes: it may still be starting the first fleet's.)
    before = every_instance_id(cloud)
    cloud.set_capacity("t3.micro", a, "spot", 2)
    none = fleet(
        cloud,
        template_id,
        [{"InstanceType": "t3.micro", "SubnetId": subnets[a]}],
        {"TotalTargetCapacity": 3, "DefaultTargetCapacityType": "spot"},
        SpotOptions={"MinTargetCapacity": 3, "SingleInstanceType": True},
    )
    assert none["Instances"] == [] and [e["ErrorCode"] for e in none["Errors"]] == [
        "InsufficientInstanceCapacity"
    ]
    assert every_instance_id(cloud) == before
    # An on-demand vCPU quota: what fits, and VcpuLimitExceeded for the rest.
    cloud.set_vcpu_quota("on-demand", "standard", 2)
    quota = fleet(cloud, template_id, overrides[:1], {"TotalTargetCapacity": 2})
    assert len(instances_of(quota)) == 1
    assert [e["ErrorCode"] for e in quota["Errors"]] == ["VcpuLimitExceeded"]


# -- IAM -------------------------------------------------------------------------------------------------


def refused(call) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    assert caught.value.response["Error"]["Code"] == "UnauthorizedOperation"
    return caught.value.response["Error"]["Message"]


def test_iam_create_fleet_asks_for_the_fleet_the_launch_and_its_tags(cloud, subnets):
    account = "123456789012"
    ec2_arn = f"arn:aws:ec2:us-east-1:{account}"
    role = cloud.client("iam").get_role(RoleName=cloud.instance_profile_name)["Role"]["Arn"]
    template_id = template(cloud, "fleet-iam", InstanceType="t3.micro")
    allow_all_ec2 = {
        "Effect": "Allow",
        "Action": ["ec2:CreateFleet", "ec2:RunInstances", "ec2:DescribeInstances"],
        "Resource": "*",
    }
    tag_on_fleet = {
        "Effect": "Allow",
        "Action": "ec2:CreateTags",
        "Resource": "*",
        "Condition": {"StringEquals": {"ec2:CreateAction": "CreateFleet"}},
    }
    pass_role = {
        "Effect": "Allow",
        "Action": "iam:PassRole",
        "Resource": role,
        "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
    }

    def policy(*statements):
        return {"Version": "2012-10-17", "Statement": list(statements)}

    keys = cloud.create_user("fleet-launcher", policy(allow_all_ec2, tag_on_fleet, pass_role))
    ec2 = cloud.client("ec2", keys)
    request = {
        "Type": "instant",
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template_id, "Version": "$Default"},
                "Overrides": [{"InstanceType": "t3.micro", "SubnetId": subnets["us-east-1a"]}],
            }
        ],
        "TargetCapacitySpecification": {"TotalTargetCapacity": 1},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": "ec2cluster:cluster-id", "Value": "iam"}]}
        ],
    }
    answer = ec2.create_fleet(**request)
    assert len(instances_of(answer)) == 1 and answer["Errors"] == []
    terminate(cloud, answer)
    user = f"arn:aws:iam::{account}:user/fleet-launcher"
    # No ec2:CreateFleet.
    cloud.set_user_policy(
        "fleet-launcher",
        policy({**allow_all_ec2, "Action": ["ec2:RunInstances"]}, tag_on_fleet, pass_role),
    )
    message = refused(lambda: ec2.create_fleet(**request))
    assert (
        f"User: {user} is not authorized to perform: ec2:CreateFleet on resource: {ec2_arn}:fleet/*"
        in message
    )
    # RunInstances refused on the launch template: an instant fleet launches as its caller.
    deny_template = {
        "Effect": "Deny",
        "Action": "ec2:RunInstances",
        "Resource": f"{ec2_arn}:launch-template/{template_id}",
    }
    cloud.set_user_policy("fleet-launcher", policy(allow_all_ec2, tag_on_fleet, pass_role, deny_template))
    message = refused(lambda: ec2.create_fleet(**request))
    assert f"ec2:RunInstances on resource: {ec2_arn}:launch-template/{template_id}" in message
    # Tagging allowed only for RunInstances: CreateFleet's tags are refused.
    run_tags = {**tag_on_fleet, "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}}
    cloud.set_user_policy("fleet-launcher", policy(allow_all_ec2, run_tags, pass_role))
    assert "ec2:CreateTags" in refused(lambda: ec2.create_fleet(**request))
    # No iam:PassRole for the template's instance profile.
    cloud.set_user_policy("fleet-launcher", policy(allow_all_ec2, tag_on_fleet))
    assert f"iam:PassRole on resource: {role}" in refused(lambda: ec2.create_fleet(**request))
    assert (
        cloud.client("ec2").describe_instances(
            Filters=[
                {"Name": "tag:ec2cluster:cluster-id", "Values": ["iam"]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )["Reservations"]
        == []
    )  # nothing was launched by a refused request


def test_iam_launch_templates(cloud):
    account = "123456789012"
    ec2_arn = f"arn:aws:ec2:us-east-1:{account}"
    statements = [
        {
            "Effect": "Allow",
            "Action": ["ec2:CreateLaunchTemplate", "ec2:DescribeLaunchTemplates"],
            "Resource": "*",
        },
        {
            "Effect": "Allow",
            "Action": "ec2:DeleteLaunchTemplate",
            "Resource": f"{ec2_arn}:launch-template/*",
            "Condition": {"StringEquals": {"aws:ResourceTag/owner": "me"}},
        },
    ]
    keys = cloud.create_user("template-maker", {"Version": "2012-10-17", "Statement": statements})
    ec2 = cloud.client("ec2", keys)
    tagged = [{"ResourceType": "launch-template", "Tags": [{"Key": "owner", "Value": "me"}]}]
    data = {"ImageId": cloud.ami_id, "InstanceType": "t3.micro"}
    message = refused(
        lambda: ec2.create_launch_template(
            LaunchTemplateName="lt-tagged", LaunchTemplateData=data, TagSpecifications=tagged
        )
    )
    assert f"ec2:CreateTags on resource: {ec2_arn}:launch-template/*" in message
    statements.append(
        {
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": f"{ec2_arn}:launch-template/*",
            "Condition": {"StringEquals": {"ec2:CreateAction": "CreateLaunchTemplate"}},
        }
    )
    cloud.set_user_policy("template-maker", {"Version": "2012-10-17", "Statement": statements})
    mine = ec2.create_launch_template(
        LaunchTemplateName="lt-tagged", LaunchTemplateData=data, TagSpecifications=tagged
    )
    other = ec2.create_launch_template(LaunchTemplateName="lt-untagged", LaunchTemplateData=data)
    assert ec2.describe_launch_templates(LaunchTemplateNames=["lt-tagged"])["LaunchTemplates"]
    other_id = other["LaunchTemplate"]["LaunchTemplateId"]
    message = refused(lambda: ec2.delete_launch_template(LaunchTemplateId=other_id))
    assert f"ec2:DeleteLaunchTemplate on resource: {ec2_arn}:launch-template/{other_id}" in message
    ec2.delete_launch_template(LaunchTemplateId=mine["LaunchTemplate"]["LaunchTemplateId"])


def test_spot_price_history_answers_the_price_table_the_allocation_ranks_by(cloud, subnets):
    """DescribeSpotPriceHistory answers prices.py's spot prices (moto's own: 0.00001 for all), so the
    controller's cost estimate and the local cloud's spot allocation use the same figures."""
    from datetime import datetime, timezone

    from ec2cluster_localcloud import prices

    from airflow_ec2cluster.pricing.spot import spot_price_params, spot_prices_of

    now = datetime.now(timezone.utc).timestamp()
    pages = cloud.client("ec2").get_paginator("describe_spot_price_history")
    entries = [
        e
        for page in pages.paginate(**spot_price_params(["m5.large", "t3.micro"], now))
        for e in page["SpotPriceHistory"]
    ]
    found = spot_prices_of(entries, now)
    for zone in subnets:
        assert found[f"m5.large/{zone}"]["price"] == prices.spot_price("m5.large")
        assert found[f"t3.micro/{zone}"]["price"] == prices.spot_price("t3.micro")
    assert {e["InstanceType"] for e in entries} == {"m5.large", "t3.micro"}


def test_the_price_list_api_serves_the_price_table_to_the_refresh_command(cloud, tmp_path):
    """GetProducts (moto has no pricing backend) answers prices.py's on-demand prices in the Price List
    API's shape, pages and all; the refresh command writes them; IAM holds it to `--side prices`."""
    from botocore.exceptions import ClientError
    from ec2cluster_localcloud import prices

    from airflow_ec2cluster.commands.refresh_prices import refresh
    from airflow_ec2cluster.iam import PolicyScope, controller_policy, price_refresh_policy
    from airflow_ec2cluster.pricing.table import PriceTable, write_table

    table = tmp_path / "prices.json"
    write_table(PriceTable("2020-01-01", "old", {"eu-west-1": {"m5.large": 0.107}}), table)
    pricer = cloud.client("pricing", cloud.create_user("price-refresher", price_refresh_policy()))
    pages = []
    pricer.meta.events.register("after-call.pricing.GetProducts", lambda parsed, **_: pages.append(parsed))
    refreshed = refresh(pricer, table, ["us-east-1", "eu-west-1"], "2026-12-03")
    assert refreshed.regions["us-east-1"] == prices.ON_DEMAND_USD_PER_HOUR
    assert refreshed.regions["eu-west-1"] == prices.ON_DEMAND_USD_PER_HOUR
    assert refreshed.as_of == "2026-12-03" and len(pages) == 2  # one page per region (22 types < 100)
    controller = cloud.client("pricing", cloud.create_user("run-only", controller_policy(PolicyScope())))
    with pytest.raises(ClientError) as refused:
        refresh(controller, table, ["us-east-1"], "2026-12-04")
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "pricing:GetProducts" in str(refused.value)
