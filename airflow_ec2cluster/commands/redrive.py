"""``ec2cluster redrive CLUSTER_ID``: move dead-lettered tasks back to the cluster's task queue."""

from __future__ import annotations

import argparse
import sys

from airflow_ec2cluster.cluster import dead_letter_queue_name, task_queue_name
from airflow_ec2cluster.commands.common import add_connection_arguments, hook_from
from airflow_ec2cluster.defaults import DEFAULT_LOG_SHARDS
from airflow_ec2cluster.operators.redrive import shown_ids


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "redrive",
        help="move a cluster's dead-lettered tasks back to its task queue",
        description="Move the messages of the cluster's dead-letter queue back to its task queue, so the "
        "next workers (re-run launch and drain) run the tasks in them that had not finished, and only those. "
        "Client-side by default (receive, read their task-log items, send, delete in batches of 10); "
        "--server-side uses SQS StartMessageMoveTask (AWS only), which cannot mark the messages: the workers "
        "then run every task of a moved group again, those already done included.",
    )
    add_connection_arguments(parser)
    parser.add_argument("--max", type=int, default=None, help="move at most this many messages")
    parser.add_argument(
        "--server-side",
        action="store_true",
        help="start an SQS message move task instead (not on moto; re-runs a group's tasks already done)",
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
    meta = hook.get_meta(args.state_table, args.cluster_id)
    outcome = hook.redrive_dead_letters(
        dlq_url,
        queue_url,
        limit=args.max,
        table=args.state_table,
        cluster_id=args.cluster_id,
        shards=meta.log_shards if meta else DEFAULT_LOG_SHARDS,
    )
    # A message is a task or a group of tasks: the ids are those of its tasks that had not finished.
    print(
        f"moved {outcome.messages} message(s) back to {queue_url}; "
        f"{len(outcome.task_ids)} task(s) to run again: {shown_ids(outcome.task_ids)}"
    )
    if outcome.marked:
        print(f"{outcome.marked} of those message(s) also hold tasks already done: the workers skip them")
    return 0
