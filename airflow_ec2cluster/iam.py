"""Least-privilege IAM policies: the Airflow side (controller) and the worker instance profile.

The action lists are exactly the AWS calls each side's code makes (``tests/reliability/test_iam_policy.py``
checks them against the code), and every statement that can be scoped is: queues by the project's name
prefix and the clusters' prefix, the state table by name, instances by the ``ec2cluster:cluster-id`` tag,
PassRole to EC2 only and only for the worker role. Describe* calls of EC2 cannot be scoped to resources
(AWS does not support it), so they use ``*``. ARNs are in the region's partition (aws, aws-cn, aws-us-gov).

The worker may write only its cluster's status and task-log items (``dynamodb:LeadingKeys``), never
the META item or the cluster's bundle in S3, which hold what the controller launches from (AMI, instance
type, user data, cluster size, the code instances run): a task's code runs with the worker's credentials,
and must not be able to choose what the controller launches. Clusters that share one worker role can
write each other's status and task log: they are one trust domain; a role per DAG (``--dag-id``)
separates them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import boto3
from ec2cluster_worker import records

from airflow_ec2cluster.cluster import (
    DEAD_LETTER_QUEUE_SUFFIX,
    LOG_GROUP_PREFIX,
    QUEUE_NAME_PREFIX,
    TAG_CLUSTER_ID,
    TASK_QUEUE_SUFFIX,
)
from airflow_ec2cluster.defaults import DEFAULT_BUNDLE_PREFIX, DEFAULT_INSTANCE_PROFILE, DEFAULT_STATE_TABLE

POLICY_VERSION = "2012-10-17"

# The controller's calls: hook, operators, sensor, trigger, CLI commands (IAM action names).
CONTROLLER_QUEUE_ACTIONS = (
    "sqs:CreateQueue",
    "sqs:TagQueue",  # CreateQueue with tags
    "sqs:GetQueueUrl",
    "sqs:GetQueueAttributes",
    "sqs:SendMessage",  # SendMessageBatch
    "sqs:ReceiveMessage",  # peeking at dead-lettered task ids; message move tasks
    "sqs:DeleteMessage",  # DeleteMessageBatch; message move tasks
    "sqs:ChangeMessageVisibility",  # ChangeMessageVisibilityBatch: peeked dead letters made visible again
    "sqs:DeleteQueue",
    "sqs:StartMessageMoveTask",  # re-drive from the dead-letter queue
)
CONTROLLER_TABLE_ACTIONS = (
    "dynamodb:CreateTable",
    "dynamodb:DescribeTable",
    "dynamodb:DescribeTimeToLive",
    "dynamodb:UpdateTimeToLive",
    "dynamodb:GetItem",
    "dynamodb:BatchGetItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",  # a failed enqueue's META item
    "dynamodb:Query",
)
CONTROLLER_DESCRIBE_ACTIONS = (
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeInstances",
    "ec2:DescribeLaunchTemplates",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSpotPriceHistory",
    "ec2:DescribeSubnets",
    # The launch preflight: where each subnet's traffic goes (airflow_ec2cluster.preflight).
    "ec2:DescribeVpcs",
    "ec2:DescribeRouteTables",
    "ec2:DescribeInternetGateways",
    "ec2:DescribeNatGateways",
    "ec2:DescribeVpcEndpoints",
)
# The cluster's CloudWatch Logs group: made (tagged: TagResource) with a retention by the launch, its
# failed tasks' events read by the drain and every event by ``ec2cluster logs``.
CONTROLLER_LOG_ACTIONS = (
    "logs:CreateLogGroup",
    "logs:TagResource",
    "logs:PutRetentionPolicy",
    "logs:FilterLogEvents",
)
# Each worker's stream in it, and its lines.
WORKER_LOG_ACTIONS = ("logs:CreateLogStream", "logs:PutLogEvents")
WORKER_QUEUE_ACTIONS = (
    "sqs:GetQueueAttributes",  # an idle worker's one look before it stops (stop_when_queue_empty)
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",  # DeleteMessageBatch
    "sqs:ChangeMessageVisibility",  # ChangeMessageVisibilityBatch
)
# BatchGetItem: a redelivered message's task-log item, so tasks already done are not run again.
WORKER_TABLE_READ_ACTIONS = ("dynamodb:BatchGetItem",)
# PutItem: the worker's status item; BatchWriteItem: task-log items (and results, with an output table).
WORKER_TABLE_WRITE_ACTIONS = ("dynamodb:PutItem", "dynamodb:BatchWriteItem")
WORKER_TABLE_ACTIONS = WORKER_TABLE_READ_ACTIONS + WORKER_TABLE_WRITE_ACTIONS
SPOT_SERVICE_ROLE = "aws-service-role/spot.amazonaws.com/AWSServiceRoleForEC2Spot"


@functools.cache
def partition_for(region: str) -> str:
    """The ARN partition of a region, from botocore's endpoint data ("aws" when the region is any)."""
    if region == "*":
        return "aws"
    return boto3.session.Session().get_partition_for_region(region)


