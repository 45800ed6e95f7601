"""EC2: RunInstances for the workers, the cluster's instances by tag, termination in batches."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from airflow_ec2cluster.cluster import (
    TAG_CLUSTER_ID,
    TAG_LAUNCH_TOKEN,
    LaunchSpec,
    cluster_security_group_name,
    cluster_tags,
)
from airflow_ec2cluster.drain.decisions import LIVE_STATES

# Instance ids per TerminateInstances call and per waiter call.
EC2_ID_BATCH = 500


def run_instances_params(
    *, cluster_id: str, spec: LaunchSpec, count: int, client_token: str, min_count: int | None = None
) -> dict[str, Any]:
    """RunInstances arguments: IMDSv2 only, encrypted root volume, tags, terminate on shutdown."""
    tags = [{"Key": key, "Value": value} for key, value in cluster_tags(cluster_id, spec.extra_tags).items()]
    interface: dict[str, Any] = {
        "DeviceIndex": 0,
        "DeleteOnTermination": True,
        # Explicit: network="public" needs one (an internet gateway carries only instances that have a
        # public IP); "private" must not get one from a subnet that auto-assigns them (they are billed).
        "AssociatePublicIpAddress": spec.associate_public_ip,
    }
    subnet_id = spec.subnet_for(client_token)
    if subnet_id:
        interface["SubnetId"] = subnet_id
    if spec.security_group_ids:
        interface["Groups"] = list(spec.security_group_ids)
    params: dict[str, Any] = {
        "ImageId": spec.image_id,
        "InstanceType": spec.instance_type,
        "MinCount": min_count or count,
        "MaxCount": count,
        "ClientToken": client_token,
        "UserData": base64.b64decode(spec.user_data_b64),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpEndpoint": "enabled",
            "HttpPutResponseHopLimit": spec.metadata_hop_limit,
        },
        "NetworkInterfaces": [interface],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
    }
    if spec.instance_profile:
        key = "Arn" if spec.instance_profile.startswith("arn:") else "Name"
        params["IamInstanceProfile"] = {key: spec.instance_profile}
    if spec.key_name:
        params["KeyName"] = spec.key_name
    if spec.root_device_name:
        ebs: dict[str, Any] = {"Encrypted": True, "DeleteOnTermination": True, "VolumeType": "gp3"}
        if spec.volume_size_gb:
            ebs["VolumeSize"] = spec.volume_size_gb
        params["BlockDeviceMappings"] = [{"DeviceName": spec.root_device_name, "Ebs": ebs}]
    if spec.spot:
        spot_options: dict[str, Any] = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        if spec.spot_max_price:
            spot_options["MaxPrice"] = spec.spot_max_price
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot_options}
    return params


def instance_filters(
    cluster_id: str, states: Iterable[str] | None = LIVE_STATES, token: str | None = None
) -> list[dict[str, Any]]:
    """DescribeInstances filters: the cluster's tag, in ``states`` (None: any), from launch ``token``."""
    filters = [{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}]
    if states is not None:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    if token is not None:
        filters.append({"Name": f"tag:{TAG_LAUNCH_TOKEN}", "Values": [token]})
    return filters


def instances_of(page: dict[str, Any]) -> list[dict[str, Any]]:
    """The instances of one DescribeInstances page, out of their reservations."""
    return [instance for reservation in page["Reservations"] for instance in reservation["Instances"]]


def instance_states_of(instances: Iterable[dict[str, Any]]) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in instances}


def terminated_waiter_params(instance_ids: list[str], delay: int, max_attempts: int) -> dict[str, Any]:
    """``instance_terminated`` waiter arguments for one batch of ids."""
    return {"InstanceIds": instance_ids, "WaiterConfig": {"Delay": delay, "MaxAttempts": max_attempts}}


def create_security_group_params(cluster_id: str, vpc_id: str) -> dict[str, Any]:
    """CreateSecurityGroup for the cluster: tagged at creation, no inbound rules (EC2 adds all egress)."""
    tags = [{"Key": TAG_CLUSTER_ID, "Value": cluster_id}, {"Key": "Name", "Value": cluster_id}]
    return {
        "GroupName": cluster_security_group_name(cluster_id),
        "Description": f"ec2cluster {cluster_id}: workers, no inbound, all egress",
        "VpcId": vpc_id,
        "TagSpecifications": [{"ResourceType": "security-group", "Tags": tags}],
    }


def decode_console_output(output: str | None) -> str:
    """GetConsoleOutput's ``Output`` (base64 of the console's bytes) as text; '' when there is none yet."""
    if not output:
        return ""
    try:
        return base64.b64decode(output).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return output
