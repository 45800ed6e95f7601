"""EC2ClusterEnqueueOperator: the tasks into the cluster's SQS queue, packed and batched, resumable."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.exceptions import BotoCoreError, ClientError
from ec2cluster_worker.messages import TASK_ID_RE

from airflow_ec2cluster.aws.s3 import s3_uri_problem
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
    TaskInputError,
    pack_tasks,
    tasks_per_message_problem,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


# Write the enqueue resume point to the META item at most this often (one UpdateItem each time).
CHECKPOINT_SECONDS = 2.0
# A stream's first messages are read and checked before anything is created (1,000 tasks at 10 a message).
PEEK_MESSAGES = 100
PEEK_CHARACTERS = 4 * 1_024 * 1_024
# SQS's bounds of the queue attributes (AWS-FACTS.md), DynamoDB's of a table name.
MAX_VISIBILITY_SECONDS = 12 * 3600
MAX_RECEIVE_COUNT = 1000
MIN_RETENTION_SECONDS, MAX_RETENTION_SECONDS = 60, 14 * 24 * 3600
TABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")


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

    Bad input creates nothing. Before the queues, the META item or the state table are created, every
    argument is checked (``s3_uri``'s form and one HeadObject that the object exists and is readable, the
    queue settings, ``id_field``, ``state_table``, ...), a ``tasks`` list is checked whole (each task id:
    1-200 characters of ``A-Za-z0-9_.:-``, unique; each payload JSON and within SQS's 1 MiB a message), and
    a stream (``s3_uri``, an iterable from ``tasks_callable``) is checked as far as its first 100 messages.
    Each error names the field, the task's place (``tasks[17]``, ``line 5000 of s3_uri s3://...``) and the
    fix, and fails the task without retries (:class:`EnqueueInputError`): the same input fails the same way.
    A stream's bad task found later, after messages were sent, makes the enqueue delete what it made (the
    META item, then both queues) before raising, so the re-run, after the input is fixed, sends every task
    again: nothing is left behind and no task is lost (no worker ran: none was launched). Resuming instead
    could skip or repeat tasks once the input is edited (removing a line shifts every positional id after
    it). Only when workers were already launched for the cluster are its queues kept, and the re-run
    resumes. On AWS, SQS takes a deleted queue's name again only after 60 seconds: a re-run sooner fails
    with a message that says so.

    Any other failure (SQS, S3 or DynamoDB errors, an exception of ``tasks_callable``'s iterable) resumes on
    retry: the count of messages sent without a gap is recorded in the cluster's META item as it goes, a
    retry skips that many, and a finished enqueue is not repeated. The source must yield the same sequence
    (and ``tasks_per_message`` stay the same) on a retry. Messages sent after the last checkpoint may be
    sent again on a retry; the workers key every write by task id, so a duplicate costs a re-run, not a
    wrong result.

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
        problems = argument_problems(
            tasks=self.tasks,
            tasks_callable=self.tasks_callable,
            tasks_callable_kwargs=self.tasks_callable_kwargs,
            s3_uri=self.s3_uri,
            id_field=self.id_field,
            state_table=self.state_table,
            visibility_timeout=self.visibility_timeout,
            max_receive_count=self.max_receive_count,
            retention_seconds=self.retention_seconds,
            send_concurrency=self.send_concurrency,
            tasks_per_message=self.tasks_per_message,
        )
        if problems:
            raise EnqueueInputError(
                "\n".join(
                    [*problems, f"Nothing was created for cluster {cluster_id}: fix the above and re-run."]
                )
            )
        hook = self.hook
        # Read first, so that a finished enqueue's re-run does not read (or need) its source again.
        meta = hook.find_meta(self.state_table, cluster_id) or ClusterMeta(cluster_id=cluster_id)
        if meta.enqueue_complete:
            hook.ensure_state_table(self.state_table)
            queue_url, dlq_url = self.ensure_queues(hook, cluster_id)
            self.log.info(
                "Cluster %s: all %s tasks were enqueued before; nothing to do", cluster_id, meta.enqueued
            )
            return {
                "cluster_id": cluster_id,
                "queue_url": queue_url,
                "dlq_url": dlq_url,
                **enqueued_counts(meta),
            }
        resumed = enqueued_counts(meta)
        self.check_resumable(meta, resumed)
        head, rest = self.checked_start(hook, cluster_id)

        hook.ensure_state_table(self.state_table)
        queue_url, dlq_url = self.ensure_queues(hook, cluster_id)
        result = {"cluster_id": cluster_id, "queue_url": queue_url, "dlq_url": dlq_url}
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
        messages = skip_sent(itertools.chain(head, rest), resumed["enqueued_messages"])
        try:
            hook.send_messages(
                queue_url, messages, concurrency=self.send_concurrency, on_progress=checkpoint.progress
            )
        except TaskInputError as error:
            raise self.after_bad_input(hook, cluster_id, queue_url, dlq_url, checkpoint, error) from error
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

    def checked_start(
        self, hook: EC2ClusterHook, cluster_id: str
    ) -> tuple[list[OutgoingMessage], Iterator[OutgoingMessage]]:
        """(the first messages, the rest) of the input, after every check possible before anything is created:
        the S3 object (HeadObject), a list whole, a stream's first messages."""
        problem = hook.s3_object_problem(self.s3_uri) if self.s3_uri is not None else None
        if problem:
            raise EnqueueInputError(
                f"{problem}\nNothing was created for cluster {cluster_id}: fix the above and re-run."
            )
        try:
            rest = iter(self.messages(hook, self.checked_payloads(hook)))
            return first_messages(rest), rest
        except TaskInputError as error:
            raise EnqueueInputError(
                f"{error}\nNothing was created for cluster {cluster_id}: fix the input and re-run."
            ) from error

    def ensure_queues(self, hook: EC2ClusterHook, cluster_id: str) -> tuple[str, str]:
        return hook.ensure_queues(
            cluster_id,
            visibility_timeout=self.visibility_timeout,
            max_receive_count=self.max_receive_count,
            retention_seconds=self.retention_seconds,
        )

    def after_bad_input(
        self,
        hook: EC2ClusterHook,
        cluster_id: str,
        queue_url: str,
        dlq_url: str,
        checkpoint: EnqueueCheckpoint,
        error: TaskInputError,
    ) -> EnqueueInputError:
        """Delete what the failed enqueue made (META first), unless workers were launched; the error to raise.

        The same input fails the same way, so the user edits it, and a resume after the edit could skip or
        repeat tasks (a removed line shifts every positional id after it). Deleting loses nothing: no worker
        has run (none was launched), and with the META item gone the re-run sends every task again. The
        resume point is recorded first, so a clean-up that fails part-way leaves a state a re-run resumes.
        """
        checkpoint.flush()
        sent = f"{checkpoint.messages} messages ({checkpoint.tasks} tasks)"
        meta = hook.get_meta(self.state_table, cluster_id)
        if meta is not None and (meta.launch_spec is not None or meta.instance_ids):
            return EnqueueInputError(
                f"{error}\nWorkers were launched for cluster {cluster_id}, so the {sent} already sent stay "
                "on its queue: fix that task without changing the ones before it, and re-run; the enqueue "
                "resumes after them."
            )
        try:
            hook.delete_meta(self.state_table, cluster_id)
            hook.delete_queue(queue_url)
            hook.delete_queue(dlq_url)
        except (ClientError, BotoCoreError) as cleanup_error:
            self.log.warning(
                "Cluster %s: the failed enqueue's clean-up failed: %s", cluster_id, cleanup_error
            )
            return EnqueueInputError(
                f"{error}\nDeleting what this enqueue made failed ({cleanup_error}): fix the input and "
                f"re-run (it resumes, or sends every task again if the META item is gone: a task of the "
                f"{sent} sent may then run twice, keyed by its id), or delete cluster {cluster_id} with "
                "the teardown."
            )
        self.log.info(
            "Cluster %s: bad input after %s were sent; deleted its queues and META item", cluster_id, sent
        )
        return EnqueueInputError(
            f"{error}\nNothing of this enqueue is left: the {sent} already sent, both queues of cluster "
            f"{cluster_id} and its META item were deleted. Fix the input and re-run: the re-run sends every "
            "task again (SQS takes the queue names again a minute after their deletion)."
        )

    def check_resumable(self, meta: ClusterMeta, resumed: dict[str, int]) -> None:
        recorded = meta.tasks_per_message
        if resumed["enqueued_messages"] and recorded is not None and int(recorded) != self.tasks_per_message:
            raise AirflowException(
                f"tasks_per_message: this cluster's enqueue was started with {int(recorded)} and is resumed "
                f"with {self.tasks_per_message}; resume it with tasks_per_message={int(recorded)} (or use a "
                "new cluster_id) so that no task is skipped or sent twice"
            )

    def checked_payloads(self, hook: EC2ClusterHook) -> Iterator[tuple[str, Any]]:
        """The payloads to send; a list or tuple is checked whole first (it is in memory already)."""
        if self.s3_uri is not None:
            return self.payloads(hook)
        name, source = self.task_source()
        if isinstance(source, Sequence):
            for _ in self.messages(hook, numbered(name, source)):
                pass
        return numbered(name, source)

    def messages(
        self, hook: EC2ClusterHook, payloads: Iterable[tuple[str, Any]] | None = None
    ) -> Iterator[OutgoingMessage]:
        source = self.payloads(hook) if payloads is None else payloads
        return pack_tasks(self.pending_tasks(source), self.tasks_per_message)

    def pending_tasks(self, payloads: Iterable[tuple[str, Any]]) -> Iterator[PendingTask]:
        # Positional ids cannot collide, so only user-given ids are remembered to catch duplicates: memory
        # then grows with the number of tasks (about 100 bytes per id), constant otherwise.
        seen: set[str] | None = set() if self.id_field else None
        for index, (origin, payload) in enumerate(payloads):
            task_id = self.task_id_for(index, origin, payload)
            if seen is not None:
                if task_id in seen:
                    raise TaskInputError(
                        f"{origin}: task_id {task_id!r} is taken by an earlier task: task ids must be "
                        f"unique; fix the payloads' {self.id_field!r} values, or leave id_field unset to "
                        "number the tasks"
                    )
                seen.add(task_id)
            yield PendingTask(task_id, payload, origin)

    def task_id_for(self, index: int, origin: str, payload: Any) -> str:
        if not self.id_field:
            return positional_task_id(index)
        if not isinstance(payload, dict) or self.id_field not in payload:
            raise TaskInputError(
                f"{origin}: the payload has no {self.id_field!r} field to take its task_id from (id_field): "
                "add it to every payload, or leave id_field unset to number the tasks"
            )
        value = payload[self.id_field]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TaskInputError(
                f"{origin}: task_id from its {self.id_field!r} field is a {type(value).__name__} "
                f"({value!r:.40}): use text or a whole number, of 1-200 characters of A-Za-z0-9_.:-"
            )
        task_id = str(value)
        if not TASK_ID_RE.match(task_id):
            raise TaskInputError(
                f"{origin}: task_id {task_id[:210]!r} (its {self.id_field!r} field) is invalid: use 1-200 "
                "characters of A-Za-z0-9_.:-"
            )
        return task_id

    def task_source(self) -> tuple[str, Iterable[Any]]:
        """(the field's name, for error messages; the payloads) of ``tasks`` or ``tasks_callable``."""
        if self.tasks is not None:
            return "tasks", self.tasks
        source = self.tasks_callable(**self.tasks_callable_kwargs)
        problem = iterable_problem("tasks_callable's result", source)
        if problem:
            raise TaskInputError(problem)
        return "tasks_callable()", source

    def payloads(self, hook: EC2ClusterHook) -> Iterator[tuple[str, Any]]:
        """(origin, payload) pairs from the configured source, streamed."""
        if self.s3_uri is not None:
            yield from jsonl_payloads(self.s3_uri, hook.iter_s3_lines(self.s3_uri))
            return
        yield from numbered(*self.task_source())


