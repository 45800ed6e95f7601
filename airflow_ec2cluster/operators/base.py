"""What the cluster operators share: the cluster id, console links, templated flags."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException
from botocore.exceptions import BotoCoreError, ClientError

from airflow_ec2cluster.cluster import (
    cluster_id_from_context,
    task_queue_name,
)
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.links import persist_cluster_links, uses_custom_endpoint

if TYPE_CHECKING:
    from airflow.sdk import Context


def as_bool(value: Any) -> bool:
    """A templated flag: rendered as text unless the DAG renders native objects."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


class ClusterOperatorMixin:
    """``cluster_id`` and ``state_table`` handling shared by the operators."""

    cluster_id: str | None

    def resolve_cluster_id(self, context: Context) -> str:
        try:
            return cluster_id_from_context(self.cluster_id, context)
        except ValueError as error:
            raise AirflowException(str(error)) from error

    def persist_links(
        self, context: Context, hook: EC2ClusterHook, cluster_id: str, state_table: str
    ) -> None:
        """Console links for the UI (absent on a custom endpoint); a link never fails the task."""
        queue_url = None
        if not uses_custom_endpoint(hook):
            try:
                queue_url = hook.get_queue_url(task_queue_name(cluster_id))
            except (ClientError, BotoCoreError) as error:
                self.log.warning("Console link to the queue not recorded: %s", error)  # type: ignore[attr-defined]
        persist_cluster_links(
            context, self, hook, cluster_id=cluster_id, queue_url=queue_url, state_table=state_table
        )
