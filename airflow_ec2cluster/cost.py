"""Pure: what the cluster's instances have cost, from EC2's own times and a price per pool.

Instance time is EC2's, never a worker's (a worker writes its status item and could write anything): an
instance counts from its ``LaunchTime`` to the time EC2 stamps in ``StateTransitionReason`` when it stops or
is terminated (billing ends at shutting-down or stopping), else to now while it runs. EC2 lists a terminated
instance for about an hour only: a round records each ended instance's usage in META the first time it sees
it (:class:`InstanceUsage`), so the total holds after EC2 forgets it. An instance whose end time EC2 does not
state ends when a round first saw it ended (an upper bound).

Prices are USD per instance-hour by pool: on-demand from the provider's table
(:mod:`airflow_ec2cluster.pricing.table`), spot from DescribeSpotPriceHistory (cached per instance type and
zone in META for :data:`SPOT_PRICE_MAX_AGE`). Per-second billing is assumed (Linux on EC2). Seconds of a pool
with no price are reported as such, never costed at 0: the estimate is then a lower bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

ON_DEMAND = "on-demand"
SPOT = "spot"
# A cached spot price is looked up again after this long (DescribeSpotPriceHistory, once per pool an hour).
SPOT_PRICE_MAX_AGE = 3600.0
# EC2 states in which the instance is no longer billed (its volumes are, and are not counted here).
UNBILLED_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
# States after which an instance never runs again: its usage is final and recorded.
FINAL_STATES = frozenset({"shutting-down", "terminated"})
# "User initiated (2026-12-03 17:45:43 GMT)": EC2's stamp of a stop or termination.
_TRANSITION_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")


@dataclass(frozen=True)
class InstanceUsage:
    """One instance's billed time: its pool, and from when to when (``end`` None: still billed)."""

    instance_id: str
    instance_type: str
    availability_zone: str
    market: str  # "on-demand" or "spot"
    start: float
    end: float | None = None

    @property
    def pool(self) -> str:
        return pool_key(self.instance_type, self.availability_zone, self.market)

    def seconds(self, now: float) -> float:
        end = now if self.end is None else self.end
        return max(0.0, end - self.start)

    def to_dict(self) -> dict[str, Any]:
        """As META keeps an ended instance's usage."""
        return {
            "instance_type": self.instance_type,
            "availability_zone": self.availability_zone,
            "market": self.market,
            "start": self.start,
            "end": self.end,
        }

    @classmethod
    def from_dict(cls, instance_id: str, data: Mapping[str, Any]) -> InstanceUsage:
        end = data.get("end")
        return cls(
            instance_id=instance_id,
            instance_type=str(data.get("instance_type") or ""),
            availability_zone=str(data.get("availability_zone") or ""),
            market=str(data.get("market") or ON_DEMAND),
            start=float(data.get("start") or 0.0),
            end=None if end is None else float(end),
        )


def pool_key(instance_type: str, availability_zone: str, market: str) -> str:
    return f"{instance_type}/{availability_zone}/{market}"


def spot_key(instance_type: str, availability_zone: str) -> str:
    return f"{instance_type}/{availability_zone}"


def transition_time(reason: str | None) -> float | None:
    """The time in EC2's ``StateTransitionReason`` ("User initiated (2026-12-03 17:45:43 GMT)"), or None."""
    match = _TRANSITION_TIME.search(reason or "")
    if not match:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def usage_of(instance: Mapping[str, Any], now: float) -> InstanceUsage:
    """An instance of a DescribeInstances answer as billed time (``now``: when it was described)."""
    state = instance["State"]["Name"]
    start = instance["LaunchTime"].timestamp()
    end = None
    if state in UNBILLED_STATES:
        stamped = transition_time(instance.get("StateTransitionReason"))
        end = max(start, stamped if stamped is not None else now)
    return InstanceUsage(
        instance_id=instance["InstanceId"],
        instance_type=str(instance.get("InstanceType") or ""),
        availability_zone=str((instance.get("Placement") or {}).get("AvailabilityZone") or ""),
        market=SPOT if instance.get("InstanceLifecycle") == SPOT else ON_DEMAND,
        start=start,
        end=end,
    )


def newly_ended(
    instances: Iterable[Mapping[str, Any]], recorded: Mapping[str, Any], now: float
) -> dict[str, InstanceUsage]:
    """Instances EC2 lists as ended whose usage META does not hold yet: to record (once each)."""
    return {
        i["InstanceId"]: usage_of(i, now)
        for i in instances
        if i["State"]["Name"] in FINAL_STATES and i["InstanceId"] not in recorded
    }


def cluster_usage(
    instances: Iterable[Mapping[str, Any]], recorded: Mapping[str, InstanceUsage], now: float
) -> list[InstanceUsage]:
    """Every instance's usage: what META recorded (final), and the rest as EC2 lists them now."""
    usage = dict(recorded)
    for instance in instances:
        if instance["InstanceId"] not in usage:
            usage[instance["InstanceId"]] = usage_of(instance, now)
    return sorted(usage.values(), key=lambda u: (u.start, u.instance_id))


