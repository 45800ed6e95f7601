"""CreateFleet with Type=instant, as EC2 does it: every instance through the local cloud's RunInstances.

moto's own CreateFleet drops most of the launch template (user data handling, metadata options, network
interfaces, block devices, the instance profile, tags...). Here the request is read as EC2 reads it:

- Pools: each LaunchTemplateConfigs[] entry names a launch template (LaunchTemplateId or
  LaunchTemplateName; Version a number, ``$Latest`` or ``$Default``, the default) and its Overrides (none:
  the template alone). An override may set InstanceType, ImageId, SubnetId (a comma-separated list gives one
  pool per subnet; it replaces network interface 0's subnet when the template has network interfaces),
  AvailabilityZone (the default VPC's default subnet of that zone), Priority, MaxPrice and
  WeightedCapacity. Without a subnet or zone a pool is expanded to one pool per default subnet, as a fleet
  launches into the default VPC's zones. A pool is (instance type, availability zone).
- Capacity: TargetCapacitySpecification's OnDemandTargetCapacity and SpotTargetCapacity, the rest of
  TotalTargetCapacity as DefaultTargetCapacityType (on-demand when absent), in units of WeightedCapacity
  (1 by default): a pool of weight w gives w units per instance.
- Allocation (``allocate``, pure): unit by unit over the pools that have room now (``Headroom``: the local
  cloud's capacity per pool and vCPU quotas, ``ec2cluster_localcloud.capacity``). Spot:
  ``price-capacity-optimized`` (AWS's recommendation): among the pools that can take everything still
  wanted (else: those with the most room), the cheapest; ``capacity-optimized``: the pool with the most
  room (``capacity-optimized-prioritized``: ties by Priority); ``lowest-price``: the cheapest of the
  ``InstancePoolsToUseCount`` (default 1) cheapest pools, spread evenly over them; ``diversified``: evenly
  over every pool. On-demand: ``lowest-price`` (the default), the cheapest; ``prioritized``: the lowest
  Priority number first (none: last), ties by price. Prices: ``ec2cluster_localcloud.prices``. A spot pool
  whose MaxPrice is below its spot price is not used (SpotMaxPriceTooLow). SingleInstanceType /
  SingleAvailabilityZone: all instances of one type / zone, the first group (in the strategy's order) that
  gives the whole target, else the one that gives most. MinTargetCapacity (per market): when the
  allocation cannot reach it, nothing is launched and the answer lists the errors.
- Launch: each pool's share goes through RunInstances (MinCount 1, MaxCount its count) with the template's
  data and the override applied, the fleet's instance and volume tags added, InstanceMarketOptions spot
  (one-time) for spot: the instance runner starts them, the instance profile applies to every instance,
  spot instances are InstanceLifecycle=spot and an account's first spot launch creates the spot
  service-linked role, exactly as for RunInstances. Instances are tagged ``aws:ec2:fleet-id``.
- Answer: FleetId, Instances (per pool and lifecycle: LaunchTemplateAndOverrides, Lifecycle, InstanceIds,
  InstanceType) and Errors (per pool that could not give what was wanted: LaunchTemplateAndOverrides,
  Lifecycle, ErrorCode, ErrorMessage): partial fulfilment is an answer, not an error. A ClientToken seen
  before answers with that call's fleet, instances and errors, and launches nothing.

Fleets of type ``maintain`` and ``request`` go to moto's own implementation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ec2cluster_localcloud import prices

ON_DEMAND, SPOT = "on-demand", "spot"
SPOT_STRATEGIES = (
    "price-capacity-optimized",
    "capacity-optimized",
    "capacity-optimized-prioritized",
    "lowest-price",
    "diversified",
)
ON_DEMAND_STRATEGIES = ("lowest-price", "prioritized")
DEFAULT_SPOT_STRATEGY = (
    "lowest-price"  # EC2 Fleet's documented default (AWS recommends price-capacity-optimized)
)
DEFAULT_ON_DEMAND_STRATEGY = "lowest-price"
# What a launch template's data may carry into RunInstances (RequestLaunchTemplateData's members that
# RunInstances also takes). TagSpecifications are filtered to the resources RunInstances tags.
RUN_INSTANCES_FIELDS = frozenset(
    {
        "BlockDeviceMappings",
        "CapacityReservationSpecification",
        "CpuOptions",
        "CreditSpecification",
        "DisableApiStop",
        "DisableApiTermination",
        "EbsOptimized",
        "EnclaveOptions",
        "HibernationOptions",
        "IamInstanceProfile",
        "ImageId",
        "InstanceInitiatedShutdownBehavior",
        "InstanceMarketOptions",
        "InstanceType",
        "KernelId",
        "KeyName",
        "LicenseSpecifications",
        "MaintenanceOptions",
        "MetadataOptions",
        "Monitoring",
        "NetworkInterfaces",
        "Placement",
        "PrivateDnsNameOptions",
        "RamdiskId",
        "SecurityGroupIds",
        "SecurityGroups",
        "TagSpecifications",
        "UserData",
    }
)
RUN_INSTANCES_TAGGED = ("instance", "volume", "network-interface", "spot-instances-request")
FLEET_ID_TAG = "aws:ec2:fleet-id"


class FleetRequestError(ValueError):
    """The request itself is wrong (EC2 answers it with a client error, InvalidParameterValue...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Headroom(Protocol):
    """Room for new instances per pool, as the local cloud's capacity and quotas say."""

    def fits(self, instance_type: str, availability_zone: str, market: str) -> float:
        """How many more instances fit now (math.inf: no limit)."""
        ...

    def take(self, instance_type: str, availability_zone: str, market: str, count: int) -> None: ...

    def why_not(self, instance_type: str, availability_zone: str, market: str) -> tuple[str, str]:
        """(EC2 error code, message) of a launch that does not fit."""
        ...

    def copy(self) -> Headroom: ...


class Unlimited:
    """No capacity limit anywhere."""

    def fits(self, instance_type: str, availability_zone: str, market: str) -> float:
        return math.inf

    def take(self, instance_type: str, availability_zone: str, market: str, count: int) -> None:
        pass

    def why_not(self, instance_type: str, availability_zone: str, market: str) -> tuple[str, str]:
        return ("InsufficientInstanceCapacity", "There is no capacity for this request.")

    def copy(self) -> Unlimited:
        return self


@dataclass
class Pool:
    """One (launch template, override, subnet): an instance type in an availability zone."""

    order: int
    template_specification: dict[str, Any]  # as the answer names it (LaunchTemplateId, Name, Version)
    overrides: dict[str, Any] | None  # as requested (the answer echoes them)
    params: dict[str, Any]  # RunInstances' parameters, without counts, market and token
    instance_type: str
    availability_zone: str
    subnet_id: str | None = None
    priority: float = math.inf
    weight: float = 1.0
    max_price: float | None = None

    def price(self, market: str) -> float:
        found = prices.price(self.instance_type, market)
        return math.inf if found is None else found

    def launch_template_and_overrides(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"LaunchTemplateSpecification": dict(self.template_specification)}
        if self.overrides:
            answer["Overrides"] = dict(self.overrides)
        return answer


@dataclass(frozen=True)
class MarketOptions:
    """SpotOptions or OnDemandOptions, as allocation reads them."""

    strategy: str
    min_target_capacity: int = 0
    single_instance_type: bool = False
    single_availability_zone: bool = False
    pools_to_use: int = 1  # InstancePoolsToUseCount (spot lowest-price)
    max_total_price: float | None = None

    @classmethod
    def from_request(cls, options: Mapping[str, Any] | None, market: str) -> MarketOptions:
        options = options or {}
        known = SPOT_STRATEGIES if market == SPOT else ON_DEMAND_STRATEGIES
        default = DEFAULT_SPOT_STRATEGY if market == SPOT else DEFAULT_ON_DEMAND_STRATEGY
        strategy = str(options.get("AllocationStrategy") or default)
        # EC2 still accepts the older camel-case spellings.
        strategy = {"lowestPrice": "lowest-price", "capacityOptimized": "capacity-optimized"}.get(
            strategy, strategy
        )
        if strategy not in known:
            raise FleetRequestError(
                "InvalidParameterValue",
                f"The allocation strategy '{strategy}' is not valid for {market} capacity: use one of "
                + ", ".join(known),
            )
        total = options.get("MaxTotalPrice")
        return cls(
            strategy=strategy,
            min_target_capacity=int(options.get("MinTargetCapacity") or 0),
            single_instance_type=bool(options.get("SingleInstanceType")),
            single_availability_zone=bool(options.get("SingleAvailabilityZone")),
            pools_to_use=max(1, int(options.get("InstancePoolsToUseCount") or 1)),
            max_total_price=float(total) if total not in (None, "") else None,
        )


@dataclass
class Allocation:
    """What allocation decided for one market: instances per pool, and the pools' errors."""

    market: str
    counts: dict[int, int] = field(default_factory=dict)  # pool order -> instances
    units: float = 0.0
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # pool order -> (code, message)


def target_units(specification: Mapping[str, Any]) -> tuple[int, int]:
    """(on-demand units, spot units) a TargetCapacitySpecification asks for."""
    total = int(specification.get("TotalTargetCapacity") or 0)
    on_demand = int(specification.get("OnDemandTargetCapacity") or 0)
    spot = int(specification.get("SpotTargetCapacity") or 0)
    if total < on_demand + spot:
        raise FleetRequestError(
            "InvalidTargetCapacitySpecification",
            "TotalTargetCapacity should not be less than the sum of OnDemandTargetCapacity and "
            "SpotTargetCapacity.",
        )
    rest = total - on_demand - spot
    default = specification.get("DefaultTargetCapacityType") or ON_DEMAND
    if default not in (ON_DEMAND, SPOT):
        raise FleetRequestError(
            "InvalidParameterValue", f"DefaultTargetCapacityType must be on-demand or spot, not {default!r}"
        )
    return (on_demand + rest, spot) if default == ON_DEMAND else (on_demand, spot + rest)


def _rank(pool: Pool, market: str, options: MarketOptions, room: float, allocated: int, remaining: float):
    """The sort key of one candidate pool for the next instance (smaller first)."""
    price = pool.price(market)
    strategy = options.strategy
    if market == ON_DEMAND:
        if strategy == "prioritized":
            return (pool.priority, price, pool.order)
        return (price, pool.order)
    if strategy == "price-capacity-optimized":
        takes_all = room * pool.weight >= remaining
        return (0 if takes_all else 1, 0 if takes_all else -room, price, pool.order)
    if strategy == "capacity-optimized":
        return (-room, pool.order)
    if strategy == "capacity-optimized-prioritized":
        return (-room, pool.priority, pool.order)
    if strategy == "diversified":
        return (allocated, pool.order)
    return (price, pool.order)  # lowest-price (InstancePoolsToUseCount narrows the set first)


def _allocate_group(
    pools: list[Pool], units: float, market: str, options: MarketOptions, headroom: Headroom
) -> Allocation:
    allocation = Allocation(market)
    eligible = []
    for pool in pools:
        if market == SPOT and pool.max_price is not None and pool.max_price < pool.price(market):
            allocation.errors[pool.order] = (
                "SpotMaxPriceTooLow",
                f"Your Spot request price of {pool.max_price:g} is lower than the minimum required Spot "
                f"request fulfillment price of {pool.price(market):g}.",
            )
            continue
        eligible.append(pool)
    if market == SPOT and options.strategy == "lowest-price":
        eligible.sort(key=lambda pool: (pool.price(market), pool.order))
    remaining = float(units)
    spent = 0.0
    while remaining > 0:
        rooms = {
            pool.order: headroom.fits(pool.instance_type, pool.availability_zone, market) for pool in eligible
        }
        candidates = [pool for pool in eligible if rooms[pool.order] >= 1]
        if market == SPOT and options.strategy == "lowest-price":
            candidates = candidates[: options.pools_to_use]
            if candidates:  # spread evenly over the N cheapest pools that have room
                fewest = min(allocation.counts.get(pool.order, 0) for pool in candidates)
                candidates = [pool for pool in candidates if allocation.counts.get(pool.order, 0) == fewest]
        if options.max_total_price is not None:
            candidates = [
                pool for pool in candidates if spent + pool.price(market) <= options.max_total_price
            ]
        if not candidates:
            break
        chosen = min(
            candidates,
            key=lambda pool: _rank(
                pool, market, options, rooms[pool.order], allocation.counts.get(pool.order, 0), remaining
            ),
        )
        # Spreading strategies place one instance at a time; the others fill the chosen pool as far as it
        # goes, then choose again.
        spreading = options.strategy == "diversified" or (
            market == SPOT and options.strategy == "lowest-price" and options.pools_to_use > 1
        )
        wanted = math.ceil(remaining / chosen.weight)
        count = 1 if spreading else int(min(rooms[chosen.order], wanted))
        if options.max_total_price is not None and math.isfinite(chosen.price(market)):
            count = max(1, min(count, int((options.max_total_price - spent) // chosen.price(market))))
        headroom.take(chosen.instance_type, chosen.availability_zone, market, count)
        allocation.counts[chosen.order] = allocation.counts.get(chosen.order, 0) + count
        allocation.units += chosen.weight * count
        spent += chosen.price(market) * count if math.isfinite(chosen.price(market)) else 0.0
        remaining -= chosen.weight * count
    if remaining > 0:  # short: every pool that had no room says why
        for pool in eligible:
            if headroom.fits(pool.instance_type, pool.availability_zone, market) < 1:
                allocation.errors.setdefault(
                    pool.order, headroom.why_not(pool.instance_type, pool.availability_zone, market)
                )
    return allocation


def allocate(
    pools: list[Pool], units: float, market: str, options: MarketOptions, headroom: Headroom
) -> Allocation:
    """Which pools give ``units`` of ``market`` capacity (pure; ``headroom`` is taken from as it goes)."""
    if units <= 0 or not pools:
        return Allocation(market)
    if not (options.single_instance_type or options.single_availability_zone):
        return _allocate_group(pools, units, market, options, headroom)

    def group_key(pool: Pool) -> tuple[str, ...]:
        key = ()
        if options.single_instance_type:
            key += (pool.instance_type,)
        if options.single_availability_zone:
            key += (pool.availability_zone,)
        return key

    groups: dict[tuple[str, ...], list[Pool]] = {}
    for pool in pools:
        groups.setdefault(group_key(pool), []).append(pool)
    best: tuple[tuple[str, ...], Allocation] | None = None
    trials = []
    for key, members in groups.items():
        trial = _allocate_group(members, units, market, options, headroom.copy())
        trials.append((key, trial))
        # The first group, in the strategy's order of its best pool, that gives it all.
        if trial.units >= units and (
            best is None
            or _group_order(trial, members, market, options)
            < _group_order(best[1], groups[best[0]], market, options)
        ):
            best = (key, trial)
    if best is None:
        best = max(trials, key=lambda item: (item[1].units, -min(p.order for p in groups[item[0]])))
    key, chosen = best
    final = _allocate_group(groups[key], units, market, options, headroom)
    for other, trial in trials:
        if other != key and chosen.units < units:
            for order, error in trial.errors.items():
                final.errors.setdefault(order, error)
    return final


def _group_order(allocation: Allocation, members: list[Pool], market: str, options: MarketOptions):
    used = [pool for pool in members if allocation.counts.get(pool.order)]
    return min(_rank(pool, market, options, math.inf, 0, 0.0) for pool in used) if used else (math.inf,)


# -- Reading the request ----------------------------------------------------------------------------------


def _tags_of(specifications: Iterable[Mapping[str, Any]] | None, resource_type: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for specification in specifications or []:
        if specification.get("ResourceType") == resource_type:
            for tag in specification.get("Tags") or []:
                tags[tag["Key"]] = tag.get("Value", "")
    return tags


def run_instances_params(
    data: Mapping[str, Any],
    override: Mapping[str, Any],
    subnet_id: str | None,
    fleet_tag_specifications: Iterable[Mapping[str, Any]] | None,
) -> dict[str, Any]:
    """RunInstances' parameters for one pool: the template's data, the override, the fleet's tags."""
    params = {key: copy.deepcopy(value) for key, value in data.items() if key in RUN_INSTANCES_FIELDS}
    if hasattr(params.get("UserData"), "as_bytes"):  # moto keeps a template's user data encoded
        params["UserData"] = params["UserData"].as_bytes()
    for key in ("InstanceType", "ImageId", "KeyName", "IamInstanceProfile", "MetadataOptions"):
        if override.get(key):
            params[key] = copy.deepcopy(override[key])
    if override.get("BlockDeviceMappings"):
        params["BlockDeviceMappings"] = copy.deepcopy(override["BlockDeviceMappings"])
    if subnet_id:
        if params.get("NetworkInterfaces"):
            primary = next(
                (ni for ni in params["NetworkInterfaces"] if int(ni.get("DeviceIndex") or 0) == 0),
                params["NetworkInterfaces"][0],
            )
            primary["SubnetId"] = subnet_id
        else:
            params["SubnetId"] = subnet_id
        placement = dict(params.get("Placement") or {})
        placement.pop("AvailabilityZone", None)
        if placement:
            params["Placement"] = placement
        else:
            params.pop("Placement", None)
    fleet_specs = list(fleet_tag_specifications or [])
    merged = []
    for resource_type in RUN_INSTANCES_TAGGED:
        tags = {
            **_tags_of(params.get("TagSpecifications"), resource_type),
            **_tags_of(fleet_specs, resource_type),
        }
        if tags:
            merged.append(
                {"ResourceType": resource_type, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            )
    params.pop("TagSpecifications", None)
    if merged:
        params["TagSpecifications"] = merged
    params.pop("InstanceMarketOptions", None)  # the fleet decides the market of each instance
    return params


def with_market(params: Mapping[str, Any], market: str, max_price: float | None) -> dict[str, Any]:
    launched = dict(params)
    if market == SPOT:
        spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if max_price is not None:
            spot["MaxPrice"] = f"{max_price:g}"
        launched["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
    return launched


def _float(value: Any, default: float | None) -> float | None:
    if value in (None, ""):
        return default
    return float(value)


def read_pools(
    configs: list[Mapping[str, Any]],
    fleet_tag_specifications: list[Mapping[str, Any]] | None,
    *,
    template_version: Callable[[Mapping[str, Any]], tuple[dict[str, Any], dict[str, Any]]],
    subnet_zone: Callable[[str], str],
    default_subnets: Callable[[], dict[str, str]],
    spot_max_price: float | None = None,
) -> list[Pool]:
    """The request's pools. ``template_version(spec)``: (the answer's LaunchTemplateSpecification, the
    version's data); ``subnet_zone(id)``: a subnet's zone; ``default_subnets()``: zone -> default subnet."""
    pools: list[Pool] = []
    if not configs:
        raise FleetRequestError(
            "MissingParameter", "The request must contain the parameter LaunchTemplateConfigs"
        )
    for config in configs:
        specification = config.get("LaunchTemplateSpecification") or {}
        if not (specification.get("LaunchTemplateId") or specification.get("LaunchTemplateName")):
            raise FleetRequestError(
                "InvalidLaunchTemplateSpecification",
                "A launch template specification needs a LaunchTemplateId or a LaunchTemplateName.",
            )
        answered, data = template_version(specification)
        for override in config.get("Overrides") or [{}]:
            instance_type = override.get("InstanceType") or data.get("InstanceType")
            if not instance_type:
                raise FleetRequestError(
                    "InvalidFleetConfiguration",
                    "The launch template and its overrides name no instance type.",
                )
            interfaces = data.get("NetworkInterfaces") or []
            template_subnet = next((ni.get("SubnetId") for ni in interfaces if ni.get("SubnetId")), None)
            subnets: list[str | None]
            if override.get("SubnetId"):
                subnets = [s.strip() for s in str(override["SubnetId"]).split(",") if s.strip()]
            elif template_subnet:
                subnets = [template_subnet]
            else:
                zone = override.get("AvailabilityZone") or (data.get("Placement") or {}).get(
                    "AvailabilityZone"
                )
                defaults = default_subnets()
                if zone:
                    if zone not in defaults:
                        raise FleetRequestError(
                            "InvalidParameterValue", f"The availability zone {zone} has no default subnet."
                        )
                    subnets = [defaults[zone]]
                else:
                    subnets = [defaults[z] for z in sorted(defaults)]
            for subnet in subnets:
                zone = subnet_zone(subnet)
                params = run_instances_params(
                    {**data, "InstanceType": instance_type}, override, subnet, fleet_tag_specifications
                )
                pools.append(
                    Pool(
                        order=len(pools),
                        template_specification=answered,
                        overrides=dict(override) or None,
                        params=params,
                        instance_type=instance_type,
                        availability_zone=zone,
                        subnet_id=subnet,
                        priority=_float(override.get("Priority"), math.inf),
                        weight=_float(override.get("WeightedCapacity"), 1.0) or 1.0,
                        max_price=_float(override.get("MaxPrice"), spot_max_price),
                    )
                )
    return pools


# -- The fleet record (DescribeFleets, DeleteFleets) ------------------------------------------------------


class InstantFleet:
    """An instant fleet as moto's fleet backend keeps it: DescribeFleets reads it as FleetData."""

    fleet_type = "instant"

    def __init__(self, backend: Any, fleet_id: str, request: Mapping[str, Any], answer: dict[str, Any]):
        from moto.core.utils import utcnow

        self.ec2_backend = backend
        self.id = fleet_id
        self.request = dict(request)
        self.answer = answer
        self.state = "active"
        self.create_time = utcnow()
        self.tags = [
            {"Key": k, "Value": v} for k, v in _tags_of(request.get("TagSpecifications"), "fleet").items()
        ]
        self.target_capacity = int(
            (request.get("TargetCapacitySpecification") or {}).get("TotalTargetCapacity") or 0
        )
        self.spot_requests: list[Any] = []
        self.on_demand_instances = [
            {"instance": backend.get_instance(instance_id)}
            for item in answer.get("Instances", [])
            for instance_id in item["InstanceIds"]
        ]

    @property
    def type(self) -> str:
        return self.fleet_type

    def _fulfilled(self, lifecycle: str | None = None) -> float:
        return float(
            sum(
                len(item["InstanceIds"])
                for item in self.answer.get("Instances", [])
                if lifecycle is None or item["Lifecycle"] == lifecycle
            )
        )

    def __getitem__(self, key: str) -> Any:
        values = {
            "FleetId": self.id,
            "FleetState": self.state,
            "Type": self.fleet_type,
            "CreateTime": self.create_time,
            "ClientToken": self.request.get("ClientToken"),
            "ActivityStatus": "fulfilled",
            "FulfilledCapacity": self._fulfilled(),
            "FulfilledOnDemandCapacity": self._fulfilled(ON_DEMAND),
            "LaunchTemplateConfigs": self.request.get("LaunchTemplateConfigs"),
            "TargetCapacitySpecification": self.request.get("TargetCapacitySpecification"),
            "SpotOptions": self.request.get("SpotOptions"),
            "OnDemandOptions": self.request.get("OnDemandOptions"),
            "Tags": self.tags,
            "Errors": self.answer.get("Errors"),
            "Instances": self.answer.get("Instances"),
            "TerminateInstancesWithExpiration": False,
            "ReplaceUnhealthyInstances": False,
        }
        if key not in values or values[key] is None:
            raise KeyError(key)
        return values[key]

    def terminate_instances(self) -> None:
        ids = [
            item["instance"].id for item in self.on_demand_instances if item["instance"].state != "terminated"
        ]
        if ids:
            self.ec2_backend.terminate_instances(ids)


# -- The moto patch --------------------------------------------------------------------------------------


def _already_patched(function: object, marker: str) -> bool:
    while function is not None:
        if getattr(function, marker, False):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def make_create_fleet_instant(headroom_of: Callable[[Any], Headroom] | None = None) -> None:
    """CreateFleet Type=instant as described above; ``headroom_of(backend)`` gives the pools' room now
    (default: unlimited)."""
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.responses.fleets import Fleets
    from moto.ec2.utils import random_fleet_id

    original = Fleets.create_fleet
    if _already_patched(original, "ec2cluster_instant"):
        return

    def create_fleet(self):
        if self._get_param("Type", "maintain") != "instant":
            return original(self)
        self.error_on_dryrun()
        backend = self.ec2_backend
        tokens = backend.__dict__.setdefault("_ec2cluster_fleet_tokens", {})
        token = self._get_param("ClientToken")
        if token and token in tokens:
            return ActionResult(tokens[token].answer)
        request = {
            key: copy.deepcopy(self._get_param(key))
            for key in (
                "ClientToken",
                "LaunchTemplateConfigs",
                "TargetCapacitySpecification",
                "SpotOptions",
                "OnDemandOptions",
                "TagSpecifications",
            )
            if self._get_param(key) is not None
        }
        try:
            answer, fleet_id = _create_instant_fleet(self, backend, request, headroom_of, random_fleet_id())
        except FleetRequestError as error:
            raise EC2ClientError(error.code, error.message) from None
        fleet = InstantFleet(backend, fleet_id, request, answer)
        backend.fleets[fleet_id] = fleet
        if token:
            tokens[token] = fleet
        return ActionResult(answer)

    create_fleet.ec2cluster_instant = True
    create_fleet.__wrapped__ = original
    Fleets.create_fleet = create_fleet


def _create_instant_fleet(response, backend, request, headroom_of, fleet_id: str):
    from moto.ec2.exceptions import EC2ClientError

    from ec2cluster_localcloud.capacity import LaunchRefusedError

    def template_version(specification: Mapping[str, Any]):
        if specification.get("LaunchTemplateId"):
            template = backend.get_launch_template(specification["LaunchTemplateId"])
        else:
            template = backend.get_launch_template_by_name(specification["LaunchTemplateName"])
        version = specification.get("Version") or "$Default"
        data = template.get_version(version).data
        answered = {
            "LaunchTemplateId": template.id,
            "LaunchTemplateName": template.name,
            "Version": str(version),
        }
        return answered, data

    def subnet_zone(subnet_id: str) -> str:
        return backend.get_subnet(subnet_id).availability_zone

    def default_subnets() -> dict[str, str]:
        return {zone: subnet.id for zone, subnet in backend.get_default_subnets().items()}

    spot_options = request.get("SpotOptions") or {}
    on_demand_units, spot_units = target_units(request.get("TargetCapacitySpecification") or {})
    pools = read_pools(
        request["LaunchTemplateConfigs"] if request.get("LaunchTemplateConfigs") else [],
        request.get("TagSpecifications"),
        template_version=template_version,
        subnet_zone=subnet_zone,
        default_subnets=default_subnets,
    )
    headroom = headroom_of(backend) if headroom_of else Unlimited()
    plans = []
    for market, units, options in (
        (ON_DEMAND, on_demand_units, MarketOptions.from_request(request.get("OnDemandOptions"), ON_DEMAND)),
        (SPOT, spot_units, MarketOptions.from_request(spot_options, SPOT)),
    ):
        plans.append((allocate(pools, units, market, options, headroom), options))
    by_order = {pool.order: pool for pool in pools}
    errors: list[dict[str, Any]] = []

    def error_item(pool: Pool, market: str, code: str, message: str) -> dict[str, Any]:
        return {
            "LaunchTemplateAndOverrides": pool.launch_template_and_overrides(),
            "Lifecycle": market,
            "ErrorCode": code,
            "ErrorMessage": message,
        }

    for allocation, _ in plans:
        for order, (code, message) in sorted(allocation.errors.items()):
            errors.append(error_item(by_order[order], allocation.market, code, message))
    if any(allocation.units < options.min_target_capacity for allocation, options in plans):
        return {"FleetId": fleet_id, "Errors": errors, "Instances": []}, fleet_id
    instances: list[dict[str, Any]] = []
    launches = 0
    for allocation, _ in plans:
        for order, count in sorted(allocation.counts.items()):
            pool = by_order[order]
            launches += 1
            params = with_market(
                pool.params, allocation.market, pool.max_price if allocation.market == SPOT else None
            )
            params.update({"MinCount": 1, "MaxCount": count, "ClientToken": f"{fleet_id}-{launches}"})
            try:
                launched = run_instances_as(response, params)
            except LaunchRefusedError as refused:
                errors.append(error_item(pool, allocation.market, refused.code, refused.message))
                continue
            except EC2ClientError as error:
                errors.append(error_item(pool, allocation.market, error.code, error.message))
                continue
            for instance in launched:
                instance.add_tags({FLEET_ID_TAG: fleet_id})
            instances.append(
                {
                    "LaunchTemplateAndOverrides": pool.launch_template_and_overrides(),
                    "Lifecycle": allocation.market,
                    "InstanceIds": [instance.id for instance in launched],
                    "InstanceType": pool.instance_type,
                }
            )
    return {"FleetId": fleet_id, "Errors": errors, "Instances": instances}, fleet_id


def run_instances_as(response, params: dict[str, Any]) -> list[Any]:
    """Run the local cloud's RunInstances (every patch of it) with ``params``, inside this request.

    A refusal that RunInstances would answer with an error raises LaunchRefusedError (capacity, quota) or
    moto's EC2ClientError."""
    saved = response.params
    response.params = params
    response.ec2cluster_raise_refusals = True
    try:
        result = response.run_instances()
    finally:
        response.params = saved
        response.ec2cluster_raise_refusals = False
    return list(result.result.instances)
