"""Operators: enqueue the tasks, launch the cluster, tear it down. Every AWS call goes through the hook."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.providers.common.compat.sdk import AirflowException
from botocore.exceptions import BotoCoreError, ClientError

from airflow_ec2cluster.cluster import (
    DEFAULT_INSTANCE_PROFILE,
    DEFAULT_STATE_TABLE,
    META_DLQ_URL,
    META_ENQUEUE_COMPLETE,
    META_ENQUEUED,
    META_ENQUEUED_MESSAGES,
    META_INSTANCE_IDS,
    META_LAUNCH_SPEC,
    META_LAUNCHED_AT,
    META_LOG_SHARDS,
    META_NUM_WORKERS,
    META_QUEUE_URL,
    META_REGION,
    META_TASKS_PER_MESSAGE,
    META_TORN_DOWN_AT,
    ClusterDescriptor,
    LaunchSpec,
    cluster_id_from_context,
    dead_letter_queue_name,
    descriptor_from_meta,
    launch_client_token,
    task_queue_name,
)
from airflow_ec2cluster.decisions import LIVE_STATES
from airflow_ec2cluster.hooks.ec2cluster import (
    DEFAULT_SEND_CONCURRENCY,
    EC2ClusterHook,
    error_code,
)
from airflow_ec2cluster.links import CLUSTER_LINKS, persist_cluster_links, uses_custom_endpoint
from airflow_ec2cluster.packing import (
    DEFAULT_TASKS_PER_MESSAGE,
    OutgoingMessage,
    PendingTask,
    pack_tasks,
    tasks_per_message_problem,
)
from airflow_ec2cluster.userdata import TABLE as WORKER_FROM_TABLE
from airflow_ec2cluster.workerbundle import WorkerBundle, build_worker_bundle

if TYPE_CHECKING:
    from airflow.sdk import Context

TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
# Write the enqueue resume point to the META item at most this often (one UpdateItem each time).
CHECKPOINT_SECONDS = 2.0
# Root volume size when neither the operator nor the AMI gives one.
DEFAULT_ROOT_VOLUME_GB = 8


def as_bool(value: Any) -> bool:
    """A templated flag: rendered as text unless the DAG renders native objects."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def positional_task_id(index: int) -> str:
    return f"t{index:09d}"


class _ClusterOperatorMixin:
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
        """Console links for the UI (hidden on a custom endpoint); a link never fails the task."""
        if uses_custom_endpoint(hook):
            return
        try:
            queue_url = hook.get_queue_url(task_queue_name(cluster_id))
            persist_cluster_links(
                context, self, hook, cluster_id=cluster_id, queue_url=queue_url, state_table=state_table
            )
        except (ClientError, BotoCoreError) as error:
            self.log.warning("Console links not recorded: %s", error)  # type: ignore[attr-defined]


class EC2ClusterEnqueueOperator(_ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
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
        visibility_timeout: int = 120,
        max_receive_count: int = 3,
        retention_seconds: int = 4 * 24 * 3600,
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
        meta = hook.get_meta(self.state_table, cluster_id) or {}
        if meta.get(META_ENQUEUE_COMPLETE):
            self.log.info(
                "Cluster %s: all %s tasks were enqueued before; nothing to do",
                cluster_id,
                meta[META_ENQUEUED],
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
            set_values={
                META_QUEUE_URL: queue_url,
                META_DLQ_URL: dlq_url,
                META_ENQUEUED: resumed["enqueued"],
                META_ENQUEUED_MESSAGES: resumed["enqueued_messages"],
                META_TASKS_PER_MESSAGE: self.tasks_per_message,
                META_ENQUEUE_COMPLETE: False,
            },
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
            set_values={
                META_ENQUEUED: checkpoint.tasks,
                META_ENQUEUED_MESSAGES: checkpoint.messages,
                META_ENQUEUE_COMPLETE: True,
            },
        )
        self.log.info(
            "Cluster %s: %d tasks enqueued in %d messages on %s",
            cluster_id,
            checkpoint.tasks,
            checkpoint.messages,
            queue_url,
        )
        return {**result, **counts}

    def check_resumable(self, meta: dict[str, Any], resumed: dict[str, int]) -> None:
        recorded = meta.get(META_TASKS_PER_MESSAGE)
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


def enqueued_counts(meta: dict[str, Any]) -> dict[str, int]:
    """Tasks and messages a (possibly interrupted) enqueue recorded; one task per message before groups."""
    tasks = int(meta.get(META_ENQUEUED) or 0)
    messages = meta.get(META_ENQUEUED_MESSAGES)
    return {"enqueued": tasks, "enqueued_messages": tasks if messages is None else int(messages)}


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
                set_values={META_ENQUEUED: self.tasks, META_ENQUEUED_MESSAGES: self.messages},
            )
            self.recorded = (self.messages, self.tasks)
        self.recorded_at = time.monotonic()


