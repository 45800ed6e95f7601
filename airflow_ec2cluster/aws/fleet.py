"""EC2 Fleet: the cluster's launch template, CreateFleet (type ``instant``) over its pools, and its answer.

A *pool* is one instance type in one subnet (so one availability zone) in one market, spot or on-demand:
EC2's unit of capacity. One CreateFleet call asks for N instances over every pool of a market at once;
EC2 picks pools by the allocation strategy (spot: ``price-capacity-optimized``, AWS's recommendation;
on-demand: ``lowest-price`` or ``prioritized``, the order the types and subnets were given in), starts what
it can, and names each pool it could not use in ``Errors``: partial fulfilment is a normal answer, not an
exception. What the instances are (AMI, user data, instance profile, IMDSv2, encrypted root volume,
network interface, shutdown behaviour) is the launch template's; the fleet adds the pools and the tags.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from airflow_ec2cluster.cluster import (
    ON_DEMAND,
    SPOT,
    TAG_CLUSTER_ID,
    LaunchSpec,
    cluster_tags,
)

# EC2's cap on a launch template name; ours: ec2cluster-<cluster id>-<hash of what it holds>.
LAUNCH_TEMPLATE_PREFIX = "ec2cluster-"
# Overrides per CreateFleet call (EC2 allows 300 per fleet).
MAX_POOLS = 300
# An error of the whole call (no pool named): the request was refused before any pool was tried.
ANY_POOL = "*"
# What EC2 says when a pool is empty or a quota is reached: worth trying again later or elsewhere.
CAPACITY_ERROR_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "VcpuLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "InstanceLimitExceeded",
        "SpotMaxPriceTooLow",
        "UnfulfillableCapacity",
    }
)


@dataclass(frozen=True)
class LaunchedInstance:
    instance_id: str
    instance_type: str
    subnet_id: str | None
    lifecycle: str

    @property
    def pool(self) -> str:
        return pool_name(self.instance_type, self.subnet_id, self.lifecycle)


@dataclass(frozen=True)
class PoolError:
    """One pool EC2 could not use (or the whole call, ``instance_type`` ANY_POOL), with EC2's error."""

    instance_type: str
    subnet_id: str | None
    lifecycle: str
    code: str
    message: str

    @property
    def pool(self) -> str:
        return pool_name(self.instance_type, self.subnet_id, self.lifecycle)

    @property
    def capacity(self) -> bool:
        """A capacity or quota error: another pool, or the same one later, may work."""
        return self.code in CAPACITY_ERROR_CODES

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "code": self.code, "message": self.message[:300]}


@dataclass(frozen=True)
class LaunchOutcome:
    """What one launch (one or two CreateFleet calls) did: the instances kept, the pools' errors, and
    the instances released because fewer than the launch's minimum started."""

    requested: int
    instances: tuple[LaunchedInstance, ...] = ()
    errors: tuple[PoolError, ...] = ()
    released: tuple[str, ...] = ()

    @property
    def instance_ids(self) -> list[str]:
        return [i.instance_id for i in self.instances]

    @property
    def short(self) -> int:
        return max(0, self.requested - len(self.instances))

    def by_pool(self) -> dict[str, int]:
        pools: dict[str, int] = {}
        for instance in self.instances:
            pools[instance.pool] = pools.get(instance.pool, 0) + 1
        return dict(sorted(pools.items()))

    def record(self, at: float) -> dict[str, Any]:
        """For the META item's launch history (JSON-safe, bounded: one entry per pool and error code)."""
        errors: dict[tuple[str, str], dict[str, Any]] = {}
        for error in self.errors:
            errors.setdefault((error.pool, error.code), error.to_dict())
        return {
            "at": at,
            "requested": self.requested,
            "launched": len(self.instances),
            "pools": self.by_pool(),
            "released": len(self.released),
            "errors": list(errors.values())[:MAX_ERRORS_RECORDED],
        }

    def merged(self, other: LaunchOutcome) -> LaunchOutcome:
        return LaunchOutcome(
            requested=self.requested,
            instances=self.instances + other.instances,
            errors=self.errors + other.errors,
            released=self.released + other.released,
        )


# Distinct (pool, error) entries kept per launch in the META item.
MAX_ERRORS_RECORDED = 20


def pool_name(instance_type: str, subnet_id: str | None, lifecycle: str) -> str:
    return f"{instance_type} in {subnet_id or 'any subnet'} ({lifecycle})"


