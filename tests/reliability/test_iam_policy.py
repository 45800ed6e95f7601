"""Every AWS action the code calls is in the policy of the side that calls it, and nothing more."""

from __future__ import annotations

import ast
import json
from functools import cache
from pathlib import Path

import botocore.session
from botocore import xform_name

from airflow_ec2cluster.commands.iam_policy import register
from airflow_ec2cluster.iam import (
    PolicyScope,
    controller_policy,
    policy_actions,
    price_refresh_policy,
    worker_policy,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("sqs", "ec2", "dynamodb", "s3", "iam", "pricing", "logs")
# IAM action names that differ from the API's (batch calls are authorised as their single form).
ACTION_NAMES = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
    "s3:HeadObject": "s3:GetObject",
    "s3:HeadBucket": "s3:ListBucket",
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
}
# boto3's managed transfers: a multipart upload is authorised as PutObject, and aborted on failure.
TRANSFERS = {"upload_file": {"s3:PutObject", "s3:AbortMultipartUpload"}}
# Further actions a call needs, from the arguments the code passes.
IMPLIED = {
    "sqs:CreateQueue": {"sqs:TagQueue"},  # tags=
    # TagSpecifications=, IamInstanceProfile=, and a first spot launch creates the spot service-linked role.
    "ec2:RunInstances": {"ec2:CreateTags", "iam:PassRole", "iam:CreateServiceLinkedRole"},
    # CreateFleet launches each pool as RunInstances, with the same implications.
    "ec2:CreateFleet": {"ec2:RunInstances", "ec2:CreateTags", "iam:PassRole", "iam:CreateServiceLinkedRole"},
    "ec2:CreateLaunchTemplate": {"ec2:CreateTags"},  # TagSpecifications=
    "logs:CreateLogGroup": {"logs:TagResource"},  # tags=
}
# Files of each side (the local cloud and the demo live outside the provider, in localcloud/); the price
# table's refresh is a maintainer's command with a policy of its own (`iam-policy --side prices`).
PRICE_REFRESH = REPO_ROOT / "airflow_ec2cluster" / "commands" / "refresh_prices.py"
CONTROLLER_EXCLUDED: tuple[str, ...] = (PRICE_REFRESH.name,)


@cache
def operations() -> dict[str, dict[str, str]]:
    """service -> {snake_case method: API operation name}."""
    session = botocore.session.get_session()
    return {
        service: {xform_name(op): op for op in session.get_service_model(service).operation_names}
        for service in SERVICES
    }


@cache
def waiter_operations() -> dict[str, str]:
    session = botocore.session.get_session()
    found = {}
    for service in SERVICES:
        try:
            model = session.get_waiter_model(service)
        except Exception:  # a service without waiters
            continue
        for name in model.waiter_names:
            found[xform_name(name)] = f"{service}:{model.get_waiter(name).operation}"
    return found


def service_of(receiver: str, method: str) -> str | None:
    candidates = [service for service in SERVICES if method in operations()[service]]
    for service in candidates:
        if service in receiver.lower():
            return service
    return candidates[0] if len(candidates) == 1 else None


def calls_in(source: Path | str) -> set[str]:
    """``service:Operation`` of every AWS call in a file or source text (methods, paginators, waiters...)."""
    found = set()
    text = source.read_text() if isinstance(source, Path) else source
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "BatchWriter":
            found.add("dynamodb:BatchWriteItem")  # boto3's BatchWriter on a client
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        method, receiver = node.func.attr, ast.unparse(node.func.value)
        argument = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
        if method == "batch_writer":
            found.add("dynamodb:BatchWriteItem")
        elif method in TRANSFERS:
            found |= TRANSFERS[method]
        elif method == "get_paginator" and isinstance(argument, str):
            service = service_of(receiver, argument)
            if service:
                found.add(f"{service}:{operations()[service][argument]}")
        elif method == "get_waiter" and isinstance(argument, str):
            found.add(waiter_operations()[argument])
        else:
            service = service_of(receiver, method)
            if service and method not in ("get_paginator", "get_waiter", "can_paginate"):
                found.add(f"{service}:{operations()[service][method]}")
    return found


def actions_called(sources: list[Path | str]) -> set[str]:
    actions = set()
    for source in sources:
        for call in calls_in(source):
            action = ACTION_NAMES.get(call, call)
            actions |= {action, *IMPLIED.get(action, ())}
    return actions


def controller_files() -> list[Path]:
    root = REPO_ROOT / "airflow_ec2cluster"
    return [
        p
        for p in sorted(root.rglob("*.py"))
        if not any(part in CONTROLLER_EXCLUDED for part in p.relative_to(root).parts)
    ]


