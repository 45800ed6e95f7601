"""EC2ClusterTeardownOperator: terminate every instance of the cluster, always."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from botocore.exceptions import BotoCoreError, ClientError

from airflow_ec2cluster.aws import error_code
from airflow_ec2cluster.aws.s3 import cluster_bundles_prefix
from airflow_ec2cluster.calls import run_sync
from airflow_ec2cluster.cluster import (
    LaunchSpec,
    dead_letter_queue_name,
    task_queue_name,
)
from airflow_ec2cluster.cost import cost_summary
from airflow_ec2cluster.defaults import DEFAULT_STATE_TABLE, DEFAULT_WAITER_DELAY, DEFAULT_WAITER_MAX_ATTEMPTS
from airflow_ec2cluster.drain.decisions import LIVE_STATES
from airflow_ec2cluster.drain.round import cost_round
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.links import CLUSTER_LINKS
from airflow_ec2cluster.meta import MetaUpdate
from airflow_ec2cluster.operators.base import ClusterOperatorMixin
from airflow_ec2cluster.pricing.table import on_demand_table

if TYPE_CHECKING:
    from airflow.sdk import Context


def _ignore_missing_table(error: ClientError) -> None:
    if error_code(error) != "ResourceNotFoundException":
        raise error


class EC2ClusterTeardownOperator(ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Terminate every instance tagged with the cluster id, in any live state, and wait until terminated.

    Finds instances by tag, not by what the launch task recorded, so it also catches instances of a launch
    that died before recording them and the sensor's replacements. ``delete_queues=True`` also deletes the
    task queue and the dead-letter queue (keep them to inspect or re-drive dead-lettered tasks), unless the
    task queue still holds work: after a failed drain they stay, so that clearing the launch and drain tasks
    runs it. Meant to run as an Airflow teardown task:
    ``launch >> drain >> teardown.as_teardown(setups=launch)``.
    The security group the launch created for the cluster (when given none) is deleted once the instances
    are terminated. Returns ``{"cluster_id", "terminated": [ids], "queues_deleted": bool,
    "security_groups_deleted": [ids], "bundles_deleted": count, "cost", "log_group": name or None}``:
    ``cost`` is the cluster's final estimate once its instances are gone (the fields of the drain summary's
    cost, see :func:`airflow_ec2cluster.cost.cost_summary`; None when it could not be read). The cluster's
    bundle in S3 is deleted then too; the workers' CloudWatch Logs group is kept (its retention ends it),
    and the log says where it is.
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields("cluster_id", "delete_queues", "state_table")
    operator_extra_links = CLUSTER_LINKS
    ui_color = "#e0e0e0"

    def __init__(
        self,
        *,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        delete_queues: bool = False,
        wait_for_termination: bool = True,
        waiter_delay: int = DEFAULT_WAITER_DELAY,
        waiter_max_attempts: int = DEFAULT_WAITER_MAX_ATTEMPTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.delete_queues = delete_queues
        self.wait_for_termination = wait_for_termination
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts

    def execute(self, context: Context) -> dict[str, Any]:
        cluster_id = self.resolve_cluster_id(context)
        hook = self.hook
        self.persist_links(context, hook, cluster_id, self.state_table)
        # First: without its launch template, no drain round still running anywhere can launch again.
        templates_deleted = hook.delete_launch_templates(cluster_id)
        for name in templates_deleted:
            self.log.info("Deleted launch template %s", name)
        states = (*LIVE_STATES, "shutting-down")
        instance_ids = [i["InstanceId"] for i in hook.list_cluster_instances(cluster_id, states)]
        if instance_ids:
            self.log.info("Cluster %s: terminating %s", cluster_id, ", ".join(instance_ids))
        else:
            self.log.info("Cluster %s: no instances left", cluster_id)
        hook.terminate_instances(
            instance_ids,
            wait=self.wait_for_termination,
            waiter_delay=self.waiter_delay,
            waiter_max_attempts=self.waiter_max_attempts,
        )
        groups_deleted = self.delete_security_groups(hook, cluster_id)
        meta = hook.find_meta(self.state_table, cluster_id)
        spec = meta.launch_spec if meta is not None else None
        bundles_deleted = self.delete_bundles(hook, cluster_id, spec)
        log_group = spec.log_group if spec is not None else None
        if log_group:
            # Kept: the workers' logs outlive the cluster, until the group's retention removes them.
            self.log.info(
                "Cluster %s: the workers' logs stay in CloudWatch Logs group %s (region %s), a stream per "
                "instance, until its retention; read them with `ec2cluster logs %s [--instance ID] "
                "[--task ID]`",
                cluster_id,
                log_group,
                hook.region,
                cluster_id,
            )
        queues_deleted = False
        if self.delete_queues:
            urls = [
                hook.get_queue_url(task_queue_name(cluster_id)),
                hook.get_queue_url(dead_letter_queue_name(cluster_id)),
            ]
            work = hook.queue_counts(urls[0], urls[1]).work if all(urls) else 0
            if work:
                # A failed drain: the queue holds the work a re-run of the launch and drain tasks needs.
                self.log.warning(
                    "Cluster %s: keeping its queues, %d messages of tasks are not done; after fixing the "
                    "cause clear the launch and drain tasks to run them (or delete the queues yourself)",
                    cluster_id,
                    work,
                )
            else:
                for url in filter(None, urls):
                    hook.delete_queue(url)
                    self.log.info("Deleted queue %s", url)
                queues_deleted = True
        cost, kept = self.final_cost(hook, cluster_id)
        self.record_teardown(hook, cluster_id, instance_ids, kept)
        return {
            "cluster_id": cluster_id,
            "terminated": instance_ids,
            "queues_deleted": queues_deleted,
            "security_groups_deleted": groups_deleted,
            "bundles_deleted": bundles_deleted,
            "launch_templates_deleted": templates_deleted,
            "cost": cost,
            "log_group": log_group,
        }

    def final_cost(self, hook: EC2ClusterHook, cluster_id: str) -> tuple[dict[str, Any] | None, MetaUpdate]:
        """The cluster's cost once its instances are gone (the drain's summary leaves out its tail: the
        time until the teardown), and the usage META should keep; None when it cannot be read (never a
        reason to fail the teardown)."""
        try:
            meta = hook.get_meta(self.state_table, cluster_id)
            if meta is None:
                return None, MetaUpdate()
            described = hook.list_cluster_instances(cluster_id, None)
            costing = run_sync(cost_round(meta, described, time.time()), hook)
        except (ClientError, BotoCoreError) as error:
            self.log.warning("Cluster %s: its cost could not be estimated: %s", cluster_id, error)
            return None, MetaUpdate()
        summary = cost_summary(costing.estimate, meta.max_cost, on_demand_table().as_of)
        self.log.info(
            "Cluster %s cost ~%s for %.0f instance-seconds (estimate)",
            cluster_id,
            costing.estimate.text(),
            costing.estimate.instance_seconds,
        )
        ended = {iid: usage.to_dict() for iid, usage in costing.ended.items()}
        kept = MetaUpdate(
            instance_usage={**meta.instance_usage, **ended} if ended else None,
            spot_prices={**meta.spot_prices, **costing.spot_prices} if costing.spot_prices else None,
        )
        return summary, kept

    def delete_security_groups(self, hook: EC2ClusterHook, cluster_id: str) -> list[str]:
        """Delete the groups the launch made for the cluster, once its instances are gone (an instance's
        network interface holds its group until the instance is terminated)."""
        group_ids = hook.cluster_security_groups(cluster_id)
        if not group_ids:
            return []
        if not self.wait_for_termination:
            self.log.warning(
                "Cluster %s: keeping security group(s) %s: without wait_for_termination the instances may "
                "still hold them; run the teardown again with wait_for_termination=True to delete them",
                cluster_id,
                ", ".join(group_ids),
            )
            return []
        for group_id in group_ids:
            hook.delete_security_group(group_id)
            self.log.info("Deleted security group %s", group_id)
        return group_ids

    def delete_bundles(self, hook: EC2ClusterHook, cluster_id: str, spec: LaunchSpec | None) -> int:
        """Delete the cluster's bundles from S3 (where META's launch spec says the launch stored them), once
        no instance can still be booting from them."""
        if spec is None or not spec.bundle_bucket:
            return 0
        if not self.wait_for_termination:
            self.log.warning(
                "Cluster %s: keeping its bundle in s3://%s (instances may still boot)",
                cluster_id,
                spec.bundle_bucket,
            )
            return 0
        prefix = cluster_bundles_prefix(spec.bundle_prefix or "", cluster_id)
        deleted = hook.delete_objects_under(spec.bundle_bucket, prefix)
        if deleted:
            self.log.info(
                "Deleted the cluster's bundle(s): %d under s3://%s/%s", deleted, spec.bundle_bucket, prefix
            )
        return deleted

    def record_teardown(
        self,
        hook: EC2ClusterHook,
        cluster_id: str,
        instance_ids: list[str],
        kept: MetaUpdate | None = None,
    ) -> None:
        """Note the teardown in the META item when there is a state table (never fail the teardown on it),
        with what ``kept`` adds (the usage of instances that ended, for the cost after EC2 forgets them)."""
        try:
            hook.update_meta(
                self.state_table,
                cluster_id,
                replace(kept or MetaUpdate(), torn_down_at=time.time(), terminated_at_teardown=instance_ids),
            )
        except ClientError as error:
            _ignore_missing_table(error)
