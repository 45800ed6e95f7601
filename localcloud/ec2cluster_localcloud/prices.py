"""A small price table for the instance types the local cloud's tests and demo use: what CreateFleet's
lowest-price and price-capacity-optimized allocation strategies rank pools by.

On-demand: AWS's published Linux on-demand prices in us-east-1 (USD per instance-hour), as listed on
https://aws.amazon.com/ec2/pricing/on-demand/ (read 2025; the local cloud uses them for every region).
Spot: a fixed fraction of the on-demand price per type (``SPOT_FRACTION``), illustrative only: real spot
prices move with supply and demand, per zone. The fractions differ per type so that the cheapest spot pool
is not always the cheapest on-demand one, as on AWS. A type missing here has no price: it ranks after every
priced type (and MaxPrice never excludes it).
"""

from __future__ import annotations

SOURCE = "AWS EC2 on-demand pricing, Linux, us-east-1 (read 2025); spot = SPOT_FRACTION x on-demand"

ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "t3.micro": 0.0104,
    "t3.small": 0.0208,
    "t3.medium": 0.0416,
    "t3.large": 0.0832,
    "t3a.medium": 0.0376,
    "t4g.micro": 0.0084,
    "t4g.medium": 0.0336,
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m6i.large": 0.096,
    "m6i.xlarge": 0.192,
    "m7i.large": 0.1008,
    "m7g.large": 0.0816,
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "c6i.large": 0.085,
    "c6i.xlarge": 0.17,
    "c7i.large": 0.08925,
    "c7g.large": 0.0725,
    "r5.large": 0.126,
    "r6i.large": 0.126,
    "r7i.large": 0.1323,
}

SPOT_FRACTION: dict[str, float] = {
    "t3.micro": 0.31,
    "t3.small": 0.31,
    "t3.medium": 0.30,
    "t3.large": 0.30,
    "t3a.medium": 0.33,
    "t4g.micro": 0.32,
    "t4g.medium": 0.32,
    "m5.large": 0.40,
    "m5.xlarge": 0.40,
    "m6i.large": 0.38,
    "m6i.xlarge": 0.38,
    "m7i.large": 0.42,
    "m7g.large": 0.35,
    "c5.large": 0.36,
    "c5.xlarge": 0.36,
    "c6i.large": 0.34,
    "c6i.xlarge": 0.34,
    "c7i.large": 0.41,
    "c7g.large": 0.37,
    "r5.large": 0.28,
    "r6i.large": 0.30,
    "r7i.large": 0.33,
}


def on_demand_price(instance_type: str) -> float | None:
    """USD per hour on-demand, None when the table lacks the type."""
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


def spot_price(instance_type: str) -> float | None:
    """USD per hour on the spot market (illustrative), None when the table lacks the type."""
    price = on_demand_price(instance_type)
    if price is None:
        return None
    return round(price * SPOT_FRACTION.get(instance_type, 0.35), 6)


def price(instance_type: str, market: str) -> float | None:
    """The hourly price of ``instance_type`` on ``market`` ("on-demand" or "spot")."""
    return spot_price(instance_type) if market == "spot" else on_demand_price(instance_type)