@dataclass(frozen=True)
class PolicyScope:
    """What the policies are scoped to; ``*`` parts widen them (e.g. any account)."""

    region: str = "*"
    account_id: str = "*"
    cluster_prefix: str = ""  # cluster ids start with this (cluster_id_for uses the DAG id's slug)
    state_table: str = DEFAULT_STATE_TABLE
    worker_role: str = DEFAULT_INSTANCE_PROFILE
    instance_profile: str = DEFAULT_INSTANCE_PROFILE
    manifest_bucket: str = "*"  # S3 manifests the enqueue operator reads
    output_bucket: str = "*"  # the workers' s3 output, when used
    output_table: str | None = None  # the workers' DynamoDB output table (worker_options.output.table)
    bundle_bucket: str = "ec2cluster-*"  # where launches store clusters' bundles (the default's pattern)
    bundle_prefix: str = DEFAULT_BUNDLE_PREFIX

    def bundle_arn(self) -> str:
        """The clusters' bundles: ``<prefix><cluster id>/<sha256>.zip`` (aws.s3.bundle_object_key)."""
        prefix = f"{self.bundle_prefix.rstrip('/')}/" if self.bundle_prefix.strip("/") else ""
        return self.s3_arn(self.bundle_bucket, f"{prefix}{self.cluster_prefix}*")

    @property
    def partition(self) -> str:
        return partition_for(self.region)

    def arn(self, service: str, resource: str, *, regional: bool = True, account: bool = True) -> str:
        region = self.region if regional else ""
        account_id = self.account_id if account else ""
        return f"arn:{self.partition}:{service}:{region}:{account_id}:{resource}"

    def queue_arns(self) -> list[str]:
        return [
            self.arn("sqs", f"{QUEUE_NAME_PREFIX}{self.cluster_prefix}*{suffix}")
            for suffix in (TASK_QUEUE_SUFFIX, DEAD_LETTER_QUEUE_SUFFIX)
        ]

    def log_group_arn(self) -> str:
        """The clusters' log groups and, the ``*`` covering ``:log-stream:<name>``, their streams."""
        return self.arn("logs", f"log-group:{LOG_GROUP_PREFIX}{self.cluster_prefix}*")

    def table_arn(self, table: str | None = None) -> str:
        return self.arn("dynamodb", f"table/{table or self.state_table}")

    def s3_arn(self, bucket: str, key: str) -> str:
        return f"arn:{self.partition}:s3:::{bucket}/{key}"

    def cluster_tag_value(self) -> str:
        return f"{self.cluster_prefix}*"


def statement(sid: str, actions: tuple[str, ...] | list[str], resources: Any, **extra: Any) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resources, **extra}