def seconds_by_pool(usage: Iterable[InstanceUsage], now: float) -> dict[str, float]:
    totals: dict[str, float] = {}
    for item in usage:
        totals[item.pool] = totals.get(item.pool, 0.0) + item.seconds(now)
    return totals


def spot_pools(usage: Iterable[InstanceUsage]) -> set[str]:
    """The spot pools (instance type/zone) the usage needs a price for."""
    return {spot_key(u.instance_type, u.availability_zone) for u in usage if u.market == SPOT}


def stale_spot_pools(
    needed: Iterable[str],
    cached: Mapping[str, Mapping[str, Any]],
    now: float,
    max_age: float = SPOT_PRICE_MAX_AGE,
) -> list[str]:
    """The spot pools whose price is missing from the cache or older than ``max_age``: to look up."""
    return sorted(p for p in needed if now - float((cached.get(p) or {}).get("at") or 0.0) >= max_age)


@dataclass(frozen=True)
class PoolCost:
    instance_type: str
    availability_zone: str
    market: str
    instance_seconds: float
    usd_per_hour: float | None  # None: no price known for the pool

    @property
    def usd(self) -> float | None:
        return None if self.usd_per_hour is None else self.instance_seconds / 3600.0 * self.usd_per_hour

    def to_dict(self) -> dict[str, Any]:
        usd = self.usd
        return {
            "instance_type": self.instance_type,
            "availability_zone": self.availability_zone,
            "market": self.market,
            "instance_seconds": round(self.instance_seconds, 1),
            "usd_per_hour": self.usd_per_hour,
            "estimated_cost_usd": None if usd is None else round(usd, 4),
        }


@dataclass(frozen=True)
class CostEstimate:
    """The cluster's cost so far by pool; ``usd`` counts only the priced pools."""

    pools: tuple[PoolCost, ...] = field(default_factory=tuple)

    @property
    def instance_seconds(self) -> float:
        return sum(p.instance_seconds for p in self.pools)

    @property
    def usd(self) -> float:
        return sum(p.usd or 0.0 for p in self.pools)

    @property
    def unpriced(self) -> tuple[PoolCost, ...]:
        return tuple(p for p in self.pools if p.usd_per_hour is None)

    @property
    def unpriced_seconds(self) -> float:
        return sum(p.instance_seconds for p in self.unpriced)

    def text(self) -> str:
        """'$0.0123' (and the seconds no price covers, when any)."""
        text = usd_text(self.usd)
        if self.unpriced:
            types = ", ".join(sorted({p.instance_type or "?" for p in self.unpriced}))
            text += f" + unknown for {self.unpriced_seconds:.0f} instance-seconds ({types}: no price)"
        return text


def estimate_cost(
    seconds: Mapping[str, float],
    on_demand: Mapping[str, float],
    spot: Mapping[str, Mapping[str, Any]],
) -> CostEstimate:
    """Seconds by pool at ``on_demand`` (instance type -> USD/hour) or ``spot`` ("type/zone" ->
    {"price": USD/hour, ...}) prices."""
    pools = []
    for key, total in sorted(seconds.items()):
        instance_type, zone, market = key.split("/", 2)
        if market == SPOT:
            cached = spot.get(spot_key(instance_type, zone)) or {}
            price = None if cached.get("price") is None else float(cached["price"])
        else:
            price = on_demand.get(instance_type)
        pools.append(PoolCost(instance_type, zone, market, total, price))
    return CostEstimate(tuple(pools))


def usd_text(value: float) -> str:
    """'$0.0123', '$12.50'; a figure too small for 4 decimals keeps two digits ('$0.000069')."""
    if value == 0 or abs(value) >= 0.0001:
        return f"${value:.4f}" if abs(value) < 1 else f"${value:,.2f}"
    return f"${value:.{1 - math.floor(math.log10(abs(value)))}f}"


def cap_reached(estimate: CostEstimate | None, max_cost: float | None) -> bool:
    """Whether the estimate (its priced part) has reached ``max_cost`` USD (None: no cap)."""
    return max_cost is not None and estimate is not None and estimate.usd >= max_cost


def cost_summary(estimate: CostEstimate, max_cost: float | None, prices_as_of: str) -> dict[str, Any]:
    """The summary's cost fields (drain, status, XCom)."""
    return {
        "instance_seconds": round(estimate.instance_seconds, 1),
        "instance_seconds_by_pool": [p.to_dict() for p in estimate.pools],
        "estimated_cost_usd": round(estimate.usd, 4),
        # Seconds of pools no price covers: the estimate leaves them out (it is a lower bound then).
        "cost_unknown_instance_seconds": round(estimate.unpriced_seconds, 1),
        "cost_unknown_instance_types": sorted({p.instance_type for p in estimate.unpriced}),
        "max_cost": max_cost,
        "max_cost_reached": cap_reached(estimate, max_cost),
        "on_demand_prices_as_of": prices_as_of,
    }
