"""``ec2cluster logs CLUSTER_ID [--instance ID] [--task ID] [--follow]``: the workers' log lines.

Every worker ships its log lines (JSON) to the cluster's CloudWatch Logs group, ``/ec2cluster/<cluster>``, a
stream per instance; they outlive the cluster until the group's retention. This prints them in time order,
one stream name and line each, a failed task's traceback unfolded below its line: all of them, one
instance's (``--instance``), or one task's (``--task``: its runs, its error and traceback). ``--follow``
keeps reading new lines every ``--interval`` seconds until Ctrl-C. Read-only: FilterLogEvents alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from botocore.exceptions import ClientError

from airflow_ec2cluster.aws import error_code
from airflow_ec2cluster.aws.logs import LOOKBACK_MS, NOT_FOUND, event_text, task_pattern
from airflow_ec2cluster.cluster import log_group_name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "logs",
        help="print a cluster's worker logs from CloudWatch Logs (a failed task's traceback among them)",
        description="Print the log lines the cluster's workers shipped to CloudWatch Logs (group "
        "/ec2cluster/CLUSTER_ID, a stream per instance), in time order; a failed task's traceback follows "
        "its line. They stay after the teardown, until the group's retention. Read-only.",
    )
    parser.add_argument("cluster_id", metavar="CLUSTER_ID", help="the cluster id (see the drain task's log)")
    parser.add_argument("--instance", metavar="ID", help="one instance's lines only (its stream)")
    parser.add_argument("--task", metavar="ID", help="one task's lines only (its runs, errors, tracebacks)")
    parser.add_argument("--follow", action="store_true", help="keep printing new lines (until Ctrl-C)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reads with --follow")
    parser.add_argument(
        "--aws-conn-id",
        default=None,
        help="Airflow connection (default: none: boto3's credentials, region and AWS_ENDPOINT_URL)",
    )
    parser.add_argument("--region", default=None, help="AWS region (default: the connection's or boto3's)")
    parser.set_defaults(handler=run_logs)


def unseen(events: list[dict[str, Any]], seen: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The events not printed yet, and what to remember: the ids printed within a look-back of the newest
    (the next read starts that far back, for lines that reached CloudWatch late)."""
    new = [e for e in events if str(e.get("eventId")) not in seen]
    remembered = {**seen, **{str(e["eventId"]): int(e["timestamp"]) for e in new}}
    newest = max(remembered.values(), default=0)
    return new, {i: t for i, t in remembered.items() if t >= newest - LOOKBACK_MS}


def run_logs(args: argparse.Namespace) -> int:
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    hook = EC2ClusterHook(aws_conn_id=args.aws_conn_id, region_name=args.region)
    group = log_group_name(args.cluster_id)
    pattern = task_pattern(args.task) if args.task else None
    streams = [args.instance] if args.instance else None
    seen: dict[str, int] = {}
    start: int | None = None
    try:
        while True:
            try:
                events = list(hook.log_events(group, start_ms=start, pattern=pattern, streams=streams))
            except ClientError as error:
                if error_code(error) != NOT_FOUND:
                    raise
                print(
                    f"no CloudWatch Logs group {group} (or stream {args.instance}) in {hook.region}: the "
                    "cluster was launched with log_retention_days=None or before its workers shipped logs, "
                    "its retention has passed, or the id is not a cluster's",
                    file=sys.stderr,
                )
                return 1
            new, seen = unseen(events, seen)
            for event in new:
                print(event_text(event), flush=True)
            if not args.follow:
                return 0
            if seen:
                start = max(seen.values()) - LOOKBACK_MS
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
