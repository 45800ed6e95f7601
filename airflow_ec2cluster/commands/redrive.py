"""``ec2cluster redrive CLUSTER_ID``: move dead-lettered tasks back to the cluster's task queue."""

from __future__ import annotations

import argparse
import sys

from airflow_ec2cluster.cluster import dead_letter_queue_name, task_queue_name
from airflow_ec2cluster.commands.common import add_connection_arguments, hook_from

SHOWN_IDS = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "redrive",
        help="move a cluster's dead-lettered tasks back to its task queue",
        description="Move the messages of the cluster's dead-letter queue back to its task queue, so the "
        "next workers (re-run launch and drain) run those tasks again. Client-side by default (receive, "
        "send, delete in batches of 10); --server-side uses SQS StartMessageMoveTask (AWS only).",
    )
    add_connection_arguments(parser)
    parser.add_argument("--max", type=int, default=None, help="move at most this many messages")
    parser.add_argument(
        "--server-side", action="store_true", help="start an SQS message move task instead (not on moto)"
    )
    parser.set_defaults(handler=run_redrive)


def run_redrive(args: argparse.Namespace) -> int:
    hook = hook_from(args)
    queue_url = hook.get_queue_url(task_queue_name(args.cluster_id))
    dlq_url = hook.get_queue_url(dead_letter_queue_name(args.cluster_id))
    if not queue_url or not dlq_url:
        print(f"cluster {args.cluster_id} has no task queue or dead-letter queue", file=sys.stderr)
        return 1
    if args.server_side:
        handle = hook.start_dead_letter_move(dlq_url, queue_url)
        print(f"started SQS message move task {handle}")
        return 0
    moved = hook.redrive_dead_letters(dlq_url, queue_url, limit=args.max)
    shown = ", ".join(moved[:SHOWN_IDS]) + (
        f" and {len(moved) - SHOWN_IDS} more" if len(moved) > SHOWN_IDS else ""
    )
    # A message is a task or a group of tasks; each is named by its (first) task id.
    print(f"moved {len(moved)} message(s) back to {queue_url}" + (f": {shown}" if moved else ""))
    return 0