def boot_loader_calls(path: Path) -> set[str]:
    """The boot loader's AWS calls: it signs its own HTTP requests (no botocore on the image), as
    ``self.dynamodb("<Operation>", ...)`` and ``self.call("s3", "GET", <object URL>)`` (GetObject)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        values = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if node.func.attr == "dynamodb" and values:
            found.add(f"dynamodb:{values[0]}")
        elif node.func.attr == "call" and values[:2] == ["s3", "GET"]:
            found.add("s3:GetObject")
    return found


BOOT_LOADER = REPO_ROOT / "worker" / "ec2cluster_worker" / "boot.py"


def worker_actions() -> set[str]:
    return actions_called(
        sorted((REPO_ROOT / "worker" / "ec2cluster_worker").rglob("*.py"))
    ) | boot_loader_calls(BOOT_LOADER)


def test_the_analysis_finds_known_calls():
    assert {
        "sqs:SendMessage",
        "ec2:CreateFleet",
        "ec2:RunInstances",
        "dynamodb:Query",
        "ec2:DescribeInstances",
    } <= actions_called(controller_files())
    assert {"sqs:ReceiveMessage", "dynamodb:BatchWriteItem"} <= worker_actions()
    assert boot_loader_calls(BOOT_LOADER) >= {"dynamodb:PutItem", "s3:GetObject"}
    assert calls_in("from boto3.dynamodb.table import BatchWriter\nBatchWriter('t', client)") == {
        "dynamodb:BatchWriteItem"
    }


def test_controller_policy_is_exactly_what_the_airflow_side_calls():
    assert policy_actions(controller_policy(PolicyScope())) == actions_called(controller_files())


def test_the_price_refresh_policy_is_exactly_what_the_refresh_calls():
    refresh = actions_called([PRICE_REFRESH])
    assert policy_actions(price_refresh_policy()) == refresh == {"pricing:GetProducts"}


def test_worker_policy_is_exactly_what_the_worker_calls():
    assert policy_actions(worker_policy(PolicyScope())) == worker_actions()


def test_policies_are_scoped_to_the_clusters_names_and_tag():
    scope = PolicyScope(region="eu-west-1", account_id="123456789012", cluster_prefix="etl-")
    controller = {s["Sid"]: s for s in controller_policy(scope)["Statement"]}
    worker = {s["Sid"]: s for s in worker_policy(scope)["Statement"]}
    assert controller["ClusterQueues"]["Resource"] == [
        "arn:aws:sqs:eu-west-1:123456789012:ec2cluster-etl-*-tasks",
        "arn:aws:sqs:eu-west-1:123456789012:ec2cluster-etl-*-dlq",
    ]
    assert worker["TaskQueue"]["Resource"] == "arn:aws:sqs:eu-west-1:123456789012:ec2cluster-etl-*-tasks"
    table = "arn:aws:dynamodb:eu-west-1:123456789012:table/ec2cluster-state"
    assert worker["ReadClusterRecords"]["Resource"] == worker["WriteStatusAndTaskLog"]["Resource"] == table
    # The worker writes its cluster's status and task-log items only: never META or the worker bundle.
    writes = worker["WriteStatusAndTaskLog"]["Condition"]
    assert writes["ForAllValues:StringLike"]["dynamodb:LeadingKeys"] == ["C#etl-*#W", "C#etl-*#T#*"]
    assert writes["Null"] == {"dynamodb:LeadingKeys": "false"}
    groups = "arn:aws:logs:eu-west-1:123456789012:log-group:/ec2cluster/etl-*"
    assert controller["ClusterLogGroups"]["Resource"] == worker["ShipLogs"]["Resource"] == groups
    terminate = controller["TerminateClusterInstances"]
    assert terminate["Condition"] == {"StringLike": {"aws:ResourceTag/ec2cluster:cluster-id": "etl-*"}}
    assert controller["LaunchTaggedWorkers"]["Condition"] == {
        "StringLike": {"aws:RequestTag/ec2cluster:cluster-id": "etl-*"}
    }
    assert controller["PassWorkerRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}
    }
    # Only EC2's Describe* calls, which AWS cannot scope, are on every resource.
    wide = [s["Sid"] for s in controller_policy(scope)["Statement"] if s["Resource"] == "*"]
    assert wide == ["DescribeEC2"]
    # Without a prefix, still only this project's queues: never a bare suffix.
    assert all(":ec2cluster-*-" in arn for arn in PolicyScope().queue_arns())


def test_partitions_follow_the_region_and_a_dag_scopes_its_own_clusters(capsys):
    import argparse

    for region, partition in (
        ("cn-north-1", "aws-cn"),
        ("us-gov-west-1", "aws-us-gov"),
        ("eu-west-1", "aws"),
    ):
        documents = [controller_policy(PolicyScope(region=region)), worker_policy(PolicyScope(region=region))]
        arns = [
            arn
            for document in documents
            for item in document["Statement"]
            for arn in ([item["Resource"]] if isinstance(item["Resource"], str) else item["Resource"])
            if arn != "*"
        ]
        assert arns and all(arn.startswith(f"arn:{partition}:") for arn in arns), (region, arns)
    parser = argparse.ArgumentParser(prog="ec2cluster")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["iam-policy", "--dag-id", "Nightly ETL", "--side", "worker", "--output-table", "out"]
    )
    assert args.handler(args) == 0
    worker = {s["Sid"]: s for s in json.loads(capsys.readouterr().out)["Statement"]}
    assert worker["TaskQueue"]["Resource"] == "arn:aws:sqs:*:*:ec2cluster-nightly-etl-*-tasks"
    assert worker["OutputTable"]["Resource"] == "arn:aws:dynamodb:*:*:table/out"


def test_the_command_prints_both_policies(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="ec2cluster")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["iam-policy", "--cluster-prefix", "etl-", "--region", "us-east-1"])
    assert args.handler(args) == 0
    documents = json.loads(capsys.readouterr().out)
    assert set(documents) == {"controller", "worker"}
    assert all(doc["Version"] == "2012-10-17" for doc in documents.values())
