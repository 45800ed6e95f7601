"""Capacity in the local cloud: pools that run dry and vCPU quotas, answered as EC2 answers RunInstances,
changed at run time (Python, the capacity file, the control server); random spot interruptions."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from ec2cluster_localcloud import LocalCloud, capacity, cli

from .helpers import wait_for

ZONE = "us-east-1a"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    document = tmp_path_factory.mktemp("capacity-doc") / "capacity.json"
    document.write_text(
        json.dumps(
            {
                "pools": [
                    {
                        "instance_type": "c5.xlarge",
                        "availability_zone": ZONE,
                        "market": "on-demand",
                        "capacity": 0,
                    }
                ]
            }
        )
    )
    with LocalCloud(
        work_dir=tmp_path_factory.mktemp("capacity-cloud"), grace_seconds=5, capacity=document
    ) as started:
        yield started


@pytest.fixture(scope="module")
def subnets(cloud) -> dict[str, str]:
    found = cloud.client("ec2").describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    return {subnet["AvailabilityZone"]: subnet["SubnetId"] for subnet in found["Subnets"]}


@pytest.fixture(autouse=True)
def unlimited_again(cloud):
    """Each test starts from its own limits; its instances are gone after it."""
    yield
    ec2 = cloud.client("ec2")
    ids = [
        i["InstanceId"]
        for r in ec2.describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        )["Reservations"]
        for i in r["Instances"]
    ]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)
    cloud.set_capacity_document(None)
    cloud.set_spot_interruptions(0)


def launch(
    cloud, subnet: str, instance_type: str = "c5.large", count=(1, 1), spot=False, client=None, **extra
):
    params = {
        "ImageId": cloud.ami_id,
        "InstanceType": instance_type,
        "MinCount": count[0],
        "MaxCount": count[1],
        "SubnetId": subnet,
        **extra,
    }
    if spot:
        params["InstanceMarketOptions"] = {"MarketType": "spot"}
    return (client or cloud.client("ec2")).run_instances(**params)["Instances"]


def refusal(call) -> tuple[str, str, int, int]:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    response = caught.value.response
    return (
        response["Error"]["Code"],
        response["Error"]["Message"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["ResponseMetadata"].get("RetryAttempts", 0),
    )


def test_a_document_from_a_file_at_start_and_an_empty_pool(cloud, subnets):
    """LocalCloud(capacity=PATH): c5.xlarge has no on-demand room in us-east-1a. EC2's answer: HTTP 500
    InsufficientInstanceCapacity naming the zones that have room (botocore's standard mode retries it)."""
    assert cloud.capacity()["pools"] == [
        {"instance_type": "c5.xlarge", "availability_zone": ZONE, "market": "on-demand", "capacity": 0}
    ]
    others = ", ".join(sorted(zone for zone in subnets if zone != ZONE))
    code, message, status, retries = refusal(lambda: launch(cloud, subnets[ZONE], "c5.xlarge"))
    assert (code, status) == ("InsufficientInstanceCapacity", 500)
    assert message == (
        "We currently do not have sufficient c5.xlarge capacity in the Availability Zone you requested "
        f"({ZONE}). Our system will be working on provisioning additional capacity. You can currently get "
        "c5.xlarge capacity by not specifying an Availability Zone in your request or choosing "
        f"{others}."
    )
    assert retries == 2  # the standard retry mode's three attempts, as against AWS
    # Another zone, or spot in the same zone, is another pool.
    assert len(launch(cloud, subnets["us-east-1b"], "c5.xlarge")) == 1
    assert len(launch(cloud, subnets[ZONE], "c5.xlarge", spot=True)) == 1
    # A spot pool without room: EC2's spot message.
    cloud.set_capacity("c5.xlarge", ZONE, "spot", 1)
    code, message, status, _ = refusal(lambda: launch(cloud, subnets[ZONE], "c5.xlarge", spot=True))
    assert (code, message, status) == (
        "InsufficientInstanceCapacity",
        "There is no Spot capacity available that matches your request.",
        500,
    )


def test_min_and_max_count_within_a_pool_and_its_return(cloud, subnets):
    """MinCount..MaxCount launches what fits; fewer than MinCount is refused; a replayed ClientToken answers
    with its launch; terminated instances give their room back."""
    ec2 = cloud.client("ec2")
    cloud.set_capacity("m5.large", ZONE, "on-demand", 3)
    first = launch(cloud, subnets[ZONE], "m5.large", count=(1, 5), ClientToken="partial-1")
    assert len(first) == 3
    code, _, status, _ = refusal(
        lambda: launch(cloud, subnets[ZONE], "m5.large", client=_single_attempt(cloud))
    )
    assert (code, status) == ("InsufficientInstanceCapacity", 500)
    replay = launch(cloud, subnets[ZONE], "m5.large", count=(1, 5), ClientToken="partial-1")
    assert [i["InstanceId"] for i in replay] == [i["InstanceId"] for i in first]
    ec2.terminate_instances(InstanceIds=[first[0]["InstanceId"]])
    assert len(launch(cloud, subnets[ZONE], "m5.large", count=(1, 2))) == 1  # the room it freed
    # Without limits, MaxCount.
    assert len(launch(cloud, subnets[ZONE], "t3.micro", count=(1, 4))) == 4


def test_vcpu_quotas(cloud, subnets):
    """On-demand over its group's vCPU quota: VcpuLimitExceeded (400); spot: MaxSpotInstanceCountExceeded."""
    cloud.set_vcpu_quota("on-demand", "standard", 5)  # c5.large: 2 vCPUs -> 2 fit
    code, message, status, _ = refusal(
        lambda: launch(cloud, subnets[ZONE], count=(3, 3), client=_single_attempt(cloud))
    )
    assert (code, status) == ("VcpuLimitExceeded", 400)
    assert message == (
        "You have requested more vCPU capacity than your current vCPU limit of 5 allows for the instance "
        "bucket that the specified instance type belongs to. Please visit "
        "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."
    )
    assert len(launch(cloud, subnets["us-east-1b"], count=(1, 3))) == 2  # the quota is the region's
    # Another group's quota is its own: a G instance is not standard.
    cloud.set_vcpu_quota("on-demand", "g", 0)
    assert refusal(lambda: launch(cloud, subnets[ZONE], "g4dn.xlarge"))[0] == "VcpuLimitExceeded"
    cloud.set_vcpu_quota("spot", "standard", 2)
    launch(cloud, subnets[ZONE], spot=True)
    code, message, status, _ = refusal(lambda: launch(cloud, subnets[ZONE], spot=True))
    assert (code, message, status) == (
        "MaxSpotInstanceCountExceeded",
        "Max spot instance count exceeded",
        400,
    )
    assert cloud.capacity()["vcpu_quotas"] == {"on-demand": {"g": 0, "standard": 5}, "spot": {"standard": 2}}


def test_capacity_changes_at_run_time_from_python_the_file_and_the_control_server(cloud, subnets):
    zone = "us-east-1c"
    # Python.
    cloud.set_capacity("t3.small", zone, "on-demand", 0)
    assert refusal(lambda: launch(cloud, subnets[zone], "t3.small"))[0] == "InsufficientInstanceCapacity"
    cloud.set_capacity("t3.small", zone, "on-demand", None)
    launch(cloud, subnets[zone], "t3.small")
    # The work dir's file, written as any other process would (atomically).
    capacity.write(
        cloud.capacity_file,
        {
            "pools": [
                {"instance_type": "t3.small", "availability_zone": zone, "market": "on-demand", "capacity": 1}
            ]
        },
    )
    assert refusal(lambda: launch(cloud, subnets[zone], "t3.small"))[0] == "InsufficientInstanceCapacity"
    capacity.write(cloud.capacity_file, {})
    launch(cloud, subnets[zone], "t3.small")
    # The control server, through the CLI.
    control = ["--control-url", cloud.control_url]
    assert cli.main(["capacity", "--pool", "t3.small", zone, "on-demand", "0", *control]) == 0
    assert refusal(lambda: launch(cloud, subnets[zone], "t3.small"))[0] == "InsufficientInstanceCapacity"
    assert cli.main(["capacity", "--vcpu-quota", "on-demand", "standard", "unlimited", *control]) == 0
    assert cli.main(["capacity", "--pool", "t3.small", zone, "on-demand", "unlimited", *control]) == 0
    launch(cloud, subnets[zone], "t3.small")
    assert cli.main(["capacity", "--pool", "t3.small", zone, "nowhere", "1", *control]) == 1  # refused


def test_family_groups():
    groups = {
        "c5.large": "standard",
        "m7i-flex.large": "standard",
        "t3.micro": "standard",
        "z1d.large": "standard",
        "im4gn.large": "standard",
        "g5.xlarge": "g",
        "vt1.3xlarge": "g",
        "p4d.24xlarge": "p",
        "p6-b200.48xlarge": "p",
        "inf2.xlarge": "inf",
        "trn1.2xlarge": "trn",
        "dl1.24xlarge": "dl",
        "x2idn.16xlarge": "x",
        "f2.12xlarge": "f",
        "hpc7g.4xlarge": "hpc",
        "u-6tb1.metal": "u",
        "u7i-12tb.224xlarge": "u",
    }
    assert {t: capacity.family_group(t) for t in groups} == groups
    assert capacity.vcpus("c5.large") == 2 and capacity.vcpus("m5.xlarge") == 4
    with pytest.raises(capacity.CapacityError):
        capacity.normalise(
            {"pools": [{"instance_type": "c5.large", "availability_zone": ZONE, "market": "x"}]}
        )


# A spot instance that waits for its notice in metadata and publishes it.
WAITER = r"""
import os, time, urllib.request
base = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"].rstrip("/")
def get(path):
    token = urllib.request.urlopen(urllib.request.Request(base + "/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read().decode()
    try:
        return urllib.request.urlopen(urllib.request.Request(base + "/latest/meta-data/" + path,
            headers={"X-aws-ec2-metadata-token": token})).read().decode()
    except urllib.error.HTTPError:
        return None
print("waiting", flush=True)
while (notice := get("spot/instance-action")) is None:
    time.sleep(0.2)
with open(os.environ["HOME"] + "/notice.tmp", "w") as out:
    out.write(notice)
os.replace(os.environ["HOME"] + "/notice.tmp", os.environ["HOME"] + "/notice.json")
while True:
    time.sleep(0.2)
"""
WAITER_USER_DATA = f"#!/bin/bash\nexec {shlex.quote(sys.executable)} - <<'EOF'\n{WAITER}\nEOF\n"


def _notice(cloud, instance_id: str) -> dict | None:
    path = Path(cloud.worker_processes()[instance_id]["home"]) / "notice.json"
    return json.loads(path.read_text()) if path.exists() else None


def _state(cloud, instance_id: str) -> str:
    reservations = cloud.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def test_random_spot_interruptions_reach_running_spot_instances_then_end_them(cloud, subnets):
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "ec2cluster:cluster-id", "Value": "spotty"}]}]
    spot = launch(
        cloud,
        subnets[ZONE],
        "t3.micro",
        count=(3, 3),
        spot=True,
        UserData=WAITER_USER_DATA,
        TagSpecifications=tags,
    )
    on_demand = launch(cloud, subnets[ZONE], "t3.micro", UserData=WAITER_USER_DATA, TagSpecifications=tags)[0]
    ids = [i["InstanceId"] for i in spot]
    wait_for(
        lambda: all(
            cloud.worker_processes().get(i, {}).get("metadata_url") for i in [*ids, on_demand["InstanceId"]]
        ),
        60,
        "all four to run",
    )
    # The oldest N of a cluster, now.
    oldest = cloud.interrupt_oldest_spot_instances(1, notice_seconds=1, cluster_id="spotty")
    assert oldest == [ids[0]]
    wait_for(lambda: _notice(cloud, ids[0]), 60, "the notice of the oldest")
    wait_for(lambda: _state(cloud, ids[0]) == "terminated", 60, "the oldest to be reclaimed")
    # At random (every one at the next poll), set through the control server.
    control = ["--control-url", cloud.control_url]
    assert (
        cli.main(
            ["spot-interruptions", "--rate-per-hour", "inf", "--notice-seconds", "1", "--seed", "7", *control]
        )
        == 0
    )
    for instance_id in ids[1:]:
        notice = wait_for(lambda i=instance_id: _notice(cloud, i), 60, f"the notice of {instance_id}")
        assert notice["action"] == "terminate"
        wait_for(lambda i=instance_id: _state(cloud, i) == "terminated", 60, f"{instance_id} to be reclaimed")
        assert cloud.worker_processes()[instance_id]["reclaimed"]
    # On-demand instances are never interrupted.
    assert _notice(cloud, on_demand["InstanceId"]) is None
    assert _state(cloud, on_demand["InstanceId"]) == "running"
    assert cli.main(["spot-interrupt-oldest", "--cluster-id", "spotty", *control]) == 0  # none left: nothing


def _single_attempt(cloud):
    """An EC2 client that does not retry (to see one answer's status)."""
    env = cloud.env()
    return boto3.client(
        "ec2",
        endpoint_url=cloud.endpoint_url,
        region_name=cloud.region,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"mode": "standard", "max_attempts": 1}),
    )
