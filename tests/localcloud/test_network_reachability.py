"""Real instances reach what their VPC lets them reach, and time out on the rest (as on AWS).

Five instances run side by side, each trying every service with boto3 (2 s connect timeout, no retries) and
the package index (the internet), printing one line per destination:
- default VPC, public IP (MapPublicIpOnLaunch): everything;
- default subnet launched with AssociatePublicIpAddress=false: nothing, and a request sent straight to the
  local cloud's endpoint anyway is held unanswered by the server (a read timeout);
- a private subnet of its own VPC (no 0.0.0.0/0 route) with a DynamoDB gateway endpoint and an SQS interface
  endpoint (private DNS): those two only;
- a private subnet routing 0.0.0.0/0 to a NAT gateway in a public subnet: everything, the index included;
- the default VPC with a public IP, in a security group with no egress rule: nothing.
"""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

import boto3
import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.blackhole import Blackhole, ReachabilityFile, session_instance_id
from ec2cluster_localcloud.network import DESTINATIONS, SERVICES, Reachability, Verdict
from ec2cluster_localcloud.runner import SERVICE_ENDPOINT_VARIABLES

from .helpers import launch_instance, wait_for, wait_for_log_line

ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# Every destination at once (threads), so that an instance that reaches nothing is done in about 2 s.
# Run by this interpreter (the host is a process-backed instance's image; one with boto3, like a DLAMI's).
PROBE = r"""
@PYTHON@ - <<'PY'
import os, urllib.request
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

CONFIG = Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1})
CALLS = {
    "sqs": lambda c: c.list_queues(),
    "dynamodb": lambda c: c.list_tables(),
    "s3": lambda c: c.list_buckets(),
    "sts": lambda c: c.get_caller_identity(),
    "ec2": lambda c: c.describe_availability_zones(),
    "logs": lambda c: c.describe_log_groups(),
}


def probe(destination):
    try:
        if destination == "internet":
            urllib.request.urlopen(os.environ["PIP_INDEX_URL"], timeout=2).read()
        else:
            CALLS[destination](boto3.client(destination, region_name="us-east-1", config=CONFIG))
        return "ok"
    except Exception as error:
        return f"failed {type(error).__name__}"


def direct():
    # Straight to the local cloud's endpoint, bypassing the instance's network: the server must not serve it.
    client = boto3.client("sqs", region_name="us-east-1", endpoint_url="__ENDPOINT__", config=CONFIG.merge(
        Config(read_timeout=3)))
    try:
        client.list_queues()
        return "answered"
    except Exception as error:
        return f"failed {type(error).__name__}"


names = [*CALLS, "internet"]
with ThreadPoolExecutor(len(names) + 1) as pool:
    results = dict(zip(names, pool.map(probe, names)))
    held = pool.submit(direct).result() if os.environ.get("PROBE_DIRECT") else None
for name, result in results.items():
    print(f"REACH {name} {result}", flush=True)
if held:
    print(f"DIRECT {held}", flush=True)
print("REACH done", flush=True)
PY
""".replace("@PYTHON@", shlex.quote(sys.executable))


def results(log: str) -> dict[str, str]:
    return {
        line.split()[1]: line.split(" ", 2)[2]
        for line in log.splitlines()
        if line.startswith("REACH ") and line != "REACH done"
    }


