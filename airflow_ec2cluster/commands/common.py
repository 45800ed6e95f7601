"""What the subcommands share: connection arguments, the hook made from them, and where logs go."""

from __future__ import annotations

import argparse
import logging
import sys

from airflow_ec2cluster.defaults import DEFAULT_STATE_TABLE

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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

    return EC2ClusterHook(aws_conn_id=args.aws_conn_id, region_name=args.region)


def configure_logging(verbose: bool) -> None:
    """Stdout carries the command's own output only: library logs go to stderr, INFO only when verbose.

    Importing the provider imports Airflow, which sends its own and botocore's INFO lines to stdout (stdlib
    logging and structlog alike): in this process, the command's, both are pointed at stderr instead, at
    WARNING (or INFO with ``--verbose``).
    """
    level = logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    try:
        import structlog
    except ImportError:  # Airflow brings it; without it there is nothing more to quiet
        return
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