def launch_template_data(cluster_id: str, spec: LaunchSpec) -> dict[str, Any]:
    """What every worker is, whatever its pool: RunInstances' settings, in a launch template."""
    tags = [{"Key": key, "Value": value} for key, value in cluster_tags(cluster_id, spec.extra_tags).items()]
    interface: dict[str, Any] = {
        "DeviceIndex": 0,
        "DeleteOnTermination": True,
        # Explicit: network="public" needs one (an internet gateway carries only instances that have a
        # public IP); "private" must not get one from a subnet that auto-assigns them (they are billed).
        "AssociatePublicIpAddress": spec.associate_public_ip,
    }
    if spec.security_group_ids:
        interface["Groups"] = list(spec.security_group_ids)
    data: dict[str, Any] = {
        "ImageId": spec.image_id,
        "InstanceType": spec.types()[0],
        "UserData": spec.user_data_b64,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpEndpoint": "enabled",
            "HttpPutResponseHopLimit": spec.metadata_hop_limit,
        },
        "NetworkInterfaces": [interface],
        # Volumes carry the cluster's tags (the fleet tags the instances, with the launch's token).
        "TagSpecifications": [{"ResourceType": "volume", "Tags": tags}],
    }
    if spec.instance_profile:
        key = "Arn" if spec.instance_profile.startswith("arn:") else "Name"
        data["IamInstanceProfile"] = {key: spec.instance_profile}
    if spec.key_name:
        data["KeyName"] = spec.key_name
    if spec.root_device_name:
        ebs: dict[str, Any] = {"Encrypted": True, "DeleteOnTermination": True, "VolumeType": "gp3"}
        if spec.volume_size_gb:
            ebs["VolumeSize"] = spec.volume_size_gb
        data["BlockDeviceMappings"] = [{"DeviceName": spec.root_device_name, "Ebs": ebs}]
    return data


def launch_template_name(cluster_id: str, data: dict[str, Any]) -> str:
    """One template per cluster and content: a re-run with other arguments gets a template of its own, a
    retry finds the one its first try made."""
    digest = hashlib.sha256(repr(sorted_items(data)).encode()).hexdigest()[:12]
    return f"{LAUNCH_TEMPLATE_PREFIX}{cluster_id}-{digest}"


def sorted_items(value: Any) -> Any:
    if isinstance(value, dict):
        return [(key, sorted_items(value[key])) for key in sorted(value)]
    if isinstance(value, list):
        return [sorted_items(item) for item in value]
    return value


def create_launch_template_params(cluster_id: str, spec: LaunchSpec) -> dict[str, Any]:
    data = launch_template_data(cluster_id, spec)
    return {
        "LaunchTemplateName": launch_template_name(cluster_id, data),
        "LaunchTemplateData": data,
        "TagSpecifications": [
            {"ResourceType": "launch-template", "Tags": [{"Key": TAG_CLUSTER_ID, "Value": cluster_id}]}
        ],
    }


def launch_template_filters(cluster_id: str) -> list[dict[str, Any]]:
    """DescribeLaunchTemplates filters: the cluster's templates, by tag."""
    return [{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}]


