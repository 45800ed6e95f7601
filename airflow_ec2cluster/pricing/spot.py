"""DescribeSpotPriceHistory: the current spot price of some instance types in every zone of the region.

With ``StartTime`` = ``EndTime`` = now, EC2 answers the price in effect at that time per instance type, zone
and product: one paginated call for all the pools a round needs, whatever their number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from airflow_ec2cluster.cost import spot_key

log = logging.getLogger(__name__)

# A controller whose policy predates the cost estimate may not read spot prices: the estimate then says
# those pools' cost is unknown (they are recorded priceless, asked again in an hour); the drain goes on.
REFUSED_CODES = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")

# The product of the cluster's instances: Linux in a VPC (AWS also lists "Linux/UNIX (Amazon VPC)").
SPOT_PRODUCTS = ("Linux/UNIX", "Linux/UNIX (Amazon VPC)")


def spot_price_params(instance_types: Iterable[str], now: float) -> dict[str, Any]:
    at = datetime.fromtimestamp(now, tz=timezone.utc)
    return {
        "InstanceTypes": sorted(set(instance_types)),
        "ProductDescriptions": list(SPOT_PRODUCTS),
        "StartTime": at,
        "EndTime": at,
    }


def spot_prices_of(entries: Iterable[Mapping[str, Any]], now: float) -> dict[str, dict[str, float]]:
    """ "type/zone" -> {"price": USD per hour, "at": when looked up}; the newest entry of each pool wins."""
    newest: dict[str, tuple[float, float]] = {}
    for entry in entries:
        key = spot_key(entry["InstanceType"], entry["AvailabilityZone"])
        stamp = entry.get("Timestamp")
        when = stamp.timestamp() if isinstance(stamp, datetime) else 0.0
        if key not in newest or when >= newest[key][0]:
            newest[key] = (when, float(entry["SpotPrice"]))
    return {key: {"price": price, "at": now} for key, (_, price) in newest.items()}


def spot_prices_refused(code: str, message: str) -> dict[str, dict[str, float]]:
    """No prices (their pools' cost is unknown), said once per lookup: an hour per pool."""
    log.warning(
        "Cannot read spot prices (%s: %s): the spot instances' cost is unknown. Fix: give the controller "
        "ec2:DescribeSpotPriceHistory (`ec2cluster iam-policy --side controller` has it)",
        code,
        message,
    )
    return {}
