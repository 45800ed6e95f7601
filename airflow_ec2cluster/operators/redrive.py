"""EC2ClusterRedriveOperator: move dead-lettered tasks back to the task queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.sdk.exceptions import AirflowException

from airflow_ec2cluster.cluster import dead_letter_queue_name, task_queue_name
from airflow_ec2cluster.defaults import DEFAULT_LOG_SHARDS, DEFAULT_STATE_TABLE
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.links import CLUSTER_LINKS
from airflow_ec2cluster.operators.base import ClusterOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Context


class EC2ClusterRedriveOperator(ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Move the cluster's dead-lettered messages back to its task queue, for another run.

    Run it before launching (or re-running launch and drain) again: the next workers pick the messages up,
    run only the tasks their task-log items do not show done (a moved message that has tasks logged done
    is marked, and the worker reads its item first), and overwrite those items with the new outcome.
    Moves with receive / BatchGetItem of their task-log items / SendMessageBatch / DeleteMessageBatch
    (checking ``Failed``), at most ``max_messages`` (default all). Returns ``{"cluster_id", "redriven": n,
    "task_ids": [...]}``: the number of messages moved, and the ids of the tasks in them that had not
    finished (each failing task by its own id, not its group's).
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields("cluster_id", "state_table", "max_messages")
    operator_extra_links = CLUSTER_LINKS
    ui_color = "#ffab91"

    def __init__(
        self,
        *,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        max_messages: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.max_messages = max_messages

    def execute(self, context: Context) -> dict[str, Any]:
        cluster_id = self.resolve_cluster_id(context)
        hook = self.hook
        self.persist_links(context, hook, cluster_id, self.state_table)
        queue_url = hook.get_queue_url(task_queue_name(cluster_id))
        dlq_url = hook.get_queue_url(dead_letter_queue_name(cluster_id))
        if not queue_url or not dlq_url:
            raise AirflowException(
                f"cluster {cluster_id} has no task queue or dead-letter queue (deleted at teardown?): "
                "nothing to re-drive"
            )
        limit = None if self.max_messages is None else int(self.max_messages)
        meta = hook.get_meta(self.state_table, cluster_id)
        outcome = hook.redrive_dead_letters(
            dlq_url,
            queue_url,
            limit=limit,
            table=self.state_table,
            cluster_id=cluster_id,
            shards=meta.log_shards if meta else DEFAULT_LOG_SHARDS,
        )
        self.log.info(
            "Cluster %s: %d dead-lettered message(s) moved back to %s, with %d task(s) not finished: %s",
            cluster_id,
            outcome.messages,
            queue_url,
            len(outcome.task_ids),
            shown_ids(outcome.task_ids),
        )
        if outcome.marked:
            self.log.info(
                "%d of those message(s) also hold tasks already done: the workers skip them", outcome.marked
            )
        return {"cluster_id": cluster_id, "redriven": outcome.messages, "task_ids": outcome.task_ids}


SHOWN_IDS = 20


def shown_ids(task_ids: list[str], limit: int = SHOWN_IDS) -> str:
    """The first ``limit`` ids, and how many more."""
    more = len(task_ids) - limit
    return ", ".join(task_ids[:limit]) + (f" and {more} more" if more > 0 else "") if task_ids else "none"
