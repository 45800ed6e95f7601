"""EC2ClusterEnqueueOperator: the tasks into the cluster's SQS queue, packed and batched, resumable."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.sdk.exceptions import AirflowException

from airflow_ec2cluster.defaults import (
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_QUEUE_RETENTION_SECONDS,
    DEFAULT_SEND_CONCURRENCY,
    DEFAULT_STATE_TABLE,
    DEFAULT_TASKS_PER_MESSAGE,
    DEFAULT_VISIBILITY_TIMEOUT,
)
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.meta import ClusterMeta, MetaUpdate
from airflow_ec2cluster.operators.base import ClusterOperatorMixin
from airflow_ec2cluster.packing import (
    OutgoingMessage,
    PendingTask,
    pack_tasks,
    tasks_per_message_problem,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
# Write the enqueue resume point to the META item at most this often (one UpdateItem each time).
CHECKPOINT_SECONDS = 2.0


def positional_task_id(index: int) -> str:
    return f"t{index:09d}"


class EC2ClusterEnqueueOperator(ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Put the job's tasks on the cluster's SQS queue (creating the queue, DLQ and state table when missing).

    Exactly one source: ``tasks`` (a list, or an XComArg resolving to one), ``tasks_callable`` (returns an
    iterable; called with ``tasks_callable_kwargs``), or ``s3_uri`` (a JSON-lines object, streamed, one
    payload per non-blank line). Each payload becomes a task ``{"task_id": ..., "payload": ...}``; the task
    id is ``payload[id_field]`` when ``id_field`` is set, else ``t`` + the 9-digit position in the sequence,
    so the same sequence always gets the same ids. Tasks travel ``tasks_per_message`` to an SQS message
    (default 10, at most 100; 1 for one task per message): the worker receives, logs and deletes a message
    once for all its tasks, which divides the request bill, and re-runs only a message's unfinished tasks
    when it comes back. A message whose task keeps failing goes to the dead-letter queue whole.

    Positional ids are unique by construction, so the enqueue streams in constant memory; with ``id_field``
    it keeps every id in a set to refuse duplicates (about 100 bytes per task: ~20 MB for 200,000 tasks).

    A retried enqueue resumes: the count of messages sent without a gap is recorded in the cluster's META
    item as it goes, a retry skips that many, and a finished enqueue is not repeated. The source must yield
    the same sequence (and ``tasks_per_message`` stay the same) on a retry. Messages sent after the last
    checkpoint may be sent again on a retry; the workers key every write by task id, so a duplicate costs a
    re-run, not a wrong result.

    Returns ``{"cluster_id", "queue_url", "dlq_url", "enqueued", "enqueued_messages"}``.
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields(
        "cluster_id", "tasks", "tasks_callable_kwargs", "s3_uri", "state_table", "id_field"
    )
    ui_color = "#f3e5ab"

    def __init__(
        self,
        *,
        tasks: Iterable[Any] | None = None,
        tasks_callable: Callable[..., Iterable[Any]] | None = None,
        tasks_callable_kwargs: dict[str, Any] | None = None,
        s3_uri: str | None = None,
        id_field: str | None = None,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT,
        max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
        retention_seconds: int = DEFAULT_QUEUE_RETENTION_SECONDS,
        send_concurrency: int = DEFAULT_SEND_CONCURRENCY,
        tasks_per_message: int = DEFAULT_TASKS_PER_MESSAGE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        sources = [s for s in (tasks, tasks_callable, s3_uri) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of tasks, tasks_callable or s3_uri")
        problem = tasks_per_message_problem(tasks_per_message)
        if problem:
            raise ValueError(problem)
        self.tasks_per_message = tasks_per_message
        self.tasks = tasks
        self.tasks_callable = tasks_callable
        self.tasks_callable_kwargs = tasks_callable_kwargs or {}
        self.s3_uri = s3_uri
        self.id_field = id_field
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.visibility_timeout = visibility_timeout
        self.max_receive_count = max_receive_count
        self.retention_seconds = retention_seconds
        self.send_concurrency = send_concurrency

    def execute(self, context: Context) -> dict[str, Any]:
        cluster_id = self.resolve_cluster_id(context)
        hook = self.hook
        hook.ensure_state_table(self.state_table)
        queue_url, dlq_url = hook.ensure_queues(
            cluster_id,
            visibility_timeout=self.visibility_timeout,
            max_receive_count=self.max_receive_count,
            retention_seconds=self.retention_seconds,
        )
        result = {"cluster_id": cluster_id, "queue_url": queue_url, "dlq_url": dlq_url}
        meta = hook.get_meta(self.state_table, cluster_id) or ClusterMeta(cluster_id=cluster_id)
        if meta.enqueue_complete:
            self.log.info(
                "Cluster %s: all %s tasks were enqueued before; nothing to do", cluster_id, meta.enqueued
            )
            return {**result, **enqueued_counts(meta)}

        resumed = enqueued_counts(meta)
        self.check_resumable(meta, resumed)
        if resumed["enqueued_messages"]:
            self.log.info(
                "Cluster %s: resuming the enqueue after the first %d messages (%d tasks)",
                cluster_id,
                resumed["enqueued_messages"],
                resumed["enqueued"],
            )
        hook.update_meta(
            self.state_table,
            cluster_id,
            MetaUpdate(
                queue_url=queue_url,
                dlq_url=dlq_url,
                enqueued=resumed["enqueued"],
                enqueued_messages=resumed["enqueued_messages"],
                tasks_per_message=self.tasks_per_message,
                enqueue_complete=False,
            ),
        )
        checkpoint = EnqueueCheckpoint(
            hook, self.state_table, cluster_id, resumed["enqueued_messages"], resumed["enqueued"]
        )
        messages = skip_sent(self.messages(hook), resumed["enqueued_messages"])
        try:
            hook.send_messages(
                queue_url, messages, concurrency=self.send_concurrency, on_progress=checkpoint.progress
            )
        except Exception as error:
            checkpoint.flush()
            raise AirflowException(
                f"enqueue for cluster {cluster_id} stopped after {checkpoint.tasks} tasks: {error}"
            ) from error
        counts = {"enqueued": checkpoint.tasks, "enqueued_messages": checkpoint.messages}
        hook.update_meta(
            self.state_table,
            cluster_id,
            MetaUpdate(
                enqueued=checkpoint.tasks, enqueued_messages=checkpoint.messages, enqueue_complete=True
            ),
        )
        self.log.info(
            "Cluster %s: %d tasks enqueued in %d messages on %s",
            cluster_id,
            checkpoint.tasks,
            checkpoint.messages,
            queue_url,
        )
        return {**result, **counts}

    def check_resumable(self, meta: ClusterMeta, resumed: dict[str, int]) -> None:
        recorded = meta.tasks_per_message
        if resumed["enqueued_messages"] and recorded is not None and int(recorded) != self.tasks_per_message:
            raise AirflowException(
                f"tasks_per_message: this cluster's enqueue was started with {int(recorded)} and is resumed "
                f"with {self.tasks_per_message}; resume it with tasks_per_message={int(recorded)} (or use a "
                "new cluster_id) so that no task is skipped or sent twice"
            )

    def messages(self, hook: EC2ClusterHook) -> Iterator[OutgoingMessage]:
        return pack_tasks(self.pending_tasks(hook), self.tasks_per_message)

    def pending_tasks(self, hook: EC2ClusterHook) -> Iterator[PendingTask]:
        # Positional ids cannot collide, so only user-given ids are remembered to catch duplicates: memory
        # then grows with the number of tasks (about 100 bytes per id), constant otherwise.
        seen: set[str] | None = set() if self.id_field else None
        for index, (origin, payload) in enumerate(self.payloads(hook)):
            task_id = self.task_id_for(index, origin, payload)
            if seen is not None:
                if task_id in seen:
                    raise ValueError(f"duplicate task id {task_id!r} ({origin}): task ids must be unique")
                seen.add(task_id)
            yield PendingTask(task_id, payload, origin)

    def task_id_for(self, index: int, origin: str, payload: Any) -> str:
        if not self.id_field:
            return positional_task_id(index)
        if not isinstance(payload, dict) or self.id_field not in payload:
            raise ValueError(
                f"{origin}: payload has no {self.id_field!r} field (id_field) to take the task id from"
            )
        task_id = str(payload[self.id_field])
        if not TASK_ID_RE.match(task_id):
            raise ValueError(
                f"{origin}: task id {task_id!r} is invalid: use 1-200 characters of letters, digits and _.:-"
            )
        return task_id

    def payloads(self, hook: EC2ClusterHook) -> Iterator[tuple[str, Any]]:
        """(origin, payload) pairs from the configured source, streamed."""
        if self.s3_uri is not None:
            yield from jsonl_payloads(self.s3_uri, hook.iter_s3_lines(self.s3_uri))
            return
        source = self.tasks if self.tasks is not None else self.tasks_callable(**self.tasks_callable_kwargs)
        if isinstance(source, (str, bytes, dict)):
            raise ValueError(f"tasks must be an iterable of payloads, not {type(source).__name__}")
        for index, payload in enumerate(source):
            yield f"item {index}", payload


def jsonl_payloads(uri: str, lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[str, Any]]:
    for line_number, line in lines:
        if not line.strip():
            continue
        origin = f"line {line_number} of {uri}"
        try:
            yield origin, json.loads(line)
        except ValueError as error:
            raise ValueError(f"{origin}: not valid JSON ({error})") from None


def skip_sent(messages: Iterator[OutgoingMessage], count: int) -> Iterator[OutgoingMessage]:
    """The messages after the first ``count`` (which are still read, so ids and checks stay the same)."""
    for index, message in enumerate(messages):
        if index >= count:
            yield message


def enqueued_counts(meta: ClusterMeta) -> dict[str, int]:
    """Tasks and messages a (possibly interrupted) enqueue recorded; one task per message before groups."""
    tasks = meta.enqueued or 0
    messages = meta.enqueued_messages
    return {"enqueued": tasks, "enqueued_messages": tasks if messages is None else messages}


class EnqueueCheckpoint:
    """Records how many messages (and tasks) are sent without a gap, in META, every CHECKPOINT_SECONDS."""

    def __init__(
        self, hook: EC2ClusterHook, table: str, cluster_id: str, sent_messages: int, sent_tasks: int
    ) -> None:
        self.hook, self.table, self.cluster_id = hook, table, cluster_id
        self.base = (sent_messages, sent_tasks)
        self.messages, self.tasks = self.base
        self.recorded = self.base
        self.recorded_at = time.monotonic()

    def progress(self, messages: int, tasks: int) -> None:
        self.messages, self.tasks = self.base[0] + messages, self.base[1] + tasks
        if time.monotonic() - self.recorded_at >= CHECKPOINT_SECONDS:
            self.flush()

    def flush(self) -> None:
        if (self.messages, self.tasks) != self.recorded:
            self.hook.update_meta(
                self.table,
                self.cluster_id,
                MetaUpdate(enqueued=self.tasks, enqueued_messages=self.messages),
            )
            self.recorded = (self.messages, self.tasks)
        self.recorded_at = time.monotonic()
