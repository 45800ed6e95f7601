"""``ec2cluster iam-policy``: print the least-privilege IAM policies for the controller and the workers."""

from __future__ import annotations

import argparse
import json

from airflow_ec2cluster.cluster import cluster_prefix_for
from airflow_ec2cluster.defaults import DEFAULT_BUNDLE_PREFIX, DEFAULT_INSTANCE_PROFILE, DEFAULT_STATE_TABLE
from airflow_ec2cluster.iam import PolicyScope, controller_policy, price_refresh_policy, worker_policy

# "prices": only for `ec2cluster refresh-prices` (the Price List API), which no run makes; not in "both".
SIDES = ("controller", "worker", "both", "prices")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "iam-policy",
        help="print the least-privilege IAM policies (Airflow side and worker instance profile)",
        description="Print IAM policy documents scoped to the clusters' queues, state table and tag: one for "
        "the Airflow connection (controller), one for the worker instance profile's role.",
    )
    parser.add_argument("--side", choices=SIDES, default="both", help="which policy to print (default both)")
    parser.add_argument(
        "--region",
        default="*",
        help="AWS region of the clusters (default any, in the aws partition: give it for aws-cn, aws-us-gov)",
    )
    parser.add_argument("--account-id", default="*", help="AWS account id (default any)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--cluster-prefix",
        default="",
        help="cluster ids start with this; default: any cluster of this project (its queues are named "
        "ec2cluster-<cluster id>-tasks/-dlq, its instances tagged ec2cluster:cluster-id)",
    )
    scope.add_argument(
        "--dag-id",
        default=None,
        help="scope to the clusters of one DAG (the prefix cluster_id_for gives its runs): with a worker "
        "role and instance profile of its own, that DAG's workers can touch no other DAG's clusters",
    )
    parser.add_argument("--state-table", default=DEFAULT_STATE_TABLE, help="the state table's name")
    parser.add_argument("--worker-role", default=DEFAULT_INSTANCE_PROFILE, help="the worker profile's role")
    parser.add_argument("--instance-profile", default=DEFAULT_INSTANCE_PROFILE, help="the worker profile")
    parser.add_argument("--manifest-bucket", default="*", help="bucket of S3 task manifests (default any)")
    parser.add_argument("--output-bucket", default="*", help="bucket of the workers' S3 output (default any)")
    parser.add_argument(
        "--bundle-bucket",
        default="ec2cluster-*",
        help="the launches' bundle_bucket (default ec2cluster-*: the default ec2cluster-<account>-<region>)",
    )
    parser.add_argument("--bundle-prefix", default=DEFAULT_BUNDLE_PREFIX, help="the launches' bundle_prefix")
    parser.add_argument(
        "--output-table",
        default=None,
        help="the workers' DynamoDB output table (worker_options.output.table), if they use one",
    )
    parser.set_defaults(handler=run)


def scope_from(args: argparse.Namespace) -> PolicyScope:
    return PolicyScope(
        region=args.region,
        account_id=args.account_id,
        cluster_prefix=cluster_prefix_for(args.dag_id) if args.dag_id else args.cluster_prefix,
        state_table=args.state_table,
        worker_role=args.worker_role,
        instance_profile=args.instance_profile,
        manifest_bucket=args.manifest_bucket,
        output_bucket=args.output_bucket,
        output_table=args.output_table,
        bundle_bucket=args.bundle_bucket,
        bundle_prefix=args.bundle_prefix,
    )


def run(args: argparse.Namespace) -> int:
    scope = scope_from(args)
    documents = {"controller": controller_policy(scope), "worker": worker_policy(scope)}
    if args.side == "prices":
        documents = {"prices": price_refresh_policy()}
    elif args.side != "both":
        documents = {args.side: documents[args.side]}
    print(json.dumps(documents if len(documents) > 1 else next(iter(documents.values())), indent=2))
    return 0