class EnqueueInputError(AirflowFailException):
    """The enqueue's input is wrong: the message names the field and the fix. Airflow does not retry it (the
    same input fails the same way); the user fixes the input and re-runs the task."""


def argument_problems(
    *,
    tasks: Any,
    tasks_callable: Any,
    tasks_callable_kwargs: Any,
    s3_uri: Any,
    id_field: Any,
    state_table: Any,
    visibility_timeout: Any,
    max_receive_count: Any,
    retention_seconds: Any,
    send_concurrency: Any,
    tasks_per_message: Any,
) -> list[str]:
    """Every problem of the operator's arguments (rendered), each naming the field and the fix; pure."""
    problems = [
        whole_number_problem(
            "visibility_timeout",
            visibility_timeout,
            0,
            MAX_VISIBILITY_SECONDS,
            "seconds a received message stays hidden (SQS: 0 to 12 h); the default is "
            f"{DEFAULT_VISIBILITY_TIMEOUT}",
        ),
        whole_number_problem(
            "max_receive_count",
            max_receive_count,
            1,
            MAX_RECEIVE_COUNT,
            "receives before a message goes to the dead-letter queue; the default is "
            f"{DEFAULT_MAX_RECEIVE_COUNT}",
        ),
        whole_number_problem(
            "retention_seconds",
            retention_seconds,
            MIN_RETENTION_SECONDS,
            MAX_RETENTION_SECONDS,
            "how long SQS keeps a message (1 minute to 14 days); the default is 4 days",
        ),
        whole_number_problem(
            "send_concurrency",
            send_concurrency,
            1,
            None,
            f"SendMessageBatch requests in flight; the default is {DEFAULT_SEND_CONCURRENCY}",
        ),
        tasks_per_message_problem(tasks_per_message),
    ]
    if not isinstance(state_table, str) or not TABLE_NAME_RE.match(state_table):
        problems.append(
            f"state_table: {state_table!r} is not a DynamoDB table name: use 3-255 letters, digits, '_', '-' "
            f"and '.' (the default is {DEFAULT_STATE_TABLE})"
        )
    if id_field is not None and (not isinstance(id_field, str) or not id_field):
        problems.append(
            f"id_field: {id_field!r} is not a field name: name the payload field that holds each task's id, "
            "or leave it unset to number the tasks"
        )
    if tasks is not None:
        problems.append(iterable_problem("tasks", tasks))
    if tasks_callable is not None:
        if not callable(tasks_callable):
            problems.append(
                f"tasks_callable: a {type(tasks_callable).__name__} is not callable: give a function that "
                "returns an iterable of payloads"
            )
        if not isinstance(tasks_callable_kwargs, dict):
            problems.append(
                f"tasks_callable_kwargs: a {type(tasks_callable_kwargs).__name__} is not a dict: give the "
                "keyword arguments of tasks_callable as a dict"
            )
    if s3_uri is not None:
        problems.append(s3_uri_problem(s3_uri))
    return [problem for problem in problems if problem]


