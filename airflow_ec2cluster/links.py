"""Operator extra links into the AWS console: the cluster's instances, its queue, its state table.

Region- and partition-aware like the amazon provider's links (they are :class:`BaseAwsLink`). Against a
custom endpoint (the local cloud, or any ``endpoint_url``) there is no console to point at: each link is
recorded as absent (an empty value), so Airflow hides it. Every link of a task is always recorded: when a
task ends, Airflow looks each declared link up in XCom and logs an error for any it cannot find.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.providers.amazon.aws.links.base_aws import BASE_AWS_CONSOLE_LINK, BaseAwsLink

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

LINKED_SERVICES = ("ec2", "sqs", "dynamodb")


class EC2ClusterInstancesLink(BaseAwsLink):
    """The EC2 console's instance list, filtered by the cluster's tag (replacements included)."""

    name = "EC2 Cluster Instances"
    key = "_ec2cluster_instances"
    format_str = (
        BASE_AWS_CONSOLE_LINK
        + "/ec2/home?region={region_name}#Instances:tag:"
        + TAG_CLUSTER_ID
        + "={cluster_id}"
    )


class EC2ClusterQueueLink(BaseAwsLink):
    """The cluster's task queue in the SQS console."""

    name = "EC2 Cluster Queue"
    key = "_ec2cluster_queue"
    format_str = BASE_AWS_CONSOLE_LINK + "/sqs/v3/home?region={region_name}#/queues/{queue_url_quoted}"


class EC2ClusterStateTableLink(BaseAwsLink):
    """The state table (worker status, task log, results) in the DynamoDB console's item explorer."""

    name = "EC2 Cluster State Table"
    key = "_ec2cluster_state_table"
    format_str = BASE_AWS_CONSOLE_LINK + "/dynamodbv2/home?region={region_name}#item-explorer?table={table}"


CLUSTER_LINKS = (EC2ClusterInstancesLink(), EC2ClusterQueueLink(), EC2ClusterStateTableLink())


def uses_custom_endpoint(hook: EC2ClusterHook) -> bool:
    """Whether any linked service is served by a custom endpoint (connection extra or AWS_ENDPOINT_URL*)."""
    for service in LINKED_SERVICES:
        if hook.conn_config.get_service_endpoint_url(service_name=service):
            return True
        if os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}"):
            return True
    return bool(os.environ.get("AWS_ENDPOINT_URL"))


def link_values(*, cluster_id: str, queue_url: str | None, state_table: str) -> dict[str, dict[str, Any]]:
    """Per link class, the values its format string needs beyond region and domain."""
    return {
        EC2ClusterInstancesLink.key: {"cluster_id": quote(cluster_id, safe="")},
        EC2ClusterQueueLink.key: {"queue_url_quoted": quote(queue_url or "", safe="")},
        EC2ClusterStateTableLink.key: {"table": quote(state_table, safe="")},
    }


def persist_cluster_links(
    context: Context,
    operator: Any,
    hook: EC2ClusterHook,
    *,
    cluster_id: str,
    queue_url: str | None,
    state_table: str,
) -> bool:
    """Store every link's values in XCom (what BaseAwsLink reads); False when they are hidden.

    A link with nothing to point at (a custom endpoint, or no queue yet) is recorded as absent.
    """
    shown = not uses_custom_endpoint(hook)
    values = link_values(cluster_id=cluster_id, queue_url=queue_url, state_table=state_table)
    for link in CLUSTER_LINKS:
        if shown and (queue_url or link.key != EC2ClusterQueueLink.key):
            type(link).persist(
                context=context,
                operator=operator,
                region_name=hook.conn_region_name,
                aws_partition=hook.conn_partition,
                **values[link.key],
            )
        else:
            record_link_absent(context, operator, link)
    return shown


def record_link_absent(context: Context, operator: Any, link: BaseAwsLink) -> None:
    # BaseAwsLink.get_link formats nothing for an empty value, and Airflow then hides the link.
    if operator.do_xcom_push:
        context["ti"].xcom_push(key=link.key, value={})
