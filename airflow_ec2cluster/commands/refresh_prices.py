"""``ec2cluster refresh-prices``: rewrite the on-demand price table from the AWS Price List API.

A maintainer's command, not part of a run: it needs ``pricing:GetProducts`` (``ec2cluster iam-policy --side
prices``), which the controller's policy does not grant. One paginated GetProducts query per region, at the
Price List API's endpoint (us-east-1) whatever the region priced; the table (:mod:`airflow_ec2cluster.pricing
.table`) is written atomically with today's date, only once every region answered.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from airflow_ec2cluster.pricing.price_list import (
    PRICING_ENDPOINT_REGION,
    get_products_params,
    on_demand_prices,
)
from airflow_ec2cluster.pricing.table import TABLE_PATH, PriceTable, read_table, write_table

SOURCE = (
    "AWS Price List API (pricing:GetProducts, AmazonEC2): Linux, shared tenancy, no pre-installed software, "
    "capacity status Used, on-demand, USD per instance-hour"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "refresh-prices",
        help="rewrite the on-demand price table the cost estimate uses, from the AWS Price List API",
        description="Query the AWS Price List API (pricing:GetProducts) for EC2's Linux on-demand prices in "
        "each region and rewrite the provider's price table with today's date. Regions not named are kept.",
    )
    parser.add_argument(
        "--regions", nargs="*", default=None, help="regions to price (default: those the table holds)"
    )
    parser.add_argument("--table", type=Path, default=TABLE_PATH, help=f"the table (default {TABLE_PATH})")
    parser.add_argument(
        "--aws-conn-id",
        default=None,
        help="Airflow connection (default: none: boto3's credentials and AWS_ENDPOINT_URL)",
    )
    parser.set_defaults(handler=run)


def pricing_client(aws_conn_id: str | None):
    """A Price List API client at its endpoint region, from the connection (or boto3's defaults)."""
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    hook = EC2ClusterHook(aws_conn_id=aws_conn_id, region_name=PRICING_ENDPOINT_REGION)
    return hook.get_session(region_name=PRICING_ENDPOINT_REGION).client(
        "pricing",
        region_name=PRICING_ENDPOINT_REGION,
        endpoint_url=hook.conn_config.get_service_endpoint_url(service_name="pricing"),
        config=hook.client_config(),
        verify=hook.verify,
    )


def fetch_region(client, region: str) -> dict[str, float]:
    """Instance type -> USD per hour on-demand in ``region``: GetProducts, paginated."""
    pages = client.get_paginator("get_products").paginate(**get_products_params(region))
    return on_demand_prices((entry for page in pages for entry in page.get("PriceList", [])), region)


def refresh(client, table_path: Path, regions: list[str] | None, today: str) -> PriceTable:
    """Price ``regions`` (default: the table's) and write the table; a region with no price is an error
    (a misspelt region), and nothing is written then."""
    old = read_table(table_path)
    wanted = list(regions or old.regions)
    found = {region: fetch_region(client, region) for region in wanted}
    empty = [region for region, prices in found.items() if not prices]
    if empty:
        raise ValueError(
            f"--regions: the Price List API has no EC2 on-demand price for {', '.join(empty)}; check the "
            "region names (e.g. eu-west-1); the table is unchanged"
        )
    table = PriceTable(as_of=today, source=SOURCE, regions={**old.regions, **found})
    write_table(table, table_path)
    return table


def run(args: argparse.Namespace) -> int:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    table = refresh(pricing_client(args.aws_conn_id), args.table, args.regions, today)
    for region, prices in sorted(table.regions.items()):
        print(f"{region}: {len(prices)} instance types")
    print(f"Wrote {args.table} (as of {table.as_of})")
    return 0