class EC2ClusterLaunchOperator(_ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Launch the cluster's workers with one RunInstances call, after validating everything.

    Validation comes first and launches nothing when anything is wrong: the worker configuration (with the
    worker's own ``WorkerConfig.from_dict``), the user data size, the AMI, instance type, subnet, security
    groups and instance profile; one error lists every problem with its fix. The launch spec is recorded in
    the cluster's META item before launching and the instance ids right after, so the sensor can launch
    replacements and teardown finds everything by tag. A retry finds the cluster launched by its first try
    (META item, then the cluster tag) instead of launching a second one; RunInstances also carries a
    ClientToken derived from the cluster id. When anything fails after the launch, or the task is killed,
    the instances it started are terminated.

    ``worker_options`` holds any other worker configuration field (``output``, ``task_timeout_seconds``,
    ``idle_shutdown_seconds``...; see DESIGN.md). Returns the :class:`ClusterDescriptor` as a dict.
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields(
        "cluster_id",
        "num_workers",
        "min_workers",
        "image_id",
        "instance_type",
        "handler",
        "worker_options",
        "subnet_id",
        "security_group_ids",
        "instance_profile",
        "key_name",
        "queue_url",
        "state_table",
        "worker_source",
        "requirements",
        "tags",
        "spot",
        "spot_max_price",
        "associate_public_ip",
        "metadata_hop_limit",
        "volume_size_gb",
    )
    template_fields_renderers = {"handler": "json", "worker_options": "json"}
    operator_extra_links = CLUSTER_LINKS
    ui_color = "#ffcc80"

    def __init__(
        self,
        *,
        num_workers: int,
        min_workers: int | None = None,
        image_id: str,
        instance_type: str,
        handler: dict[str, Any],
        worker_options: dict[str, Any] | None = None,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        queue_url: str | None = None,
        subnet_id: str | None = None,
        security_group_ids: list[str] | None = None,
        instance_profile: str | None = DEFAULT_INSTANCE_PROFILE,
        key_name: str | None = None,
        spot: bool = False,
        spot_max_price: str | None = None,
        associate_public_ip: bool = False,
        metadata_hop_limit: int = 1,
        volume_size_gb: int | None = None,
        worker_source: str = WORKER_FROM_TABLE,
        requirements: list[str] | None = None,
        tags: dict[str, str] | None = None,
        terminate_on_failure: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_workers = num_workers
        self.min_workers = min_workers
        self.image_id = image_id
        self.instance_type = instance_type
        self.handler = handler
        self.worker_options = worker_options or {}
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.queue_url = queue_url
        self.subnet_id = subnet_id
        self.security_group_ids = security_group_ids or []
        self.instance_profile = instance_profile
        self.key_name = key_name
        self.spot = spot
        self.spot_max_price = spot_max_price
        self.associate_public_ip = associate_public_ip
        self.metadata_hop_limit = metadata_hop_limit
        self.volume_size_gb = volume_size_gb
        self.worker_source = worker_source
        self.requirements = requirements or []
        self.tags = tags or {}
        self.terminate_on_failure = terminate_on_failure
        self._launched_ids: list[str] = []

    def execute(self, context: Context) -> dict[str, Any]:
        cluster_id = self.resolve_cluster_id(context)
        hook = self.hook
        hook.ensure_state_table(self.state_table)
        self.persist_links(context, hook, cluster_id, self.state_table)
        existing = self.existing_cluster(hook, cluster_id)
        if existing is not None:
            return existing.to_dict()

        queue_url, dlq_url = self.resolve_queues(hook, cluster_id)
        config = self.worker_config(cluster_id, hook.region, queue_url)
        bundle = build_worker_bundle() if self.worker_source == WORKER_FROM_TABLE else None
        spec = self.validated_spec(hook, config, bundle)
        num_workers = int(self.num_workers)
        if bundle is not None:
            hook.put_worker_bundle(self.state_table, cluster_id, bundle.data, bundle.sha256)
        hook.update_meta(
            self.state_table,
            cluster_id,
            set_values={
                META_REGION: hook.region,
                META_QUEUE_URL: queue_url,
                META_DLQ_URL: dlq_url,
                META_NUM_WORKERS: num_workers,
                META_LOG_SHARDS: int(config.get("log_shards") or 16),
                META_LAUNCH_SPEC: json.dumps(spec.to_dict()),
            },
        )
        launched_at = time.time()
        self.log.info(
            "Cluster %s: launching %d x %s from %s",
            cluster_id,
            num_workers,
            spec.instance_type,
            spec.image_id,
        )
        instances = hook.run_instances(
            cluster_id=cluster_id,
            spec=spec,
            count=num_workers,
            min_count=int(self.min_workers) if self.min_workers else None,
            client_token=launch_client_token(cluster_id),
        )
        self._launched_ids = [i["InstanceId"] for i in instances]
        try:
            hook.update_meta(
                self.state_table,
                cluster_id,
                set_values={META_INSTANCE_IDS: self._launched_ids, META_LAUNCHED_AT: launched_at},
            )
            context["ti"].xcom_push(key="instance_ids", value=self._launched_ids)
            self.log.info("Cluster %s: launched %s", cluster_id, ", ".join(self._launched_ids))
            return ClusterDescriptor(
                cluster_id=cluster_id,
                region=hook.region,
                queue_url=queue_url,
                dlq_url=dlq_url,
                state_table=self.state_table,
                instance_ids=self._launched_ids,
                launch_time=launched_at,
                num_workers=num_workers,
                launch_spec=spec,
            ).to_dict()
        except BaseException:
            if self.terminate_on_failure:
                self.log.error(
                    "Cluster %s: failed after launching; terminating %s", cluster_id, self._launched_ids
                )
                hook.terminate_instances(self._launched_ids, wait=False)
            raise

    def on_kill(self) -> None:
        if self._launched_ids and self.terminate_on_failure:
            self.log.info("on_kill: terminating %s", ", ".join(self._launched_ids))
            self.hook.terminate_instances(self._launched_ids, wait=False)
        super().on_kill()

    def existing_cluster(self, hook: EC2ClusterHook, cluster_id: str) -> ClusterDescriptor | None:
        """The cluster an earlier try of this task launched, if any."""
        meta = hook.get_meta(self.state_table, cluster_id) or {}
        if meta.get(META_INSTANCE_IDS) and meta.get(META_LAUNCH_SPEC):
            self.log.info(
                "Cluster %s was launched before (%s); not launching again",
                cluster_id,
                meta[META_INSTANCE_IDS],
            )
            return descriptor_from_meta(meta, self.state_table)
        live = [i["InstanceId"] for i in hook.list_cluster_instances(cluster_id)]
        if not live:
            return None
        if not meta.get(META_LAUNCH_SPEC):
            raise AirflowException(
                f"instances {live} are tagged with cluster {cluster_id} but it has no launch record: "
                "tear the cluster down (EC2ClusterTeardownOperator) or use another cluster_id"
            )
        # The earlier try stopped between RunInstances and recording the ids: record them now.
        self.log.info(
            "Cluster %s: found instances %s from an earlier try; not launching again", cluster_id, live
        )
        meta = hook.update_meta(
            self.state_table,
            cluster_id,
            set_values={META_INSTANCE_IDS: live, META_LAUNCHED_AT: meta.get(META_LAUNCHED_AT) or time.time()},
        )
        return descriptor_from_meta(meta, self.state_table)

    def resolve_queues(self, hook: EC2ClusterHook, cluster_id: str) -> tuple[str, str]:
        queue_url = self.queue_url or hook.get_queue_url(task_queue_name(cluster_id))
        dlq_url = hook.get_queue_url(dead_letter_queue_name(cluster_id))
        if not queue_url or not dlq_url:
            raise AirflowException(
                f"cluster {cluster_id} has no task queue ({task_queue_name(cluster_id)}) or dead-letter "
                f"queue ({dead_letter_queue_name(cluster_id)}): run EC2ClusterEnqueueOperator with the same "
                "cluster_id first"
            )
        return queue_url, dlq_url

    def worker_config(self, cluster_id: str, region: str, queue_url: str) -> dict[str, Any]:
        return {
            **self.worker_options,
            "cluster_id": cluster_id,
            "region": region,
            "queue_url": queue_url,
            "state_table": self.state_table,
            "handler": self.handler,
        }

    def validated_spec(
        self, hook: EC2ClusterHook, config: dict[str, Any], bundle: WorkerBundle | None = None
    ) -> LaunchSpec:
        """The launch spec, or an AirflowException listing every problem (nothing is launched)."""
        from ec2cluster_worker.config import ConfigError, WorkerConfig

        from airflow_ec2cluster.userdata import CredentialsInUserData, UserDataTooLarge, render_user_data

        problems: list[str] = []
        try:
            num_workers = int(self.num_workers)
            if num_workers < 1:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"num_workers: {self.num_workers!r} is not a positive integer")
        problems.extend(min_workers_problems(self.min_workers, self.num_workers))
        problems.extend(queue_region_problems(config["queue_url"], hook.region))
        output_table = (config.get("output") or {}).get("table")
        if output_table and not hook.table_exists(output_table):
            problems.append(
                f"worker_options.output.table: DynamoDB table {output_table!r} not found in {hook.region}; "
                "create it (pk and sk string keys) or leave 'table' out to store results in the state table"
            )
        user_data = b""
        try:
            WorkerConfig.from_dict(config)
            user_data = render_user_data(
                config,
                worker_source=self.worker_source,
                requirements=self.requirements,
                bundle_sha256=bundle.sha256 if bundle else None,
            )
        except ConfigError as error:
            problems.append(f"worker configuration: {error}")
        except (UserDataTooLarge, CredentialsInUserData) as error:
            problems.append(f"user data: {error}")
        if not 1 <= int(self.metadata_hop_limit) <= 64:
            problems.append("metadata_hop_limit: use 1 (2 when containers on the instance need metadata)")
        image = hook.describe_image(self.image_id)
        if image is None:
            problems.append(
                f"image_id: AMI {self.image_id!r} not found in {hook.region}; check the id and region"
            )
        if not hook.instance_type_exists(self.instance_type):
            problems.append(
                f"instance_type: {self.instance_type!r} is not an EC2 instance type (e.g. 'c7g.large')"
            )
        if self.subnet_id and not hook.subnet_exists(self.subnet_id):
            problems.append(f"subnet_id: subnet {self.subnet_id!r} not found in {hook.region}")
        missing_groups = hook.missing_security_groups(list(self.security_group_ids))
        if missing_groups:
            problems.append(f"security_group_ids: {missing_groups} not found in {hook.region}")
        if self.instance_profile and not hook.instance_profile_exists(self.instance_profile):
            problems.append(
                f"instance_profile: IAM instance profile {self.instance_profile!r} not found; create it "
                "with a role that may use the queue and the state table, or pass an existing one"
            )
        if problems:
            raise AirflowException(
                "cannot launch the cluster, nothing was launched:\n  - " + "\n  - ".join(problems)
            )
        return LaunchSpec(
            image_id=self.image_id,
            instance_type=self.instance_type,
            user_data_b64=base64.b64encode(user_data).decode("ascii"),
            instance_profile=self.instance_profile,
            subnet_id=self.subnet_id,
            security_group_ids=list(self.security_group_ids),
            key_name=self.key_name,
            spot=as_bool(self.spot),
            spot_max_price=self.spot_max_price,
            associate_public_ip=as_bool(self.associate_public_ip),
            metadata_hop_limit=int(self.metadata_hop_limit),
            root_device_name=(image or {}).get("RootDeviceName"),
            volume_size_gb=root_volume_size(image, self.volume_size_gb),
            extra_tags=dict(self.tags),
        )


def _ignore_missing_table(error: ClientError) -> None:
    if error_code(error) != "ResourceNotFoundException":
        raise error


def root_volume_size(image: dict[str, Any] | None, requested: int | None) -> int | None:
    """The root volume size: as requested, else the AMI's own (RunInstances wants one to encrypt it)."""
    if requested:
        return int(requested)
    for mapping in (image or {}).get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == (image or {}).get("RootDeviceName"):
            size = mapping.get("Ebs", {}).get("VolumeSize")
            if size:
                return int(size)
    return DEFAULT_ROOT_VOLUME_GB if image and image.get("RootDeviceName") else None


class EC2ClusterTeardownOperator(_ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Terminate every instance tagged with the cluster id, in any live state, and wait until terminated.

    Finds instances by tag, not by what the launch task recorded, so it also catches instances of a launch
    that died before recording them and the sensor's replacements. ``delete_queues=True`` also deletes the
    task queue and the dead-letter queue (keep them to inspect or re-drive dead-lettered tasks). Meant to
    run as an Airflow teardown task: ``launch >> drain >> teardown.as_teardown(setups=launch)``.
    Returns ``{"cluster_id", "terminated": [ids], "queues_deleted": bool}``.
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
        waiter_delay: int = 5,
        waiter_max_attempts: int = 120,
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
        queues_deleted = False
        if self.delete_queues:
            for name in (task_queue_name(cluster_id), dead_letter_queue_name(cluster_id)):
                url = hook.get_queue_url(name)
                if url:
                    hook.delete_queue(url)
                    self.log.info("Deleted queue %s", url)
            queues_deleted = True
        self.record_teardown(hook, cluster_id, instance_ids)
        return {"cluster_id": cluster_id, "terminated": instance_ids, "queues_deleted": queues_deleted}

    def record_teardown(self, hook: EC2ClusterHook, cluster_id: str, instance_ids: list[str]) -> None:
        """Note the teardown in the META item when there is a state table (never fail the teardown on it)."""
        try:
            hook.update_meta(
                self.state_table,
                cluster_id,
                set_values={META_TORN_DOWN_AT: time.time(), "terminated_at_teardown": instance_ids},
            )
        except ClientError as error:
            _ignore_missing_table(error)


class EC2ClusterRedriveOperator(_ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Move the cluster's dead-lettered messages back to its task queue, for another run.

    Run it before launching (or re-running launch and drain) again: the next workers pick the messages up,
    run the tasks their task-log items do not show done, and overwrite those items with the new outcome.
    Moves with receive / SendMessageBatch / DeleteMessageBatch (checking ``Failed``), at most
    ``max_messages`` (default all). Returns ``{"cluster_id", "redriven": n, "task_ids": [...]}``: the
    messages moved and their (first) task ids.
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
        moved = hook.redrive_dead_letters(dlq_url, queue_url, limit=limit)
        self.log.info(
            "Cluster %s: %d dead-lettered message(s) moved back to %s", cluster_id, len(moved), queue_url
        )
        return {"cluster_id": cluster_id, "redriven": len(moved), "task_ids": moved}


def min_workers_problems(min_workers: Any, num_workers: Any) -> list[str]:
    """What is wrong with ``min_workers`` (RunInstances MinCount) given ``num_workers`` (MaxCount)."""
    if min_workers in (None, ""):
        return []
    try:
        minimum, maximum = int(min_workers), int(num_workers)
    except (TypeError, ValueError):
        return [f"min_workers: {min_workers!r} is not a positive integer"]
    if minimum < 1:
        return [f"min_workers: {minimum} is below 1; give at least 1, or leave it out for all-or-nothing"]
    if minimum > maximum:
        return [f"min_workers: {minimum} is more than num_workers ({maximum}); lower it or raise num_workers"]
    return []


SQS_HOST_REGION_RE = re.compile(
    r"^https?://(?:sqs\.([a-z0-9-]+)\.amazonaws\.com|([a-z0-9-]+)\.queue\.amazonaws\.com)/"
)


def queue_region_problems(queue_url: str, region: str) -> list[str]:
    """A queue in another region than the cluster's: workers there would poll the wrong endpoint."""
    match = SQS_HOST_REGION_RE.match(queue_url or "")
    queue_region = match and (match.group(1) or match.group(2))
    if queue_region and queue_region != region:
        return [
            f"queue_url: {queue_url!r} is in {queue_region}, the cluster in {region}; use a queue of "
            f"{region} (let EC2ClusterEnqueueOperator create it) or set region_name={queue_region!r}"
        ]
    return []
