"""EC2ClusterHook: every AWS call the controller makes (SQS, EC2, DynamoDB, S3, IAM), from one connection.

The operators and the sensor stay thin: they decide what to do and call this hook; nothing else in the
package talks to boto3. Clients honour the Airflow connection's region, botocore config and per-service
``endpoint_url`` (``service_config``), and default to botocore's standard retry mode.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from decimal import Decimal
from functools import cached_property
from typing import Any
from urllib.parse import urlparse

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.config import Config
from botocore.exceptions import ClientError
from ec2cluster_worker import records

from airflow_ec2cluster.cluster import (
    META_INSTANCE_IDS,
    META_REPLACEMENT_GENERATION,
    META_REPLACEMENTS,
    TAG_CLUSTER_ID,
    LaunchSpec,
    cluster_tags,
    dead_letter_queue_name,
    task_queue_name,
)
from airflow_ec2cluster.drain.decisions import LIVE_STATES, QueueCounts
from airflow_ec2cluster.packing import MAX_MESSAGE_BYTES, OutgoingMessage
from airflow_ec2cluster.tasklog import COUNT_ATTRIBUTES, log_key_of, tally, task_results_of

SQS_BATCH_ENTRIES = 10
# Concurrent SendMessageBatch calls: enough to hide latency, few enough to stay polite.
DEFAULT_SEND_CONCURRENCY = 4
# Resend entries SQS reported as failed on its side (not the sender's fault) at most this many times.
FAILED_ENTRY_RESENDS = 2
EC2_ID_BATCH = 500
DLQ_RETENTION_SECONDS = 14 * 24 * 3600
DEFAULT_RETRY_CONFIG = {"mode": "standard", "max_attempts": 10}
TERMINATED_WAITER_DELAY = 5
TERMINATED_WAITER_MAX_ATTEMPTS = 120

DYNAMODB_GET_BATCH = 100
REDRIVE_VISIBILITY_SECONDS = 60
QUEUE_COUNT_ATTRIBUTES = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
]
DLQ_COUNT_ATTRIBUTE = "ApproximateNumberOfMessages"
# META attribute: a replacement launch claimed but not yet recorded ({generation, count, token}).
META_PENDING_LAUNCH = "pending_launch"
# Tag on replacement instances: the launch's client token, so a re-run finds what a launch started.
TAG_LAUNCH_TOKEN = "ec2cluster:launch-token"

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


class MessageTooLarge(ValueError):
    """A task's message body is over SQS's per-message limit."""


class SendFailed(RuntimeError):
    """SQS refused some entries of a SendMessageBatch."""


def to_dynamo(value: Any) -> Any:
    """Python value -> value boto3's TypeSerializer accepts (floats become Decimals)."""
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, dict):
        return {key: to_dynamo(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_dynamo(item) for item in value]
    return value


def from_dynamo(value: Any) -> Any:
    """Decimals back to int/float, recursively."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {key: from_dynamo(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_dynamo(item) for item in value]
    return value


def serialize_item(item: dict[str, Any]) -> dict[str, Any]:
    return {key: _serializer.serialize(to_dynamo(value)) for key, value in item.items()}


def deserialize_item(item: dict[str, Any]) -> dict[str, Any]:
    return {key: from_dynamo(_deserializer.deserialize(value)) for key, value in item.items()}


def error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def message_batches(messages: Iterable[OutgoingMessage]) -> Iterator[list[OutgoingMessage]]:
    """Group messages into SendMessageBatch requests: at most 10 entries and 1 MiB per request."""
    batch: list[OutgoingMessage] = []
    batch_bytes = 0
    for message in messages:
        size = len(message.body.encode("utf-8"))
        if size > MAX_MESSAGE_BYTES:
            where = f" ({message.origin})" if message.origin else ""
            raise MessageTooLarge(
                f"task {message.task_id}{where} is {size:,} bytes as an SQS message; SQS accepts at most "
                f"{MAX_MESSAGE_BYTES:,} bytes: put large inputs in S3 and enqueue their keys instead"
            )
        if batch and (len(batch) == SQS_BATCH_ENTRIES or batch_bytes + size > MAX_MESSAGE_BYTES):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(message)
        batch_bytes += size
    if batch:
        yield batch


class SendProgress:
    """Messages (and the tasks in them) sent without a gap from the start, as batches finish in any order."""

    def __init__(self) -> None:
        self.contiguous = 0
        self.contiguous_tasks = 0
        self._ends: dict[int, tuple[int, int]] = {}
        self._next = 0

    def batch_done(self, index: int, end: int, end_tasks: int) -> bool:
        """Record batch ``index`` (ending at message ``end``, task ``end_tasks``); True if the count moved."""
        self._ends[index] = (end, end_tasks)
        moved = False
        while self._next in self._ends:
            self.contiguous, self.contiguous_tasks = self._ends.pop(self._next)
            self._next += 1
            moved = True
        return moved


class EC2ClusterHook(AwsBaseHook):
    """Interact with the AWS services behind an EC2 cluster: SQS, EC2, DynamoDB, S3 and IAM.

    ``.conn`` is the SQS client; ``sqs``, ``ec2``, ``dynamodb``, ``s3`` and ``iam`` are clients made from the
    same connection (one boto3 session). All take the usual ``aws_conn_id``, ``region_name``, ``verify`` and
    ``config`` arguments of :class:`~airflow.providers.amazon.aws.hooks.base_aws.AwsBaseHook`.
    """

    hook_name = "EC2 Cluster"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_type"] = "sqs"
        kwargs.pop("resource_type", None)
        super().__init__(*args, **kwargs)
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()

    # -- clients ---------------------------------------------------------------------------------------

    @cached_property
    def _session(self):
        return self.get_session(region_name=self.region_name)

    def client_config(self) -> Config:
        """Standard retries and a connection pool for concurrent batches; the connection's config wins."""
        defaults = Config(retries=DEFAULT_RETRY_CONFIG, max_pool_connections=4 * DEFAULT_SEND_CONCURRENCY)
        return self._get_config(defaults.merge(self.config))

    def client(self, service: str):
        """A boto3 client for ``service`` (cached; botocore clients are thread-safe, sessions are not)."""
        with self._clients_lock:
            if service not in self._clients:
                self._clients[service] = self._session.client(
                    service_name=service,
                    endpoint_url=self.conn_config.get_service_endpoint_url(service_name=service),
                    config=self.client_config(),
                    verify=self.verify,
                )
            return self._clients[service]

    def get_client_type(self, region_name=None, config=None, deferrable=False):
        if deferrable:
            return super().get_client_type(region_name=region_name, config=config, deferrable=True)
        return self.client("sqs")

    @property
    def sqs(self):
        return self.client("sqs")

    @property
    def ec2(self):
        return self.client("ec2")

    @property
    def dynamodb(self):
        return self.client("dynamodb")

    @property
    def s3(self):
        return self.client("s3")

    @property
    def iam(self):
        return self.client("iam")

    @property
    def region(self) -> str:
        return self.sqs.meta.region_name

    # -- DynamoDB state table -------------------------------------------------------------------------

    def ensure_state_table(self, table: str) -> None:
        """Create the shared state table when missing (on-demand, TTL on ``expires_at``) and wait for it."""
        try:
            status = self.dynamodb.describe_table(TableName=table)["Table"]["TableStatus"]
        except ClientError as error:
            if error_code(error) != "ResourceNotFoundException":
                raise
            self._create_state_table(table)
            return
        if status != "ACTIVE":
            self.dynamodb.get_waiter("table_exists").wait(TableName=table)

    def _create_state_table(self, table: str) -> None:
        self.log.info("Creating state table %s", table)
        try:
            self.dynamodb.create_table(
                TableName=table,
                **records.STATE_TABLE_SCHEMA,
            )
        except ClientError as error:
            # Another task created it first: wait for theirs.
            if error_code(error) != "ResourceInUseException":
                raise
        self.dynamodb.get_waiter("table_exists").wait(TableName=table)
        ttl = self.dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
        if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            self.dynamodb.update_time_to_live(
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": records.TTL_ATTRIBUTE},
            )

    def get_meta(self, table: str, cluster_id: str) -> dict[str, Any] | None:
        """The cluster's META item (strongly consistent read), or None."""
        item = self.dynamodb.get_item(**get_meta_params(table, cluster_id)).get("Item")
        return deserialize_item(item) if item else None

    def put_worker_bundle(self, table: str, cluster_id: str, data: bytes, sha256: str) -> None:
        """Store the worker's zip for the cluster's instances to fetch at boot (see workerbundle)."""
        from airflow_ec2cluster.workerbundle import BUNDLE_ATTRIBUTE, bundle_key

        key = {name: {"S": value} for name, value in bundle_key(cluster_id).items()}
        self.dynamodb.put_item(
            TableName=table,
            Item={
                **key,
                BUNDLE_ATTRIBUTE: {"B": data},
                "sha256": {"S": sha256},
                records.TTL_ATTRIBUTE: {"N": str(int(time.time()) + records.DEFAULT_RETENTION_SECONDS)},
            },
        )

    def update_meta(
        self,
        table: str,
        cluster_id: str,
        *,
        set_values: dict[str, Any] | None = None,
        add_values: dict[str, int] | None = None,
        retention_seconds: int = records.DEFAULT_RETENTION_SECONDS,
    ) -> dict[str, Any]:
        """SET and ADD attributes of the META item (created when missing); returns the item after."""
        response = self.dynamodb.update_item(
            **update_meta_params(table, cluster_id, set_values, add_values, retention_seconds)
        )
        return deserialize_item(response["Attributes"])

    def claim_replacement_launch(
        self, table: str, cluster_id: str, generation: int, count: int, token: str
    ) -> bool:
        """Record the intent to launch replacement ``generation``; False when another round came first."""
        try:
            self.dynamodb.update_item(**claim_launch_params(table, cluster_id, generation, count, token))
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def finish_replacement_launch(
        self, table: str, cluster_id: str, generation: int, instance_ids: list[str]
    ) -> bool:
        """Append the launched ids and clear the intent; False when another round already finished it."""
        try:
            self.dynamodb.update_item(**finish_launch_params(table, cluster_id, generation, instance_ids))
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def _query(self, table: str, pk: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        pages = self.dynamodb.get_paginator("query").paginate(**query_params(table, pk, **kwargs))
        for page in pages:
            for item in page.get("Items", []):
                yield deserialize_item(item)

    def worker_statuses(self, table: str, cluster_id: str) -> list[dict[str, Any]]:
        """Every worker status item of the cluster: one Query (paginated by 1 MB)."""
        return list(self._query(table, records.workers_pk(cluster_id)))

    def iter_task_log(
        self, table: str, cluster_id: str, shards: int = records.DEFAULT_LOG_SHARDS
    ) -> Iterator[dict[str, Any]]:
        """Every task-log item of the cluster, shard by shard, as a stream."""
        for pk in records.all_log_pks(cluster_id, shards):
            yield from self._query(table, pk)

    def iter_results(
        self, table: str, cluster_id: str, shards: int = records.DEFAULT_LOG_SHARDS
    ) -> Iterator[dict[str, Any]]:
        """Per task: ``task_id``, ``status``, ``result`` (JSON-decoded) or ``output`` URI, ``error``."""
        for item in self.iter_task_log(table, cluster_id, shards):
            yield from task_results_of(item)

    def count_task_log(
        self, table: str, cluster_id: str, shards: int = records.DEFAULT_LOG_SHARDS
    ) -> dict[str, int]:
        """Exact tasks and messages done / failed over the task log (one item per message: no duplicates)."""
        return tally(
            item
            for pk in records.all_log_pks(cluster_id, shards)
            for item in self._query(table, pk, **count_projection())
        )

    def task_log_items(
        self, table: str, cluster_id: str, task_ids: list[str], shards: int = records.DEFAULT_LOG_SHARDS
    ) -> dict[str, dict[str, Any]]:
        """Task-log items of ``task_ids`` by task id (BatchGetItem, 100 keys a call; missing ids absent)."""
        found: dict[str, dict[str, Any]] = {}
        for batch in chunks(sorted(set(task_ids)), DYNAMODB_GET_BATCH):
            request = batch_get_request(table, cluster_id, batch, shards)
            while request:
                response = self.dynamodb.batch_get_item(RequestItems=request)
                for item in response.get("Responses", {}).get(table, []):
                    item = deserialize_item(item)
                    found[item[records.SK]] = item
                request = response.get("UnprocessedKeys") or None
        return found

    # -- SQS ------------------------------------------------------------------------------------------

    def ensure_queues(
        self,
        cluster_id: str,
        *,
        visibility_timeout: int = 120,
        max_receive_count: int = 3,
        retention_seconds: int = 4 * 24 * 3600,
    ) -> tuple[str, str]:
        """Create (or find) the task queue and its dead-letter queue; returns (queue_url, dlq_url)."""
        tags = {TAG_CLUSTER_ID: cluster_id}
        dlq_url = self.sqs.create_queue(
            QueueName=dead_letter_queue_name(cluster_id),
            Attributes={
                "SqsManagedSseEnabled": "true",
                "MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS),
            },
            tags=tags,
        )["QueueUrl"]
        dlq_arn = self.sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
        queue_url = self.sqs.create_queue(
            QueueName=task_queue_name(cluster_id),
            Attributes={
                "SqsManagedSseEnabled": "true",
                "VisibilityTimeout": str(visibility_timeout),
                "MessageRetentionPeriod": str(retention_seconds),
                "RedrivePolicy": json.dumps(redrive),
            },
            tags=tags,
        )["QueueUrl"]
        return queue_url, dlq_url

    def get_queue_url(self, name: str) -> str | None:
        try:
            return self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except ClientError as error:
            if error_code(error) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                return None
            raise

    def delete_queue(self, queue_url: str) -> None:
        try:
            self.sqs.delete_queue(QueueUrl=queue_url)
        except ClientError as error:
            if error_code(error) not in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                raise

    def queue_counts(self, queue_url: str, dlq_url: str) -> QueueCounts:
        """Approximate visible / in-flight / delayed counts of the queue and visible of the DLQ (2 calls)."""
        main = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=QUEUE_COUNT_ATTRIBUTES)
        dead = self.sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=[DLQ_COUNT_ATTRIBUTE])
        return counts_from_attributes(main["Attributes"], dead["Attributes"])

    def send_messages(
        self,
        queue_url: str,
        messages: Iterable[OutgoingMessage],
        *,
        concurrency: int = DEFAULT_SEND_CONCURRENCY,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Send messages with SendMessageBatch, ``concurrency`` requests at a time; returns the count sent.

        ``on_progress(n, tasks)`` is called (in this thread) whenever the first ``n`` messages of ``messages``
        (holding ``tasks`` tasks) are all known to be sent, so a caller can record a resume point. When a
        message is refused, or the iterable raises, the requests already started finish, progress is
        reported, and the error is raised.
        """
        sqs = self.sqs  # create the client here, not in the pool's threads
        progress = SendProgress()
        pending: dict[Future, tuple[int, int, int]] = {}
        error: BaseException | None = None

        def collect(done: Iterable[Future]) -> None:
            nonlocal error
            moved = False
            for future in done:
                index, end, end_tasks = pending.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    moved = progress.batch_done(index, end, end_tasks) or moved
            if moved and on_progress is not None:
                on_progress(progress.contiguous, progress.contiguous_tasks)

        end = end_tasks = 0
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sqs-send") as pool:
            try:
                for index, batch in enumerate(message_batches(messages)):
                    if error is not None:
                        break
                    end += len(batch)
                    end_tasks += sum(message.task_count for message in batch)
                    pending[pool.submit(self._send_batch, sqs, queue_url, batch)] = (index, end, end_tasks)
                    if len(pending) >= 2 * concurrency:
                        collect(wait(pending, return_when=FIRST_COMPLETED).done)
            except BaseException as raised:
                error = raised
            collect(wait(pending).done)
        if error is not None:
            raise error
        return progress.contiguous

    @staticmethod
    def _send_batch(sqs, queue_url: str, batch: list[OutgoingMessage]) -> None:
        entries = {str(i): message for i, message in enumerate(batch)}
        for _ in range(1 + FAILED_ENTRY_RESENDS):
            response = sqs.send_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": key, "MessageBody": message.body} for key, message in entries.items()],
            )
            failed = response.get("Failed", [])
            if not failed:
                return
            sender_faults = [f for f in failed if f.get("SenderFault")]
            if sender_faults:
                raise SendFailed(describe_failures(sender_faults, entries))
            # SQS-side failures: resend just those entries (botocore already retried the call itself).
            entries = {f["Id"]: entries[f["Id"]] for f in failed}
        raise SendFailed(describe_failures(failed, entries))

    def peek_dead_letters(self, dlq_url: str, limit: int = 100) -> list[str]:
        """Up to ``limit`` task-log keys (task ids; a group's first id) from the DLQ, without consuming them.

        Receives with VisibilityTimeout=0 so the messages stay available; SQS samples servers on each short
        poll, so this is a bounded sample (at most ``limit // 10 + 2`` calls), not an exact listing.
        """
        seen: dict[str, str] = {}
        for _ in range(limit // SQS_BATCH_ENTRIES + 2):
            if len(seen) >= limit:
                break
            messages = self.sqs.receive_message(**peek_params(dlq_url)).get("Messages", [])
            new = [m for m in messages if m["MessageId"] not in seen]
            if not new:
                break
            for message in new:
                seen[message["MessageId"]] = log_key_of(message)
        return list(seen.values())[:limit]

    def redrive_dead_letters(self, dlq_url: str, queue_url: str, limit: int | None = None) -> list[str]:
        """Move dead-lettered messages back to the task queue; returns their task-log keys.

        Receive (10 at a time) -> SendMessageBatch to the task queue -> DeleteMessageBatch of exactly the
        entries that were sent, checking ``Failed`` of both: a message is deleted from the dead-letter queue
        only once it is on the task queue (at worst it is on both, and the task id keys every write). Stops
        after two empty long polls, or ``limit`` messages. Works on moto, which lacks StartMessageMoveTask;
        see :meth:`start_dead_letter_move` for the server-side move on AWS.
        """
        moved: list[str] = []
        empty_polls = 0
        while empty_polls < 2 and (limit is None or len(moved) < limit):
            wanted = SQS_BATCH_ENTRIES if limit is None else min(SQS_BATCH_ENTRIES, limit - len(moved))
            messages = self.sqs.receive_message(
                QueueUrl=dlq_url,
                MaxNumberOfMessages=wanted,
                VisibilityTimeout=REDRIVE_VISIBILITY_SECONDS,
                WaitTimeSeconds=1,
            ).get("Messages", [])
            if not messages:
                empty_polls += 1
                continue
            empty_polls = 0
            moved.extend(self._move_batch(dlq_url, queue_url, messages))
        return moved

    def _move_batch(self, dlq_url: str, queue_url: str, messages: list[dict[str, Any]]) -> list[str]:
        entries = {str(i): message for i, message in enumerate(messages)}
        sent = self.sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": key, "MessageBody": m["Body"]} for key, m in entries.items()],
        )
        if sent.get("Failed"):
            failures = ", ".join(f"{log_key_of(entries[f['Id']])}: {f.get('Code')}" for f in sent["Failed"])
            self.log.warning("Not moved (left in the dead-letter queue): %s", failures)
        ok = [entries[s["Id"]] for s in sent.get("Successful", [])]
        if not ok:
            return []
        deleted = self.sqs.delete_message_batch(
            QueueUrl=dlq_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(ok)],
        )
        if deleted.get("Failed"):
            self.log.warning(
                "%d moved message(s) could not be deleted from the dead-letter queue and will show up "
                "there again (their tasks may run twice): %s",
                len(deleted["Failed"]),
                deleted["Failed"],
            )
        return [log_key_of(m) for m in ok]

    def start_dead_letter_move(self, dlq_url: str, queue_url: str) -> str:
        """Server-side move (SQS StartMessageMoveTask, AWS only); returns the task handle."""
        arns = [
            self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            for url in (dlq_url, queue_url)
        ]
        return self.sqs.start_message_move_task(SourceArn=arns[0], DestinationArn=arns[1])["TaskHandle"]

    # -- EC2 ------------------------------------------------------------------------------------------

    def run_instances(
        self,
        *,
        cluster_id: str,
        spec: LaunchSpec,
        count: int,
        client_token: str,
        min_count: int | None = None,
    ) -> list[dict[str, Any]]:
        """One RunInstances call for up to ``count`` workers; EC2 fails it if fewer than ``min_count`` fit."""
        response = self.ec2.run_instances(
            **run_instances_params(
                cluster_id=cluster_id, spec=spec, count=count, client_token=client_token, min_count=min_count
            )
        )
        return response["Instances"]

    def list_cluster_instances(
        self, cluster_id: str, states: Iterable[str] = LIVE_STATES
    ) -> list[dict[str, Any]]:
        """The cluster's instances (by tag) in ``states``: paginated DescribeInstances."""
        paginator = self.ec2.get_paginator("describe_instances")
        filters = instance_filters(cluster_id, states)
        return [
            instance
            for page in paginator.paginate(Filters=filters)
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        ]

    def instances_with_launch_token(self, cluster_id: str, token: str) -> list[str]:
        """Ids of the instances a replacement launch with ``token`` already started (any state)."""
        paginator = self.ec2.get_paginator("describe_instances")
        return [
            instance["InstanceId"]
            for page in paginator.paginate(Filters=instance_filters(cluster_id, None, token))
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        ]

    def terminate_instances(
        self,
        instance_ids: Iterable[str],
        *,
        wait: bool = True,
        waiter_delay: int = TERMINATED_WAITER_DELAY,
        waiter_max_attempts: int = TERMINATED_WAITER_MAX_ATTEMPTS,
    ) -> list[str]:
        ids = sorted(set(instance_ids))
        for batch in chunks(ids, EC2_ID_BATCH):
            self.ec2.terminate_instances(InstanceIds=batch)
        if wait and ids:
            waiter = self.ec2.get_waiter("instance_terminated")
            for batch in chunks(ids, EC2_ID_BATCH):
                waiter.wait(
                    InstanceIds=batch,
                    WaiterConfig={"Delay": waiter_delay, "MaxAttempts": waiter_max_attempts},
                )
        return ids

    # -- validation -----------------------------------------------------------------------------------

    def describe_image(self, image_id: str) -> dict[str, Any] | None:
        try:
            images = self.ec2.describe_images(ImageIds=[image_id])["Images"]
        except ClientError as error:
            if error_code(error).startswith("InvalidAMIID"):
                return None
            raise
        return images[0] if images else None

    def instance_type_exists(self, instance_type: str) -> bool:
        try:
            return bool(self.ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"])
        except ClientError as error:
            if error_code(error) == "InvalidInstanceType":
                return False
            raise

    def subnet_exists(self, subnet_id: str) -> bool:
        try:
            return bool(self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"])
        except ClientError as error:
            if error_code(error) in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
                return False
            raise

    def missing_security_groups(self, group_ids: list[str]) -> list[str]:
        """The ids that do not exist, checked one by one (an error names only some of them)."""
        missing = []
        for group_id in group_ids:
            try:
                self.ec2.describe_security_groups(GroupIds=[group_id])
            except ClientError as error:
                if not error_code(error).startswith("InvalidGroup"):
                    raise
                missing.append(group_id)
        return missing

    def table_exists(self, table: str) -> bool:
        try:
            self.dynamodb.describe_table(TableName=table)
        except ClientError as error:
            if error_code(error) == "ResourceNotFoundException":
                return False
            raise
        return True

    def instance_profile_exists(self, name_or_arn: str) -> bool:
        name = name_or_arn.rsplit("/", 1)[-1] if name_or_arn.startswith("arn:") else name_or_arn
        try:
            self.iam.get_instance_profile(InstanceProfileName=name)
        except ClientError as error:
            if error_code(error) == "NoSuchEntity":
                return False
            raise
        return True

    # -- S3 -------------------------------------------------------------------------------------------

    def iter_s3_lines(self, uri: str) -> Iterator[tuple[int, bytes]]:
        """(line number from 1, line) of an S3 object, streamed."""
        bucket, key = parse_s3_uri(uri)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield from enumerate(body.iter_lines(keepends=False), start=1)
        finally:
            body.close()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.lstrip("/"):
        raise ValueError(f"{uri!r} is not an S3 object URI: write it as s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


def describe_failures(failed: list[dict[str, Any]], entries: dict[str, OutgoingMessage]) -> str:
    shown = [
        f"{entries[f['Id']].task_id}: {f.get('Code')} {f.get('Message', '')}".strip()
        for f in failed[:5]
        if f["Id"] in entries
    ]
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f"SQS refused {len(failed)} message(s): {'; '.join(shown)}{more}"


def run_instances_params(
    *, cluster_id: str, spec: LaunchSpec, count: int, client_token: str, min_count: int | None = None
) -> dict[str, Any]:
    """RunInstances arguments: IMDSv2 only, encrypted root volume, tags, terminate on shutdown."""
    tags = [{"Key": key, "Value": value} for key, value in cluster_tags(cluster_id, spec.extra_tags).items()]
    interface: dict[str, Any] = {
        "DeviceIndex": 0,
        "DeleteOnTermination": True,
        # Explicit, so that a subnet that auto-assigns public IPv4 addresses does not (they are billed).
        "AssociatePublicIpAddress": spec.associate_public_ip,
    }
    if spec.subnet_id:
        interface["SubnetId"] = spec.subnet_id
    if spec.security_group_ids:
        interface["Groups"] = list(spec.security_group_ids)
    params: dict[str, Any] = {
        "ImageId": spec.image_id,
        "InstanceType": spec.instance_type,
        "MinCount": min_count or count,
        "MaxCount": count,
        "ClientToken": client_token,
        "UserData": base64.b64decode(spec.user_data_b64),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpEndpoint": "enabled",
            "HttpPutResponseHopLimit": spec.metadata_hop_limit,
        },
        "NetworkInterfaces": [interface],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
    }
    if spec.instance_profile:
        key = "Arn" if spec.instance_profile.startswith("arn:") else "Name"
        params["IamInstanceProfile"] = {key: spec.instance_profile}
    if spec.key_name:
        params["KeyName"] = spec.key_name
    if spec.root_device_name:
        ebs: dict[str, Any] = {"Encrypted": True, "DeleteOnTermination": True, "VolumeType": "gp3"}
        if spec.volume_size_gb:
            ebs["VolumeSize"] = spec.volume_size_gb
        params["BlockDeviceMappings"] = [{"DeviceName": spec.root_device_name, "Ebs": ebs}]
    if spec.spot:
        spot_options: dict[str, Any] = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        if spec.spot_max_price:
            spot_options["MaxPrice"] = spec.spot_max_price
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot_options}
    return params


# -- request builders shared by the hook and AsyncClusterIO -----------------------------------------------


def meta_key(cluster_id: str) -> dict[str, Any]:
    return serialize_item({records.PK: records.cluster_pk(cluster_id), records.SK: records.META_SK})


def get_meta_params(table: str, cluster_id: str) -> dict[str, Any]:
    return {"TableName": table, "Key": meta_key(cluster_id), "ConsistentRead": True}


def update_meta_params(
    table: str,
    cluster_id: str,
    set_values: dict[str, Any] | None,
    add_values: dict[str, int] | None,
    retention_seconds: int = records.DEFAULT_RETENTION_SECONDS,
) -> dict[str, Any]:
    """UpdateItem arguments: SET ``set_values``, ADD ``add_values``, keep ``created_at``, refresh the TTL."""
    now = time.time()
    set_values = {
        "cluster_id": cluster_id,
        records.TTL_ATTRIBUTE: int(now + retention_seconds),
        **(set_values or {}),
    }
    names: dict[str, str] = {"#created": "created_at"}
    values: dict[str, Any] = {":created": now}
    set_parts, add_parts = [], []
    for index, (key, value) in enumerate(set_values.items()):
        names[f"#s{index}"] = key
        values[f":s{index}"] = value
        set_parts.append(f"#s{index} = :s{index}")
    set_parts.append("#created = if_not_exists(#created, :created)")
    for index, (key, value) in enumerate((add_values or {}).items()):
        names[f"#a{index}"] = key
        values[f":a{index}"] = value
        add_parts.append(f"#a{index} :a{index}")
    expression = "SET " + ", ".join(set_parts)
    if add_parts:
        expression += " ADD " + ", ".join(add_parts)
    return {
        "TableName": table,
        "Key": meta_key(cluster_id),
        "UpdateExpression": expression,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": serialize_item(values),
        "ReturnValues": "ALL_NEW",
    }


def claim_launch_params(
    table: str, cluster_id: str, generation: int, count: int, token: str
) -> dict[str, Any]:
    """One conditional UpdateItem: only the round that read generation ``generation``, with no launch
    pending, may record the intent; it counts the replacements against the budget at once."""
    return {
        "TableName": table,
        "Key": meta_key(cluster_id),
        "UpdateExpression": "SET #p = :p ADD #g :one, #r :n",
        "ConditionExpression": "attribute_not_exists(#p) AND (attribute_not_exists(#g) OR #g = :g)",
        "ExpressionAttributeNames": {
            "#p": META_PENDING_LAUNCH,
            "#g": META_REPLACEMENT_GENERATION,
            "#r": META_REPLACEMENTS,
        },
        "ExpressionAttributeValues": serialize_item(
            {
                ":p": {"generation": generation, "count": count, "token": token},
                ":one": 1,
                ":n": count,
                ":g": generation,
            }
        ),
    }


def finish_launch_params(
    table: str, cluster_id: str, generation: int, instance_ids: list[str]
) -> dict[str, Any]:
    return {
        "TableName": table,
        "Key": meta_key(cluster_id),
        "UpdateExpression": "SET #ids = list_append(if_not_exists(#ids, :empty), :ids) REMOVE #p",
        "ConditionExpression": "#p.#gen = :g",
        "ExpressionAttributeNames": {
            "#ids": META_INSTANCE_IDS,
            "#p": META_PENDING_LAUNCH,
            "#gen": "generation",
        },
        "ExpressionAttributeValues": serialize_item(
            {":empty": [], ":ids": list(instance_ids), ":g": generation}
        ),
    }


def count_projection() -> dict[str, Any]:
    return {
        "ProjectionExpression": ", ".join(COUNT_ATTRIBUTES),
        "ExpressionAttributeNames": COUNT_ATTRIBUTES,
    }


def query_params(table: str, pk: str, **extra: Any) -> dict[str, Any]:
    return {
        "TableName": table,
        "KeyConditionExpression": "#pk = :pk",
        "ExpressionAttributeNames": {"#pk": records.PK, **extra.pop("ExpressionAttributeNames", {})},
        "ExpressionAttributeValues": serialize_item({":pk": pk}),
        **extra,
    }


def batch_get_request(table: str, cluster_id: str, task_ids: list[str], shards: int) -> dict[str, Any]:
    keys = [serialize_item(records.task_log_key(cluster_id, task_id, shards)) for task_id in task_ids]
    return {
        table: {
            "Keys": keys,
            # tasks: a group's per-task entries, so a dead-lettered group's unfinished tasks can be listed.
            "ProjectionExpression": "#sk, task_id, #st, #err, finished_at, attempt, #t",
            "ExpressionAttributeNames": {"#sk": records.SK, "#st": "status", "#err": "error", "#t": "tasks"},
        }
    }


def counts_from_attributes(main: dict[str, str], dead: dict[str, str]) -> QueueCounts:
    return QueueCounts(
        visible=int(main.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(main.get("ApproximateNumberOfMessagesNotVisible", 0)),
        delayed=int(main.get("ApproximateNumberOfMessagesDelayed", 0)),
        dead_lettered=int(dead.get(DLQ_COUNT_ATTRIBUTE, 0)),
    )


def peek_params(dlq_url: str) -> dict[str, Any]:
    return {
        "QueueUrl": dlq_url,
        "MaxNumberOfMessages": SQS_BATCH_ENTRIES,
        "VisibilityTimeout": 0,
        "WaitTimeSeconds": 0,
    }


def instance_filters(
    cluster_id: str, states: Iterable[str] | None = LIVE_STATES, token: str | None = None
) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}]
    if states is not None:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    if token is not None:
        filters.append({"Name": f"tag:{TAG_LAUNCH_TOKEN}", "Values": [token]})
    return filters


# -- the same calls with aiobotocore, for the triggerer ----------------------------------------------------

ASYNC_SERVICES = ("sqs", "ec2", "dynamodb")


class AsyncClusterIO:
    """The drain round's calls with aiobotocore clients, method for method like :class:`EC2ClusterHook`.

    Made from a hook, so the clients use the same connection, region, endpoint and botocore config; open it
    with ``async with AsyncClusterIO.open(hook) as io``. Nothing here blocks the event loop: the connection
    look-up runs in a thread (as the provider's ``get_async_conn`` does) and every call is awaited.
    """

    def __init__(self, clients: dict[str, Any]) -> None:
        self.sqs = clients["sqs"]
        self.ec2 = clients["ec2"]
        self.dynamodb = clients["dynamodb"]

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, hook: EC2ClusterHook):
        from asgiref.sync import sync_to_async

        session, client_kwargs = await sync_to_async(async_client_kwargs)(hook)
        async with contextlib.AsyncExitStack() as stack:
            clients = {
                service: await stack.enter_async_context(session.create_client(**client_kwargs[service]))
                for service in ASYNC_SERVICES
            }
            yield cls(clients)

    async def get_meta(self, table: str, cluster_id: str) -> dict[str, Any] | None:
        item = (await self.dynamodb.get_item(**get_meta_params(table, cluster_id))).get("Item")
        return deserialize_item(item) if item else None

    async def update_meta(
        self,
        table: str,
        cluster_id: str,
        *,
        set_values: dict[str, Any] | None = None,
        add_values: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        response = await self.dynamodb.update_item(
            **update_meta_params(table, cluster_id, set_values, add_values)
        )
        return deserialize_item(response["Attributes"])

    async def _conditional_update(self, params: dict[str, Any]) -> bool:
        try:
            await self.dynamodb.update_item(**params)
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    async def claim_replacement_launch(
        self, table: str, cluster_id: str, generation: int, count: int, token: str
    ) -> bool:
        return await self._conditional_update(
            claim_launch_params(table, cluster_id, generation, count, token)
        )

    async def finish_replacement_launch(
        self, table: str, cluster_id: str, generation: int, instance_ids: list[str]
    ) -> bool:
        return await self._conditional_update(
            finish_launch_params(table, cluster_id, generation, instance_ids)
        )

    async def _query(self, table: str, pk: str, **extra: Any) -> list[dict[str, Any]]:
        items = []
        async for page in self.dynamodb.get_paginator("query").paginate(**query_params(table, pk, **extra)):
            items.extend(deserialize_item(item) for item in page.get("Items", []))
        return items

    async def worker_statuses(self, table: str, cluster_id: str) -> list[dict[str, Any]]:
        return await self._query(table, records.workers_pk(cluster_id))

    async def count_task_log(
        self, table: str, cluster_id: str, shards: int = records.DEFAULT_LOG_SHARDS
    ) -> dict[str, int]:
        items: list[dict[str, Any]] = []
        for pk in records.all_log_pks(cluster_id, shards):
            items.extend(await self._query(table, pk, **count_projection()))
        return tally(items)

    async def task_log_items(
        self, table: str, cluster_id: str, task_ids: list[str], shards: int = records.DEFAULT_LOG_SHARDS
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for batch in chunks(sorted(set(task_ids)), DYNAMODB_GET_BATCH):
            request = batch_get_request(table, cluster_id, batch, shards)
            while request:
                response = await self.dynamodb.batch_get_item(RequestItems=request)
                for item in response.get("Responses", {}).get(table, []):
                    item = deserialize_item(item)
                    found[item[records.SK]] = item
                request = response.get("UnprocessedKeys") or None
        return found

    async def queue_counts(self, queue_url: str, dlq_url: str) -> QueueCounts:
        main = await self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=QUEUE_COUNT_ATTRIBUTES)
        dead = await self.sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=[DLQ_COUNT_ATTRIBUTE])
        return counts_from_attributes(main["Attributes"], dead["Attributes"])

    async def peek_dead_letters(self, dlq_url: str, limit: int = 100) -> list[str]:
        seen: dict[str, str] = {}
        for _ in range(limit // SQS_BATCH_ENTRIES + 2):
            if len(seen) >= limit:
                break
            messages = (await self.sqs.receive_message(**peek_params(dlq_url))).get("Messages", [])
            new = [m for m in messages if m["MessageId"] not in seen]
            if not new:
                break
            for message in new:
                seen[message["MessageId"]] = log_key_of(message)
        return list(seen.values())[:limit]

    async def _describe(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        instances = []
        async for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                instances.extend(reservation["Instances"])
        return instances

    async def list_cluster_instances(
        self, cluster_id: str, states: Iterable[str] = LIVE_STATES
    ) -> list[dict[str, Any]]:
        return await self._describe(instance_filters(cluster_id, states))

    async def instances_with_launch_token(self, cluster_id: str, token: str) -> list[str]:
        return [i["InstanceId"] for i in await self._describe(instance_filters(cluster_id, None, token))]

    async def run_instances(
        self, *, cluster_id: str, spec: LaunchSpec, count: int, client_token: str
    ) -> list[dict[str, Any]]:
        params = run_instances_params(
            cluster_id=cluster_id, spec=spec, count=count, client_token=client_token
        )
        return (await self.ec2.run_instances(**params))["Instances"]

    async def terminate_instances(self, instance_ids: Iterable[str], *, wait: bool = False) -> list[str]:
        # The drain round never waits for termination: teardown does, in the sync hook.
        ids = sorted(set(instance_ids))
        for batch in chunks(ids, EC2_ID_BATCH):
            await self.ec2.terminate_instances(InstanceIds=batch)
        return ids


def async_client_kwargs(hook: EC2ClusterHook) -> tuple[Any, dict[str, dict[str, Any]]]:
    """An aiobotocore session from the hook's connection, and create_client arguments per service.

    Blocking (connection look-up, credentials): call it in a thread from async code.
    """
    session = hook.get_session(region_name=hook.region_name, deferrable=True)
    kwargs = {
        service: {
            "service_name": service,
            "region_name": hook.region_name,
            "endpoint_url": hook.conn_config.get_service_endpoint_url(service_name=service),
            "config": hook.client_config(),
            "verify": hook.verify,
        }
        for service in ASYNC_SERVICES
    }
    return session, kwargs