def fleet_overrides(spec: LaunchSpec, market: str, avoid: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One override per pool of ``market``: each type in each subnet, in the order given (``Priority``:
    earlier types first, for the on-demand ``prioritized`` strategy). Pools named in ``avoid`` go last
    (their priority after every other) or, when other pools remain, are left out."""
    avoided = set(avoid)
    subnets: list[str | None] = list(spec.subnet_ids) or [None]
    pools = []
    for type_index, instance_type in enumerate(spec.types()):
        for subnet_index, subnet in enumerate(subnets):
            override: dict[str, Any] = {"InstanceType": instance_type}
            if subnet:
                override["SubnetId"] = subnet
            if market == SPOT and spec.spot_max_price:
                override["MaxPrice"] = str(spec.spot_max_price)
            override["Priority"] = float(type_index * len(subnets) + subnet_index)
            pools.append((pool_name(instance_type, subnet, market) in avoided, override))
    kept = [override for avoided_pool, override in pools if not avoided_pool]
    return (kept or [override for _, override in pools])[:MAX_POOLS]


def create_fleet_params(
    *,
    cluster_id: str,
    spec: LaunchSpec,
    market: str,
    count: int,
    client_token: str,
    extra_tags: dict[str, str] | None = None,
    avoid: Iterable[str] = (),
) -> dict[str, Any]:
    """CreateFleet (instant) for ``count`` workers of ``market`` over every pool; EC2 starts what it can."""
    if not spec.launch_template_id:
        raise ValueError("the launch spec has no launch template: the launch operator creates one")
    tags = [
        {"Key": key, "Value": value}
        for key, value in cluster_tags(cluster_id, {**spec.extra_tags, **(extra_tags or {})}).items()
    ]
    params: dict[str, Any] = {
        "Type": "instant",
        "ClientToken": client_token,
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateId": spec.launch_template_id,
                    "Version": "$Latest",
                },
                "Overrides": fleet_overrides(spec, market, avoid),
            }
        ],
        "TargetCapacitySpecification": {
            "TotalTargetCapacity": count,
            "DefaultTargetCapacityType": market,
            "OnDemandTargetCapacity": count if market == ON_DEMAND else 0,
            "SpotTargetCapacity": count if market == SPOT else 0,
        },
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
    }
    if market == SPOT:
        params["SpotOptions"] = {
            "AllocationStrategy": spec.spot_strategy,
            "InstanceInterruptionBehavior": "terminate",
        }
    else:
        params["OnDemandOptions"] = {"AllocationStrategy": spec.on_demand_strategy}
    return params


def fleet_outcome(response: dict[str, Any], requested: int, market: str) -> LaunchOutcome:
    """A CreateFleet (instant) answer as a LaunchOutcome."""
    instances = []
    for group in response.get("Instances") or []:
        override = (group.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
        for instance_id in group.get("InstanceIds") or []:
            instances.append(
                LaunchedInstance(
                    instance_id=instance_id,
                    instance_type=group.get("InstanceType") or override.get("InstanceType") or "",
                    subnet_id=override.get("SubnetId"),
                    lifecycle=group.get("Lifecycle") or market,
                )
            )
    errors = []
    for error in response.get("Errors") or []:
        override = (error.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
        errors.append(
            PoolError(
                instance_type=override.get("InstanceType") or ANY_POOL,
                subnet_id=override.get("SubnetId"),
                lifecycle=error.get("Lifecycle") or market,
                code=str(error.get("ErrorCode") or "Unknown"),
                message=str(error.get("ErrorMessage") or ""),
            )
        )
    return LaunchOutcome(requested=requested, instances=tuple(instances), errors=tuple(errors))


def refused_outcome(code: str, message: str, requested: int, market: str) -> LaunchOutcome:
    """A CreateFleet call EC2 refused whole (a quota, a permission, a deleted template...)."""
    return LaunchOutcome(requested=requested, errors=(PoolError(ANY_POOL, None, market, code, message),))


def market_token(client_token: str, market: str, first: bool) -> str:
    """The ClientToken of one market's CreateFleet within a launch (64 characters at most)."""
    return client_token if first else f"{client_token}-{market[:2]}"[:64]


# Instance types an ``instance_requirements`` launch may use at most (EC2 allows 300 pools a fleet).
MAX_MATCHED_TYPES = 20
REQUIREMENT_KEYS = ("vcpus", "memory_gib", "max_types")


def requirement_problems(requirements: Any) -> list[str]:
    """What is wrong with ``instance_requirements`` ({"vcpus": [min, max], "memory_gib": [min, max]})."""
    if not isinstance(requirements, dict):
        return [
            f"instance_requirements: {requirements!r} is not a mapping; give e.g. "
            '{"vcpus": [2, 8], "memory_gib": [4, 32]}'
        ]
    problems = [
        f"instance_requirements.{key}: unknown; use {', '.join(REQUIREMENT_KEYS)}"
        for key in requirements
        if key not in REQUIREMENT_KEYS
    ]
    for key in ("vcpus", "memory_gib"):
        bounds = requirements.get(key)
        if bounds is None:
            if key == "vcpus":
                problems.append('instance_requirements.vcpus: required, e.g. "vcpus": [2, 8]')
            continue
        try:
            low, high = (float(bounds[0]), float(bounds[1]))
            if len(bounds) != 2 or low < 0 or high < low:
                raise ValueError
        except (TypeError, ValueError, IndexError, KeyError):
            problems.append(f"instance_requirements.{key}: {bounds!r} is not [min, max] with 0 <= min <= max")
    limit = requirements.get("max_types", MAX_MATCHED_TYPES)
    if not isinstance(limit, int) or not 1 <= limit <= MAX_POOLS:
        problems.append(
            f"instance_requirements.max_types: {limit!r} is not a whole number from 1 to {MAX_POOLS}"
        )
    return problems


def types_matching(requirements: dict[str, Any], infos: Iterable[dict[str, Any]]) -> list[str]:
    """The instance types (DescribeInstanceTypes entries) within the vCPU and memory ranges, smallest
    first (fewest vCPUs, then least memory, then name), bare metal left out, at most ``max_types``."""
    low_cpu, high_cpu = (float(v) for v in requirements["vcpus"])
    low_mem, high_mem = (float(v) for v in requirements.get("memory_gib") or (0, float("inf")))
    found = []
    for info in infos:
        vcpus = float(info.get("VCpuInfo", {}).get("DefaultVCpus") or 0)
        memory = float(info.get("MemoryInfo", {}).get("SizeInMiB") or 0) / 1024
        if info.get("BareMetal") or not low_cpu <= vcpus <= high_cpu or not low_mem <= memory <= high_mem:
            continue
        found.append((vcpus, memory, info["InstanceType"]))
    limit = int(requirements.get("max_types", MAX_MATCHED_TYPES))
    return [name for _, _, name in sorted(found)][:limit]