def controller_policy(scope: PolicyScope) -> dict[str, Any]:
    """The Airflow connection's policy."""
    tag_condition = {"StringLike": {f"aws:ResourceTag/{TAG_CLUSTER_ID}": scope.cluster_tag_value()}}
    request_tag = {"StringLike": {f"aws:RequestTag/{TAG_CLUSTER_ID}": scope.cluster_tag_value()}}
    ec2 = lambda resource: scope.arn("ec2", resource)  # noqa: E731
    output_table = (
        [statement("CheckOutputTable", ["dynamodb:DescribeTable"], scope.table_arn(scope.output_table))]
        if scope.output_table
        else []
    )
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            statement("ClusterQueues", CONTROLLER_QUEUE_ACTIONS, scope.queue_arns()),
            statement("StateTable", CONTROLLER_TABLE_ACTIONS, scope.table_arn()),
            statement("ClusterLogGroups", CONTROLLER_LOG_ACTIONS, scope.log_group_arn()),
            *output_table,
            statement("DescribeEC2", CONTROLLER_DESCRIBE_ACTIONS, "*"),
            # Workers are launched by EC2 Fleet (CreateFleet, instant), which authorises RunInstances too.
            statement("LaunchFleet", ["ec2:CreateFleet"], ec2("fleet/*")),
            # New instances and volumes must carry the cluster tag; what they are made from is not tagged.
            statement(
                "LaunchTaggedWorkers",
                ["ec2:CreateFleet", "ec2:RunInstances"],
                [ec2("instance/*"), ec2("volume/*")],
                Condition=request_tag,
            ),
            # The cluster's launch templates: created tagged, used by its fleets, deleted by tag.
            statement(
                "CreateClusterLaunchTemplate",
                ["ec2:CreateLaunchTemplate"],
                ec2("launch-template/*"),
                Condition=request_tag,
            ),
            statement(
                "LaunchFromClusterTemplate",
                ["ec2:CreateFleet", "ec2:RunInstances", "ec2:DeleteLaunchTemplate"],
                ec2("launch-template/*"),
                Condition=tag_condition,
            ),
            # A spot launch also creates a spot request (launch_spec market="spot").
            statement("LaunchSpot", ["ec2:RunInstances"], ec2("spot-instances-request/*")),
            statement(
                "LaunchFrom",
                ["ec2:CreateFleet", "ec2:RunInstances"],
                [
                    scope.arn(
                        "ec2", "image/*", account=False
                    ),  # AMIs belong to their owner, not this account
                    ec2("subnet/*"),
                    ec2("network-interface/*"),
                    ec2("security-group/*"),
                    ec2("key-pair/*"),
                ],
            ),
            statement(
                "TagAtLaunchOnly",
                ["ec2:CreateTags"],
                [ec2("instance/*"), ec2("volume/*")],
                Condition={"StringEquals": {"ec2:CreateAction": ["RunInstances", "CreateFleet"]}},
            ),
            statement(
                "TagLaunchTemplateAtCreation",
                ["ec2:CreateTags"],
                ec2("launch-template/*"),
                Condition={"StringEquals": {"ec2:CreateAction": "CreateLaunchTemplate"}},
            ),
            statement(
                "TerminateClusterInstances",
                ["ec2:TerminateInstances"],
                ec2("instance/*"),
                Condition=tag_condition,
            ),
            # Why an instance that never wrote a status item stopped: its console says.
            statement(
                "ReadClusterConsoles", ["ec2:GetConsoleOutput"], ec2("instance/*"), Condition=tag_condition
            ),
            # The cluster's own security group (when given none): created tagged, in any VPC, deleted by tag.
            statement(
                "CreateClusterSecurityGroup",
                ["ec2:CreateSecurityGroup"],
                ec2("security-group/*"),
                Condition=request_tag,
            ),
            statement("CreateSecurityGroupInVpc", ["ec2:CreateSecurityGroup"], ec2("vpc/*")),
            statement(
                "TagSecurityGroupAtCreation",
                ["ec2:CreateTags"],
                ec2("security-group/*"),
                Condition={"StringEquals": {"ec2:CreateAction": "CreateSecurityGroup"}},
            ),
            statement(
                "DeleteClusterSecurityGroup",
                ["ec2:DeleteSecurityGroup"],
                ec2("security-group/*"),
                Condition=tag_condition,
            ),
            statement(
                "PassWorkerRole",
                ["iam:PassRole"],
                scope.arn("iam", f"role/{scope.worker_role}", regional=False),
                Condition={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            ),
            statement(
                "CheckInstanceProfile",
                ["iam:GetInstanceProfile"],
                scope.arn("iam", f"instance-profile/{scope.instance_profile}", regional=False),
            ),
            # The first spot launch in an account creates EC2's spot service-linked role.
            statement(
                "SpotServiceLinkedRole",
                ["iam:CreateServiceLinkedRole"],
                scope.arn("iam", f"role/{SPOT_SERVICE_ROLE}", regional=False),
                Condition={"StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}},
            ),
            statement("ReadManifests", ["s3:GetObject"], scope.s3_arn(scope.manifest_bucket, "*")),
            # The clusters' bundles: the bucket checked (HeadBucket), created private when absent, listed
            # at teardown; each cluster's bundle uploaded (multipart when large) and deleted at teardown.
            statement(
                "BundleBucket",
                ["s3:CreateBucket", "s3:ListBucket", "s3:PutBucketPublicAccessBlock"],
                f"arn:{scope.partition}:s3:::{scope.bundle_bucket}",
            ),
            statement(
                "ClusterBundles",
                ["s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"],
                scope.bundle_arn(),
            ),
        ],
    }


