"""The on-demand table from the AWS Price List API (``pricing`` GetProducts): requests and answer parsing.

The Price List API answers at a few endpoints only (us-east-1 among them) whatever region it prices. One
GetProducts query per region, paginated: service AmazonEC2, the region's ``regionCode``, Linux, shared
tenancy, no pre-installed software, capacity status Used (not a reservation's unused capacity), no license.
Each ``PriceList`` entry is a JSON document (a string): the product's attributes and its terms; the
on-demand hourly price is the ``Hrs`` price dimension of its ``OnDemand`` term, in USD.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# The endpoint region of the Price List API (it also answers in eu-central-1 and ap-south-1).
PRICING_ENDPOINT_REGION = "us-east-1"

ON_DEMAND_ATTRIBUTES = {
    "operatingSystem": "Linux",
    "tenancy": "Shared",
    "preInstalledSw": "NA",
    "capacitystatus": "Used",
    "licenseModel": "No License required",
}


def get_products_params(region: str) -> dict[str, Any]:
    """GetProducts arguments (for its paginator): EC2's Linux on-demand instances in ``region``."""
    wanted = {"regionCode": region, **ON_DEMAND_ATTRIBUTES}
    return {
        "ServiceCode": "AmazonEC2",
        "FormatVersion": "aws_v1",
        "Filters": [{"Type": "TERM_MATCH", "Field": name, "Value": value} for name, value in wanted.items()],
    }


def hourly_price(product: Mapping[str, Any]) -> float | None:
    """The USD hourly on-demand price of one Price List product, or None (no such term, or zero)."""
    for term in (product.get("terms") or {}).get("OnDemand", {}).values():
        for dimension in (term.get("priceDimensions") or {}).values():
            if dimension.get("unit") != "Hrs":
                continue
            usd = (dimension.get("pricePerUnit") or {}).get("USD")
            if usd is not None and float(usd) > 0:
                return float(usd)
    return None


def on_demand_prices(price_list: Iterable[str | Mapping[str, Any]], region: str) -> dict[str, float]:
    """Instance type -> USD per hour from GetProducts' ``PriceList`` entries (JSON text or parsed), keeping
    only products of ``region`` with the table's attributes (a filter the query applies already)."""
    prices: dict[str, float] = {}
    for entry in price_list:
        product = json.loads(entry) if isinstance(entry, str) else entry
        attributes = (product.get("product") or {}).get("attributes") or {}
        if attributes.get("regionCode") != region or any(
            attributes.get(name) != value for name, value in ON_DEMAND_ATTRIBUTES.items()
        ):
            continue
        instance_type = attributes.get("instanceType")
        price = hourly_price(product)
        if instance_type and price is not None:
            prices[instance_type] = price
    return dict(sorted(prices.items()))
