"""EC2: the cluster's instances by tag, termination in batches, its security group, consoles (the launch
itself is EC2 Fleet's: ``aws/fleet.py``)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from airflow_ec2cluster.cluster import (
    TAG_CLUSTER_ID,
    TAG_LAUNCH_TOKEN,
    cluster_security_group_name,
)
from airflow_ec2cluster.drain.decisions import LIVE_STATES

# Instance ids per TerminateInstances call and per waiter call.
EC2_ID_BATCH = 500


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
