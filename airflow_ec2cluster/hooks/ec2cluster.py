"""EC2ClusterHook: every AWS call the controller makes (SQS, EC2, DynamoDB, S3, IAM), from one connection.

The operators and the sensor stay thin: they decide what to do and call this hook; nothing else in the
package talks to boto3. Clients honour the Airflow connection's region, botocore config and per-service
``endpoint_url`` (``service_config``), and default to botocore's standard retry mode.

The methods are thin: the requests are built, and the answers parsed, by the pure functions of
:mod:`airflow_ec2cluster.aws` (one module per service) and :mod:`airflow_ec2cluster.meta` (the META item),
which :class:`~airflow_ec2cluster.hooks.async_io.AsyncClusterIO` uses too. The enqueue's batched,
concurrent send is :mod:`airflow_ec2cluster.hooks.sqs_send`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from botocore.config import Config
from botocore.exceptions import ClientError
from ec2cluster_worker import records

from airflow_ec2cluster.aws import chunks, error_code
from airflow_ec2cluster.aws.dynamodb import (
    CONDITION_FAILED,
    DYNAMODB_GET_BATCH,
    TABLE_IN_USE,
    TABLE_NOT_FOUND,
    batch_get_found,
    batch_get_request,
    count_projection,
    create_table_params,
    deserialize_item,
    query_params,
    ttl_params,
    unprocessed_keys,
)
from airflow_ec2cluster.aws.ec2 import (
    EC2_ID_BATCH,
    create_security_group_params,
    decode_console_output,
    instance_filters,
    instance_states_of,
    instances_of,
    terminated_waiter_params,
)
from airflow_ec2cluster.aws.fleet import (
    LaunchOutcome,
    create_launch_template_params,
    fleet_outcome,
    launch_template_filters,
    refused_outcome,
)
from airflow_ec2cluster.aws.logs import (
    ALREADY_EXISTS,
    NOT_FOUND,
    FailuresRead,
    LogCursor,
    create_log_group_params,
    failures_params,
    filter_params,
    read_more,
    retention_params,
)
from airflow_ec2cluster.aws.s3 import (
    BLOCK_PUBLIC_ACCESS,
    bundle_bucket_problem,
    create_bucket_params,
    head_object_params,
    head_object_problem,
    parse_s3_uri,
)
from airflow_ec2cluster.aws.sqs import (
    NONEXISTENT_QUEUE_CODES,
    SQS_BATCH_ENTRIES,
    Redriven,
    RedriveOutcome,
    counts_from_attributes,
    dead_letter_queue_params,
    delete_params,
    dlq_counts_params,
    queue_arn_of,
    queue_arn_params,
    queue_counts_params,
    redrive_plan,
    redrive_receive_params,
    resend_batches,
    resend_params,
    task_queue_params,
)
from airflow_ec2cluster.aws.sqs_peek import DeadLetterPeek
from airflow_ec2cluster.cluster import TAG_CLUSTER_ID, LaunchSpec, cluster_security_group_name
from airflow_ec2cluster.defaults import (
    DEFAULT_DEAD_LETTER_SAMPLE,
    DEFAULT_LOG_SHARDS,
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_QUEUE_RETENTION_SECONDS,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_SEND_CONCURRENCY,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WAITER_DELAY,
    DEFAULT_WAITER_MAX_ATTEMPTS,
)
from airflow_ec2cluster.drain.decisions import LIVE_STATES, QueueCounts
from airflow_ec2cluster.hooks.sqs_send import send_messages
from airflow_ec2cluster.meta import (
    ClusterMeta,
    MetaUpdate,
    PendingLaunch,
    claim_launch_params,
    finish_launch_params,
    get_meta_params,
    meta_key,
    meta_of,
    start_generation_params,
    update_meta_params,
)
from airflow_ec2cluster.packing import OutgoingMessage
from airflow_ec2cluster.preflight import NetworkFacts
from airflow_ec2cluster.pricing.spot import REFUSED_CODES as SPOT_PRICES_REFUSED_CODES
from airflow_ec2cluster.pricing.spot import spot_price_params, spot_prices_of, spot_prices_refused
from airflow_ec2cluster.tasklog import log_key_of, tally, task_results_of

DEFAULT_RETRY_CONFIG = {"mode": "standard", "max_attempts": 10}
# CreateQueue's answer within 60 s of deleting a queue of the same name (query and JSON protocol codes).
QUEUE_DELETED_RECENTLY_CODES = ("AWS.SimpleQueueService.QueueDeletedRecently", "QueueDeletedRecently")


class QueueNameNotFreeYet(RuntimeError):
    """SQS refuses a queue name for 60 s after a queue of that name was deleted; a later retry succeeds."""


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
    def logs(self):
        return self.client("logs")

    @property
    def region(self) -> str:
        return self.sqs.meta.region_name

    # -- DynamoDB state table -------------------------------------------------------------------------

    def ensure_state_table(self, table: str) -> None:
        """Create the shared state table when missing (on-demand, TTL on ``expires_at``) and wait for it."""
        try:
            status = self.dynamodb.describe_table(TableName=table)["Table"]["TableStatus"]
        except ClientError as error:
            if error_code(error) != TABLE_NOT_FOUND:
                raise
            self._create_state_table(table)
            return
        if status != "ACTIVE":
            self.dynamodb.get_waiter("table_exists").wait(TableName=table)

    def _create_state_table(self, table: str) -> None:
        self.log.info("Creating state table %s", table)
        try:
            self.dynamodb.create_table(**create_table_params(table))
        except ClientError as error:
            # Another task created it first: wait for theirs.
            if error_code(error) != TABLE_IN_USE:
                raise
        self.dynamodb.get_waiter("table_exists").wait(TableName=table)
        ttl = self.dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
        if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            self.dynamodb.update_time_to_live(**ttl_params(table))

    def get_meta(self, table: str, cluster_id: str) -> ClusterMeta | None:
        """The cluster's META item (strongly consistent read), or None."""
        return meta_of(self.dynamodb.get_item(**get_meta_params(table, cluster_id)).get("Item"))

    def find_meta(self, table: str, cluster_id: str) -> ClusterMeta | None:
        """:meth:`get_meta`, and None when the state table does not exist yet (nothing is created)."""
        try:
            return self.get_meta(table, cluster_id)
        except ClientError as error:
            if error_code(error) != TABLE_NOT_FOUND:
                raise
            return None

    def delete_meta(self, table: str, cluster_id: str) -> None:
        """Delete the cluster's META item (a failed enqueue's, so that its re-run starts from the start)."""
        self.dynamodb.delete_item(TableName=table, Key=meta_key(cluster_id))

    def update_meta(
        self,
        table: str,
        cluster_id: str,
        update: MetaUpdate,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
    ) -> ClusterMeta:
        """Apply ``update`` to the META item (created when missing); returns the item after."""
        response = self.dynamodb.update_item(
            **update_meta_params(table, cluster_id, update, retention_seconds)
        )
        return meta_of(response["Attributes"])

    def start_launch_generation(
        self, table: str, cluster_id: str, read_generation: int, update: MetaUpdate
    ) -> ClusterMeta | None:
        """Start a launch generation (``update`` names it); None when another launch try started one since
        this one read generation ``read_generation``."""
        try:
            response = self.dynamodb.update_item(
                **start_generation_params(table, cluster_id, read_generation, update)
            )
        except ClientError as error:
            if error_code(error) != CONDITION_FAILED:
                raise
            return None
        return meta_of(response["Attributes"])

    def _conditional_update(self, params: dict[str, Any]) -> bool:
        try:
            self.dynamodb.update_item(**params)
        except ClientError as error:
            if error_code(error) != CONDITION_FAILED:
                raise
            return False
        return True

    def claim_replacement_launch(self, table: str, cluster_id: str, pending: PendingLaunch) -> bool:
        """Record the intent to launch replacements ``pending``; False when another round came first."""
        return self._conditional_update(claim_launch_params(table, cluster_id, pending))

    def finish_replacement_launch(
        self,
        table: str,
        cluster_id: str,
        generation: int,
        instance_ids: list[str],
        update: MetaUpdate | None = None,
        refund: int = 0,
    ) -> bool:
        """Append the launched ids, record the launch's outcome and clear the intent; False when another
        round already finished it."""
        return self._conditional_update(
            finish_launch_params(table, cluster_id, generation, instance_ids, update, refund)
        )

    def _query(self, table: str, pk: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        pages = self.dynamodb.get_paginator("query").paginate(**query_params(table, pk, **kwargs))
        for page in pages:
            for item in page.get("Items", []):
                yield deserialize_item(item)

    def worker_statuses(self, table: str, cluster_id: str) -> list[dict[str, Any]]:
        """Every worker status item of the cluster: one Query (paginated by 1 MB)."""
        return list(self._query(table, records.workers_pk(cluster_id)))

    def iter_task_log(
        self, table: str, cluster_id: str, shards: int = DEFAULT_LOG_SHARDS
    ) -> Iterator[dict[str, Any]]:
        """Every task-log item of the cluster, shard by shard, as a stream."""
        for pk in records.all_log_pks(cluster_id, shards):
            yield from self._query(table, pk)

    def iter_results(
        self, table: str, cluster_id: str, shards: int = DEFAULT_LOG_SHARDS
    ) -> Iterator[dict[str, Any]]:
        """Per task: ``task_id``, ``status``, ``result`` (JSON-decoded) or ``output`` URI, ``error``."""
        for item in self.iter_task_log(table, cluster_id, shards):
            yield from task_results_of(item)

    def count_task_log(self, table: str, cluster_id: str, shards: int = DEFAULT_LOG_SHARDS) -> dict[str, int]:
        """Exact tasks and messages done / failed over the task log (one item per message: no duplicates)."""
        return tally(
            item
            for pk in records.all_log_pks(cluster_id, shards)
            for item in self._query(table, pk, **count_projection())
        )

    def task_log_items(
        self, table: str, cluster_id: str, task_ids: list[str], shards: int = DEFAULT_LOG_SHARDS
    ) -> dict[str, dict[str, Any]]:
        """Task-log items of ``task_ids`` by task id (BatchGetItem, 100 keys a call; missing ids absent)."""
        found: dict[str, dict[str, Any]] = {}
        for batch in chunks(sorted(set(task_ids)), DYNAMODB_GET_BATCH):
            request = batch_get_request(table, cluster_id, batch, shards)
            while request:
                response = self.dynamodb.batch_get_item(RequestItems=request)
                found.update(batch_get_found(response, table))
                request = unprocessed_keys(response)
        return found

    # -- CloudWatch Logs (the workers' lines) ------------------------------------------------------------

    def ensure_log_group(
        self, log_group: str, cluster_id: str, retention_days: int, tags: dict[str, str] | None = None
    ) -> None:
        """The cluster's log group, tagged with the cluster, with ``retention_days`` (made once; a retry or
        a re-run finds it and sets the retention again)."""
        try:
            self.logs.create_log_group(**create_log_group_params(log_group, cluster_id, tags or {}))
        except ClientError as error:
            if error_code(error) != ALREADY_EXISTS:
                raise
        self.logs.put_retention_policy(**retention_params(log_group, retention_days))

    def failed_task_events(self, log_group: str, cursor: LogCursor) -> FailuresRead:
        """Failed tasks' events from ``cursor`` on: FilterLogEvents, at most ``FILTER_PAGES`` calls. Never
        raises on an AWS error: the drain goes on without them, saying why."""
        events: list[dict[str, Any]] = []
        token, pages = None, 0
        try:
            while True:
                pages += 1
                page = self.logs.filter_log_events(**failures_params(log_group, cursor, token))
                token = read_more(events, page, cursor, pages)
                if token is None:
                    return FailuresRead(events)
        except ClientError as error:
            if error_code(error) == NOT_FOUND:  # no worker has written yet
                return FailuresRead(events)
            return FailuresRead(events, f"{error_code(error)}: {error}")

    def log_events(
        self,
        log_group: str,
        *,
        start_ms: int | None = None,
        pattern: str | None = None,
        streams: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every event of the group from ``start_ms`` (paginated FilterLogEvents), in time order."""
        paginator = self.logs.get_paginator("filter_log_events")
        params = filter_params(log_group, start_ms=start_ms, pattern=pattern, streams=streams)
        for page in paginator.paginate(**params):
            yield from page.get("events", [])

    # -- SQS ------------------------------------------------------------------------------------------

    def ensure_queues(
        self,
        cluster_id: str,
        *,
        visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT,
        max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
        retention_seconds: int = DEFAULT_QUEUE_RETENTION_SECONDS,
    ) -> tuple[str, str]:
        """Create (or find) the task queue and its dead-letter queue; returns (queue_url, dlq_url).

        Raises :class:`QueueNameNotFreeYet` within a minute of the queues' deletion (a failed enqueue
        deletes its own), with a message that says to retry.
        """
        dlq_url = self._create_queue(dead_letter_queue_params(cluster_id))
        dlq_arn = queue_arn_of(self.sqs.get_queue_attributes(**queue_arn_params(dlq_url)))
        queue_url = self._create_queue(
            task_queue_params(
                cluster_id,
                dlq_arn,
                visibility_timeout=visibility_timeout,
                max_receive_count=max_receive_count,
                retention_seconds=retention_seconds,
            )
        )
        return queue_url, dlq_url

    def _create_queue(self, params: dict[str, Any]) -> str:
        try:
            return self.sqs.create_queue(**params)["QueueUrl"]
        except ClientError as error:
            if error_code(error) not in QUEUE_DELETED_RECENTLY_CODES:
                raise
            raise QueueNameNotFreeYet(
                f"SQS does not take the queue name {params['QueueName']} yet: a queue of that name was "
                "deleted less than 60 seconds ago (a failed enqueue deletes its queues); retry in a minute"
            ) from error

    def get_queue_url(self, name: str) -> str | None:
        try:
            return self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except ClientError as error:
            if error_code(error) in NONEXISTENT_QUEUE_CODES:
                return None
            raise

    def delete_queue(self, queue_url: str) -> None:
        try:
            self.sqs.delete_queue(QueueUrl=queue_url)
        except ClientError as error:
            if error_code(error) not in NONEXISTENT_QUEUE_CODES:
                raise

    def queue_counts(self, queue_url: str, dlq_url: str) -> QueueCounts:
        """Approximate visible / in-flight / delayed counts of the queue and visible of the DLQ (2 calls)."""
        main = self.sqs.get_queue_attributes(**queue_counts_params(queue_url))
        dead = self.sqs.get_queue_attributes(**dlq_counts_params(dlq_url))
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
        reported, and the error is raised. See :mod:`airflow_ec2cluster.hooks.sqs_send`.
        """
        # The client is made here, not in the pool's threads.
        return send_messages(self.sqs, queue_url, messages, concurrency=concurrency, on_progress=on_progress)

    def peek_dead_letters(self, dlq_url: str, limit: int = DEFAULT_DEAD_LETTER_SAMPLE) -> list[str]:
        """Up to ``limit`` task-log keys (task ids; a group's first id) from the DLQ, without consuming them.

        Receives up to ``limit`` messages, 10 a call, hidden meanwhile so each call brings new ones, then
        makes them all visible again (:mod:`airflow_ec2cluster.aws.sqs_peek` says why).
        """
        peek = DeadLetterPeek(dlq_url, limit)
        try:
            while (params := peek.next_receive()) is not None:
                peek.add(self.sqs.receive_message(**params))
        finally:
            for params in peek.give_back():
                self.sqs.change_message_visibility_batch(**params)
        return peek.keys()

    def redrive_dead_letters(
        self,
        dlq_url: str,
        queue_url: str,
        limit: int | None = None,
        *,
        table: str,
        cluster_id: str,
        shards: int = DEFAULT_LOG_SHARDS,
    ) -> RedriveOutcome:
        """Move dead-lettered messages back to the task queue; returns what moved and its unfinished task ids.

        Per receive of 10: one BatchGetItem of their task-log items (which tasks are done) ->
        SendMessageBatch to the task queue, marking the messages with tasks logged done
        (:func:`~airflow_ec2cluster.aws.sqs.redrive_plan`: the worker then runs only the others) ->
        DeleteMessageBatch of exactly the entries that were sent, checking ``Failed`` of both: a message is
        deleted from the dead-letter queue only once it is on the task queue (at worst it is on both, and the
        task id keys every write). Stops after two empty long polls, or ``limit`` messages. Works on moto,
        which lacks StartMessageMoveTask; see :meth:`start_dead_letter_move` for the server-side move.
        """
        outcome = RedriveOutcome()
        empty_polls = 0
        while empty_polls < 2 and (limit is None or outcome.messages < limit):
            wanted = SQS_BATCH_ENTRIES if limit is None else min(SQS_BATCH_ENTRIES, limit - outcome.messages)
            messages = self.sqs.receive_message(**redrive_receive_params(dlq_url, wanted)).get("Messages", [])
            if not messages:
                empty_polls += 1
                continue
            empty_polls = 0
            items = self.task_log_items(table, cluster_id, [log_key_of(m) for m in messages], shards)
            for batch in resend_batches(redrive_plan(messages, items)):
                outcome.add(self._move_batch(dlq_url, queue_url, batch))
        return outcome

    def _move_batch(self, dlq_url: str, queue_url: str, batch: list[Redriven]) -> list[Redriven]:
        by_id = {redriven.entry_id: redriven for redriven in batch}
        sent = self.sqs.send_message_batch(**resend_params(queue_url, batch))
        if sent.get("Failed"):
            failures = ", ".join(
                f"{log_key_of(by_id[f['Id']].message)}: {f.get('Code')}" for f in sent["Failed"]
            )
            self.log.warning("Not moved (left in the dead-letter queue): %s", failures)
        ok = [by_id[s["Id"]] for s in sent.get("Successful", [])]
        if not ok:
            return []
        deleted = self.sqs.delete_message_batch(**delete_params(dlq_url, [r.message for r in ok]))
        if deleted.get("Failed"):
            self.log.warning(
                "%d moved message(s) could not be deleted from the dead-letter queue and will show up "
                "there again (their tasks may run twice): %s",
                len(deleted["Failed"]),
                deleted["Failed"],
            )
        return ok

    def start_dead_letter_move(self, dlq_url: str, queue_url: str) -> str:
        """Server-side move (SQS StartMessageMoveTask, AWS only); returns the task handle.

        SQS moves the messages as they are: it cannot mark them as :meth:`redrive_dead_letters` does, and a
        moved message is new to SQS (receive count 1), so the workers run every task of a moved group again,
        those already done included (at least once: their items are overwritten).
        """
        arns = [
            queue_arn_of(self.sqs.get_queue_attributes(**queue_arn_params(url)))
            for url in (dlq_url, queue_url)
        ]
        return self.sqs.start_message_move_task(SourceArn=arns[0], DestinationArn=arns[1])["TaskHandle"]

    # -- EC2 ------------------------------------------------------------------------------------------

    def create_fleet(self, params: dict[str, Any], requested: int, market: str) -> LaunchOutcome:
        """One CreateFleet (instant): what it started and each pool's error; a refused call is an outcome
        too (its error on every pool), so a launch never raises on capacity, quotas or permissions."""
        try:
            response = self.ec2.create_fleet(**params)
        except ClientError as error:
            return refused_outcome(error_code(error), str(error), requested, market)
        return fleet_outcome(response, requested, market)

    def ensure_launch_template(self, cluster_id: str, spec: LaunchSpec) -> str:
        """The cluster's launch template for ``spec`` (made once: a retry finds its first try's)."""
        params = create_launch_template_params(cluster_id, spec)
        try:
            answer = self.ec2.create_launch_template(**params)
        except ClientError as error:
            if "AlreadyExists" not in error_code(error):
                raise
            answer = self.ec2.describe_launch_templates(LaunchTemplateNames=[params["LaunchTemplateName"]])
            return answer["LaunchTemplates"][0]["LaunchTemplateId"]
        return answer["LaunchTemplate"]["LaunchTemplateId"]

    def delete_launch_templates(self, cluster_id: str) -> list[str]:
        """Delete the cluster's launch templates (found by tag); their names."""
        paginator = self.ec2.get_paginator("describe_launch_templates")
        templates = self._items(paginator, "LaunchTemplates", Filters=launch_template_filters(cluster_id))
        for template in templates:
            try:
                self.ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
            except ClientError as error:
                if "NotFound" not in error_code(error):
                    raise
        return sorted(t["LaunchTemplateName"] for t in templates)

    def _describe(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        paginator = self.ec2.get_paginator("describe_instances")
        return [instance for page in paginator.paginate(Filters=filters) for instance in instances_of(page)]

    def list_cluster_instances(
        self, cluster_id: str, states: Iterable[str] = LIVE_STATES
    ) -> list[dict[str, Any]]:
        """The cluster's instances (by tag) in ``states``: paginated DescribeInstances."""
        return self._describe(instance_filters(cluster_id, states))

    def instances_with_launch_token(self, cluster_id: str, token: str) -> list[str]:
        """Ids of the instances a replacement launch with ``token`` already started (any state)."""
        return [i["InstanceId"] for i in self._describe(instance_filters(cluster_id, None, token))]

    def terminate_instances(
        self,
        instance_ids: Iterable[str],
        *,
        wait: bool = True,
        waiter_delay: int = DEFAULT_WAITER_DELAY,
        waiter_max_attempts: int = DEFAULT_WAITER_MAX_ATTEMPTS,
    ) -> list[str]:
        ids = sorted(set(instance_ids))
        for batch in chunks(ids, EC2_ID_BATCH):
            self.ec2.terminate_instances(InstanceIds=batch)
        if wait and ids:
            waiter = self.ec2.get_waiter("instance_terminated")
            for batch in chunks(ids, EC2_ID_BATCH):
                waiter.wait(**terminated_waiter_params(batch, waiter_delay, waiter_max_attempts))
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

    def current_instance_types(self, architecture: str) -> list[dict[str, Any]]:
        """Every current-generation instance type for ``architecture`` (paginated DescribeInstanceTypes)."""
        paginator = self.ec2.get_paginator("describe_instance_types")
        filters = [
            {"Name": "processor-info.supported-architecture", "Values": [architecture]},
            {"Name": "current-generation", "Values": ["true"]},
        ]
        return self._items(paginator, "InstanceTypes", Filters=filters)

    def describe_instance_type(self, instance_type: str) -> dict[str, Any] | None:
        try:
            types = self.ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
        except ClientError as error:
            if error_code(error) == "InvalidInstanceType":
                return None
            raise
        return types[0] if types else None

    def missing_subnets(self, subnet_ids: list[str]) -> list[str]:
        """The ids that do not exist: one call when all do, else one per id (an error names only one)."""
        try:
            found = {s["SubnetId"] for s in self.ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"]}
            return [s for s in subnet_ids if s not in found]
        except ClientError as error:
            if error_code(error) not in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
                raise
        return [s for s in subnet_ids if not self.subnet_exists(s)]

    def subnet_exists(self, subnet_id: str) -> bool:
        try:
            return bool(self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"])
        except ClientError as error:
            if error_code(error) in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
                return False
            raise

    @staticmethod
    def _items(paginator: Any, key: str, **params: Any) -> list[dict[str, Any]]:
        return [item for page in paginator.paginate(**params) for item in page[key]]

    def default_subnet_ids(self) -> list[str]:
        """The default VPC's default subnets (one per availability zone), in zone order; [] without one."""
        subnets = self._items(
            self.ec2.get_paginator("describe_subnets"),
            "Subnets",
            Filters=[{"Name": "default-for-az", "Values": ["true"]}],
        )
        return [s["SubnetId"] for s in sorted(subnets, key=lambda s: s["AvailabilityZone"])]

    def network_facts(self, subnet_ids: list[str], group_ids: list[str]) -> NetworkFacts:
        """The VPC state the launch preflight reads: the subnets, their VPCs' route tables, gateways,
        endpoints and security groups (a handful of paginated Describe calls, whatever the job's size)."""
        subnets = self._items(
            self.ec2.get_paginator("describe_subnets"), "Subnets", SubnetIds=list(subnet_ids)
        )
        vpc_ids = sorted({s["VpcId"] for s in subnets})
        by_vpc = [{"Name": "vpc-id", "Values": vpc_ids}]
        groups = self._items(
            self.ec2.get_paginator("describe_security_groups"), "SecurityGroups", Filters=by_vpc
        )
        known = {g["GroupId"] for g in groups}
        others = [g for g in group_ids if g not in known]
        if others:  # groups of another VPC: described so that the preflight can name the mismatch
            groups += self._items(
                self.ec2.get_paginator("describe_security_groups"), "SecurityGroups", GroupIds=others
            )
        return NetworkFacts(
            region=self.region,
            subnets={s["SubnetId"]: s for s in subnets},
            vpcs={
                v["VpcId"]: v
                for v in self._items(self.ec2.get_paginator("describe_vpcs"), "Vpcs", VpcIds=vpc_ids)
            },
            route_tables=self._items(
                self.ec2.get_paginator("describe_route_tables"), "RouteTables", Filters=by_vpc
            ),
            internet_gateways=self._items(
                self.ec2.get_paginator("describe_internet_gateways"),
                "InternetGateways",
                Filters=[{"Name": "attachment.vpc-id", "Values": vpc_ids}],
            ),
            nat_gateways=self._items(
                self.ec2.get_paginator("describe_nat_gateways"), "NatGateways", Filter=by_vpc
            ),
            endpoints=self._items(
                self.ec2.get_paginator("describe_vpc_endpoints"), "VpcEndpoints", Filters=by_vpc
            ),
            security_groups={g["GroupId"]: g for g in groups},
        )

    def ensure_cluster_security_group(self, cluster_id: str, vpc_id: str) -> str:
        """The cluster's own security group in ``vpc_id`` (no inbound rules; EC2's default egress: all),
        created and tagged when missing; found by name when a retry already created it."""
        name = cluster_security_group_name(cluster_id)
        found = self._items(
            self.ec2.get_paginator("describe_security_groups"),
            "SecurityGroups",
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [name]}],
        )
        if found:
            return found[0]["GroupId"]
        return self.ec2.create_security_group(**create_security_group_params(cluster_id, vpc_id))["GroupId"]

    def cluster_security_groups(self, cluster_id: str) -> list[str]:
        """Ids of the security groups tagged with the cluster id (the ones the launch created)."""
        groups = self._items(
            self.ec2.get_paginator("describe_security_groups"),
            "SecurityGroups",
            Filters=[{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}],
        )
        return [g["GroupId"] for g in groups]

    def delete_security_group(self, group_id: str) -> None:
        try:
            self.ec2.delete_security_group(GroupId=group_id)
        except ClientError as error:
            if error_code(error) != "InvalidGroup.NotFound":
                raise

    def current_spot_prices(self, instance_types: list[str], now: float) -> dict[str, dict[str, Any]]:
        """ "type/zone" -> {"price", "at"}: the spot price now of ``instance_types`` in every zone
        (paginated DescribeSpotPriceHistory)."""
        paginator = self.ec2.get_paginator("describe_spot_price_history")
        try:
            entries = self._items(paginator, "SpotPriceHistory", **spot_price_params(instance_types, now))
        except ClientError as error:
            if error_code(error) not in SPOT_PRICES_REFUSED_CODES:
                raise
            return spot_prices_refused(error_code(error), str(error))
        return spot_prices_of(entries, now)

    def instance_states(self, instance_ids: list[str]) -> dict[str, str]:
        """Instance id -> state, for ``instance_ids`` (ids EC2 no longer knows are left out)."""
        return instance_states_of(self._describe_ids(instance_ids))

    def _describe_ids(self, instance_ids: list[str]) -> list[dict[str, Any]]:
        try:
            return [
                i
                for page in self.ec2.get_paginator("describe_instances").paginate(InstanceIds=instance_ids)
                for i in instances_of(page)
            ]
        except ClientError as error:
            if error_code(error) != "InvalidInstanceID.NotFound":
                raise
            return []

    def console_output(self, instance_id: str) -> str:
        """The instance's console (the last 64 KB EC2 keeps): why a boot failed, when nothing else says."""
        answer = self.ec2.get_console_output(InstanceId=instance_id, Latest=True)
        return decode_console_output(answer.get("Output"))

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
            if error_code(error) == TABLE_NOT_FOUND:
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

    def s3_object_problem(self, uri: str) -> str | None:
        """Why ``uri`` cannot be read (no such object, not allowed), from one HeadObject; None when it can."""
        try:
            self.s3.head_object(**head_object_params(uri))
        except ClientError as error:
            problem = head_object_problem(uri, error_code(error))
            if problem is None:
                raise
            return problem
        return None

    def iter_s3_lines(self, uri: str) -> Iterator[tuple[int, bytes]]:
        """(line number from 1, line) of an S3 object, streamed."""
        bucket, key = parse_s3_uri(uri)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield from enumerate(body.iter_lines(keepends=False), start=1)
        finally:
            body.close()

    # -- The cluster's bundle ---------------------------------------------------------------------------

    def account_id(self) -> str:
        """The connection's account (STS GetCallerIdentity, which needs no permission)."""
        return self.client("sts").get_caller_identity()["Account"]

    def bundle_bucket_problem(self, bucket: str) -> str | None:
        """Why the bundle bucket cannot be used (HeadBucket); None when it can, or is absent."""
        try:
            self.s3.head_bucket(Bucket=bucket)
        except ClientError as error:
            return bundle_bucket_problem(bucket, error_code(error))
        return None

    def ensure_bundle_bucket(self, bucket: str) -> bool:
        """The bucket, created when absent (private: public access blocked); True when it was created."""
        try:
            self.s3.head_bucket(Bucket=bucket)
            return False
        except ClientError as error:
            if bundle_bucket_problem(bucket, error_code(error)) is not None:
                raise
        try:
            self.s3.create_bucket(**create_bucket_params(bucket, self.region))
        except ClientError as error:
            if error_code(error) != "BucketAlreadyOwnedByYou":  # another launch made it a moment ago
                raise
        self.s3.get_waiter("bucket_exists").wait(Bucket=bucket)
        self.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=BLOCK_PUBLIC_ACCESS)
        return True

    def put_bundle(self, path: Path, bucket: str, key: str, sha256: str) -> None:
        """Upload the bundle (multipart when large: boto3's managed transfer)."""
        self.s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})

    def delete_objects_under(self, bucket: str, prefix: str) -> int:
        """Delete every object under ``prefix`` (a cluster holds one bundle per launch argument set, a few
        at most: one DeleteObject each, which is also what AWS authorises a batch delete by); the count."""
        deleted = 0
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    self.s3.delete_object(Bucket=bucket, Key=item["Key"])
                    deleted += 1
        except ClientError as error:
            if error_code(error) not in ("NoSuchBucket", "404"):
                raise
        return deleted