def worker_policy(scope: PolicyScope) -> dict[str, Any]:
    """The worker instance profile's role policy."""
    prefix = scope.cluster_prefix
    # Partition keys (records.py): C#<cluster> holds META and the bundle (read), C#<cluster>#W the status
    # items and C#<cluster>#T#<shard> the task log (written). Null: the key must be in the request.
    reads = [records.cluster_pk(f"{prefix}*")]
    writes = [records.workers_pk(f"{prefix}*"), records.log_pk(f"{prefix}*", 0)[:-3] + "*"]
    output_table = (
        [statement("OutputTable", WORKER_TABLE_WRITE_ACTIONS, scope.table_arn(scope.output_table))]
        if scope.output_table
        else []
    )
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            statement("TaskQueue", WORKER_QUEUE_ACTIONS, scope.queue_arns()[0]),
            statement(
                "ReadClusterRecords",
                WORKER_TABLE_READ_ACTIONS,
                scope.table_arn(),
                Condition=leading_keys(reads),
            ),
            statement(
                "WriteStatusAndTaskLog",
                WORKER_TABLE_WRITE_ACTIONS,
                scope.table_arn(),
                Condition=leading_keys(writes),
            ),
            *output_table,
            statement("ShipLogs", WORKER_LOG_ACTIONS, scope.log_group_arn()),
            statement("S3Output", ["s3:PutObject"], scope.s3_arn(scope.output_bucket, "*")),
            # The boot loader fetches the cluster's bundle (airflow_ec2cluster.bundle) before the worker runs.
            statement("ReadClusterBundle", ["s3:GetObject"], scope.bundle_arn()),
            # ... and no task may rewrite what replacements boot, whatever S3Output allows (its default
            # bucket is any): an explicit Deny wins. (The boot loader's SHA-256 check would refuse a
            # rewritten bundle; this keeps replacements from being stopped that way too.)
            {
                "Sid": "ProtectClusterBundles",
                "Effect": "Deny",
                "Action": ["s3:DeleteObject", "s3:PutObject"],
                "Resource": scope.bundle_arn(),
            },
        ],
    }


# The maintainer's `ec2cluster refresh-prices` (not part of a run, so not in the controller's policy): the
# Price List API takes no resource.
PRICE_REFRESH_ACTIONS = ("pricing:GetProducts",)


def price_refresh_policy() -> dict[str, Any]:
    """The policy of whoever runs ``ec2cluster refresh-prices``."""
    return {"Version": POLICY_VERSION, "Statement": [statement("PriceList", PRICE_REFRESH_ACTIONS, "*")]}


def leading_keys(patterns: list[str]) -> dict[str, Any]:
    """Every item's partition key matches one of ``patterns``, and the request names its keys."""
    return {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": patterns},
        "Null": {"dynamodb:LeadingKeys": "false"},
    }


def policy_actions(policy: dict[str, Any]) -> set[str]:
    """The actions a policy allows (its Deny statements only narrow them)."""
    return {action for item in policy["Statement"] if item["Effect"] == "Allow" for action in item["Action"]}
