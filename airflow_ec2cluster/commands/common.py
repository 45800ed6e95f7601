"""What the subcommands share: connection arguments and the hook made from them."""

from __future__ import annotations

import argparse
import logging

from airflow_ec2cluster.defaults import DEFAULT_STATE_TABLE


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster_id", metavar="CLUSTER_ID", help="the cluster id (see the drain task's log)")
    parser.add_argument(
        "--state-table", default=DEFAULT_STATE_TABLE, help=f"state table (default {DEFAULT_STATE_TABLE})"
    )
    parser.add_argument(
        "--aws-conn-id",
        default=None,
        help="Airflow connection (default: none: boto3's credentials, region and AWS_ENDPOINT_URL)",
    )
    parser.add_argument("--region", default=None, help="AWS region (default: the connection's or boto3's)")


def hook_from(args: argparse.Namespace):
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    # The provider logs its credential choice at INFO on stdout: noise in a command's output.
    logging.getLogger("airflow.providers.amazon").setLevel(logging.WARNING)
    return EC2ClusterHook(aws_conn_id=args.aws_conn_id, region_name=args.region)