def private_vpc(ec2) -> dict[str, str]:
    """A VPC: a public subnet (internet gateway, NAT gateway), a private subnet with only a DynamoDB gateway
    endpoint and an SQS interface endpoint, and a private subnet routing 0.0.0.0/0 to the NAT gateway."""
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    public, endpoints_only, natted = (
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24")["Subnet"]["SubnetId"] for i in (0, 1, 2)
    )
    gateway = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc)
    tables = {}
    for name, subnet in (("public", public), ("endpoints", endpoints_only), ("nat", natted)):
        tables[name] = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.associate_route_table(RouteTableId=tables[name], SubnetId=subnet)
    ec2.create_route(RouteTableId=tables["public"], DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway)
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    nat = ec2.create_nat_gateway(SubnetId=public, AllocationId=allocation)["NatGateway"]["NatGatewayId"]
    ec2.get_waiter("nat_gateway_available").wait(NatGatewayIds=[nat], WaiterConfig={"Delay": 1})
    ec2.create_route(RouteTableId=tables["nat"], DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    ec2.create_vpc_endpoint(
        VpcId=vpc,
        ServiceName="com.amazonaws.us-east-1.dynamodb",
        VpcEndpointType="Gateway",
        RouteTableIds=[tables["endpoints"]],
    )
    ec2.create_vpc_endpoint(
        VpcId=vpc,
        ServiceName="com.amazonaws.us-east-1.sqs",
        VpcEndpointType="Interface",
        SubnetIds=[endpoints_only],
        PrivateDnsEnabled=True,
    )
    return {"endpoints": endpoints_only, "nat": natted}


def closed_group(ec2) -> str:
    """A security group of the default VPC with its egress rule removed."""
    group = ec2.create_security_group(GroupName="no-egress", Description="no egress")["GroupId"]
    ec2.revoke_security_group_egress(
        GroupId=group, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    return group


def test_instances_reach_what_their_vpc_routes(tmp_path: Path):
    with LocalCloud(
        work_dir=tmp_path / "cloud", wheel_cache=tmp_path / "wheels", package_upstream=None
    ) as cloud:
        cloud.set_worker_policy(ALLOW_ALL)
        ec2 = cloud.client("ec2")
        subnets = private_vpc(ec2)
        probe = PROBE.replace("__ENDPOINT__", cloud.endpoint_url)
        no_public_ip = [{"DeviceIndex": 0, "AssociatePublicIpAddress": False}]
        instances = {
            "public": launch_instance(cloud, probe),
            "no-public-ip": launch_instance(
                cloud, "export PROBE_DIRECT=1\n" + probe, NetworkInterfaces=no_public_ip
            ),
            "endpoints": launch_instance(cloud, probe, SubnetId=subnets["endpoints"]),
            "nat": launch_instance(cloud, probe, SubnetId=subnets["nat"]),
            "no-egress": launch_instance(cloud, probe, SecurityGroupIds=[closed_group(ec2)]),
        }
        logs = {name: wait_for_log_line(cloud, i, "REACH done", 45) for name, i in instances.items()}
        reached = {name: {d for d, r in results(log).items() if r == "ok"} for name, log in logs.items()}
        everything = set(DESTINATIONS)
        assert reached == {
            "public": everything,
            "no-public-ip": set(),
            "endpoints": {"sqs", "dynamodb"},
            "nat": everything,
            "no-egress": set(),
        }, logs
        # What is not reached times out at connect (the blackhole), as a packet with no route does on AWS.
        for name in ("no-public-ip", "endpoints", "no-egress"):
            failures = {d: r for d, r in results(logs[name]).items() if r != "ok"}
            assert set(failures.values()) <= {
                "failed ConnectTimeoutError",
                "failed TimeoutError",
                "failed URLError",
            }
        # Sent to the endpoint anyway, a request is held unanswered: the client's read times out.
        assert "DIRECT failed ReadTimeoutError" in logs["no-public-ip"]

        # The runner's decision is recorded per instance, with the reasons.
        processes = wait_for(
            lambda: (p := cloud.worker_processes()) and all(i in p for i in instances.values()) and p,
            10,
            "the instances' records",
        )
        assert set(processes[instances["endpoints"]]["reachable"]) == {"sqs", "dynamodb"}
        assert "gateway endpoint" in processes[instances["endpoints"]]["reachable"]["dynamodb"]
        assert "no public IP" in processes[instances["no-public-ip"]]["unreachable"]["sqs"]
        assert "egress" in processes[instances["no-egress"]]["unreachable"]["internet"]
        assert "NAT gateway" in processes[instances["nat"]]["reachable"]["internet"]


@pytest.mark.parametrize("service", SERVICES)
def test_botocore_reads_each_services_endpoint_variable(service: str, monkeypatch):
    """The runner's DNS stand-in works only if these are the names botocore reads."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv(SERVICE_ENDPOINT_VARIABLES[service], "http://127.0.0.1:9")
    assert boto3.client(service, region_name="us-east-1").meta.endpoint_url == "http://127.0.0.1:9"


def test_the_blackhole_times_connections_out():
    blackhole = Blackhole()
    try:
        for _ in range(3):  # again and again: nothing ever drains its queue
            with pytest.raises(TimeoutError):
                socket.create_connection(("127.0.0.1", blackhole.port), timeout=0.3)
    finally:
        blackhole.close()


def test_the_reachability_file_is_what_the_runner_last_wrote(tmp_path: Path):
    table = ReachabilityFile(tmp_path / "reachability.json")
    assert table.lookup("i-1") is None
    first = Reachability("i-1", {"sqs": Verdict("sqs", True, "internet gateway igw-1")})
    table.write({"i-1": first})
    reader = ReachabilityFile(tmp_path / "reachability.json")
    assert reader.lookup("i-1").reaches("sqs")
    second = Reachability("i-2", {"sqs": Verdict("sqs", False, "", "no route")})
    table.write({"i-1": first, "i-2": second})
    assert reader.lookup("i-2").unreachable == {"sqs": "no route"}
    assert session_instance_id("arn:aws:sts::123456789012:assumed-role/ec2cluster-worker/i-0abc") == "i-0abc"
    assert session_instance_id("arn:aws:iam::123456789012:user/i-0abc") is None