def whole_number_problem(name: str, value: Any, low: int, high: int | None, meaning: str) -> str | None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f"from {low:,} to {high:,}" if high is not None else f"of at least {low:,}"
        return f"{name}: {value!r} is not a whole number {bounds}: it is the {meaning}"
    return None


def iterable_problem(name: str, value: Any) -> str | None:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        return (
            f"{name}: a {type(value).__name__} is not a list of payloads: give a list (or an iterable) of "
            "JSON values; a templated value renders as text unless the DAG sets "
            "render_template_as_native_obj=True"
        )
    return None


def numbered(name: str, source: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for index, payload in enumerate(source):
        yield f"{name}[{index}]", payload


def first_messages(messages: Iterator[OutgoingMessage]) -> list[OutgoingMessage]:
    """The first messages of a stream, read before anything is created: bad input there creates nothing.

    Bounded (PEEK_MESSAGES, PEEK_CHARACTERS), so memory stays constant whatever the stream's length.
    """
    head: list[OutgoingMessage] = []
    size = 0
    for message in messages:
        head.append(message)
        size += len(message.body)
        if len(head) >= PEEK_MESSAGES or size >= PEEK_CHARACTERS:
            break
    return head


def jsonl_payloads(uri: str, lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[str, Any]]:
    for line_number, line in lines:
        if not line.strip():
            continue
        origin = f"line {line_number} of s3_uri {uri}"
        try:
            yield origin, json.loads(line)
        except ValueError as error:
            raise TaskInputError(
                f"{origin}: not valid JSON ({error}): write one JSON value per line (blank lines are skipped)"
            ) from None


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
