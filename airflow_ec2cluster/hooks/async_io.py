"""AsyncClusterIO: the drain round's AWS calls on aiobotocore, for the triggerer.

Method for method like :class:`~airflow_ec2cluster.hooks.ec2cluster.EC2ClusterHook` (the round calls the
same names on either), and built with the same request builders (:mod:`airflow_ec2cluster.aws`,
:mod:`airflow_ec2cluster.meta`), so the trigger sends exactly the sensor's requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from ec2cluster_worker import records

from airflow_ec2cluster.aws import chunks, error_code
from airflow_ec2cluster.aws.dynamodb import (
    CONDITION_FAILED,
    DYNAMODB_GET_BATCH,
    batch_get_found,
    batch_get_request,
    count_projection,
    deserialize_item,
    query_params,
    unprocessed_keys,
)
from airflow_ec2cluster.aws.ec2 import (
    EC2_ID_BATCH,
    decode_console_output,
    instance_filters,
    instance_states_of,
    instances_of,
)
from airflow_ec2cluster.aws.fleet import (
    LaunchOutcome,
    create_launch_template_params,
    fleet_outcome,
    refused_outcome,
)
from airflow_ec2cluster.aws.logs import NOT_FOUND, FailuresRead, LogCursor, failures_params, read_more
from airflow_ec2cluster.aws.sqs import (
    counts_from_attributes,
    dlq_counts_params,
    queue_counts_params,
)
from airflow_ec2cluster.aws.sqs_peek import DeadLetterPeek
from airflow_ec2cluster.cluster import LaunchSpec
from airflow_ec2cluster.defaults import DEFAULT_DEAD_LETTER_SAMPLE, DEFAULT_LOG_SHARDS
from airflow_ec2cluster.drain.decisions import LIVE_STATES, QueueCounts
from airflow_ec2cluster.meta import (
    ClusterMeta,
    MetaUpdate,
    PendingLaunch,
    claim_launch_params,
    finish_launch_params,
    get_meta_params,
    meta_of,
    update_meta_params,
)
from airflow_ec2cluster.pricing.spot import REFUSED_CODES as SPOT_PRICES_REFUSED_CODES
from airflow_ec2cluster.pricing.spot import spot_price_params, spot_prices_of, spot_prices_refused
from airflow_ec2cluster.tasklog import tally

if TYPE_CHECKING:
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

ASYNC_SERVICES = ("sqs", "ec2", "dynamodb", "logs")


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
        self.logs = clients["logs"]

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

    # -- the META item --------------------------------------------------------------------------------

    async def get_meta(self, table: str, cluster_id: str) -> ClusterMeta | None:
        return meta_of((await self.dynamodb.get_item(**get_meta_params(table, cluster_id))).get("Item"))

    async def update_meta(self, table: str, cluster_id: str, update: MetaUpdate) -> ClusterMeta:
        response = await self.dynamodb.update_item(**update_meta_params(table, cluster_id, update))
        return meta_of(response["Attributes"])

    async def _conditional_update(self, params: dict[str, Any]) -> bool:
        try:
            await self.dynamodb.update_item(**params)
        except ClientError as error:
            if error_code(error) != CONDITION_FAILED:
                raise
            return False
        return True

    async def claim_replacement_launch(self, table: str, cluster_id: str, pending: PendingLaunch) -> bool:
        return await self._conditional_update(claim_launch_params(table, cluster_id, pending))

    async def finish_replacement_launch(
        self,
        table: str,
        cluster_id: str,
        generation: int,
        instance_ids: list[str],
        update: MetaUpdate | None = None,
        refund: int = 0,
    ) -> bool:
        return await self._conditional_update(
            finish_launch_params(table, cluster_id, generation, instance_ids, update, refund)
        )

    # -- worker status items and the task log ---------------------------------------------------------

    async def _query(self, table: str, pk: str, **extra: Any) -> list[dict[str, Any]]:
        items = []
        async for page in self.dynamodb.get_paginator("query").paginate(**query_params(table, pk, **extra)):
            items.extend(deserialize_item(item) for item in page.get("Items", []))
        return items

    async def worker_statuses(self, table: str, cluster_id: str) -> list[dict[str, Any]]:
        return await self._query(table, records.workers_pk(cluster_id))

    async def count_task_log(
        self, table: str, cluster_id: str, shards: int = DEFAULT_LOG_SHARDS
    ) -> dict[str, int]:
        items: list[dict[str, Any]] = []
        for pk in records.all_log_pks(cluster_id, shards):
            items.extend(await self._query(table, pk, **count_projection()))
        return tally(items)

    async def task_log_items(
        self, table: str, cluster_id: str, task_ids: list[str], shards: int = DEFAULT_LOG_SHARDS
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for batch in chunks(sorted(set(task_ids)), DYNAMODB_GET_BATCH):
            request = batch_get_request(table, cluster_id, batch, shards)
            while request:
                response = await self.dynamodb.batch_get_item(RequestItems=request)
                found.update(batch_get_found(response, table))
                request = unprocessed_keys(response)
        return found

    # -- SQS ------------------------------------------------------------------------------------------

    async def queue_counts(self, queue_url: str, dlq_url: str) -> QueueCounts:
        main = await self.sqs.get_queue_attributes(**queue_counts_params(queue_url))
        dead = await self.sqs.get_queue_attributes(**dlq_counts_params(dlq_url))
        return counts_from_attributes(main["Attributes"], dead["Attributes"])

    async def peek_dead_letters(self, dlq_url: str, limit: int = DEFAULT_DEAD_LETTER_SAMPLE) -> list[str]:
        peek = DeadLetterPeek(dlq_url, limit)
        try:
            while (params := peek.next_receive()) is not None:
                peek.add(await self.sqs.receive_message(**params))
        finally:
            for params in peek.give_back():
                await self.sqs.change_message_visibility_batch(**params)
        return peek.keys()

    # -- EC2 ------------------------------------------------------------------------------------------

    async def _describe(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        instances = []
        async for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            instances.extend(instances_of(page))
        return instances

    async def list_cluster_instances(
        self, cluster_id: str, states: Iterable[str] = LIVE_STATES
    ) -> list[dict[str, Any]]:
        return await self._describe(instance_filters(cluster_id, states))

    async def instances_with_launch_token(self, cluster_id: str, token: str) -> list[str]:
        return [i["InstanceId"] for i in await self._describe(instance_filters(cluster_id, None, token))]

    async def instance_states(self, instance_ids: list[str]) -> dict[str, str]:
        instances = []
        try:
            paginator = self.ec2.get_paginator("describe_instances")
            async for page in paginator.paginate(InstanceIds=instance_ids):
                instances.extend(instances_of(page))
        except ClientError as error:
            if error_code(error) != "InvalidInstanceID.NotFound":
                raise
            return {}
        return instance_states_of(instances)

    async def current_spot_prices(self, instance_types: list[str], now: float) -> dict[str, dict[str, Any]]:
        entries = []
        paginator = self.ec2.get_paginator("describe_spot_price_history")
        try:
            async for page in paginator.paginate(**spot_price_params(instance_types, now)):
                entries.extend(page.get("SpotPriceHistory", []))
        except ClientError as error:
            if error_code(error) not in SPOT_PRICES_REFUSED_CODES:
                raise
            return spot_prices_refused(error_code(error), str(error))
        return spot_prices_of(entries, now)

    async def console_output(self, instance_id: str) -> str:
        answer = await self.ec2.get_console_output(InstanceId=instance_id, Latest=True)
        return decode_console_output(answer.get("Output"))

    async def ensure_launch_template(self, cluster_id: str, spec: LaunchSpec) -> str:
        params = create_launch_template_params(cluster_id, spec)
        try:
            answer = await self.ec2.create_launch_template(**params)
        except ClientError as error:
            if "AlreadyExists" not in error_code(error):
                raise
            answer = await self.ec2.describe_launch_templates(
                LaunchTemplateNames=[params["LaunchTemplateName"]]
            )
            return answer["LaunchTemplates"][0]["LaunchTemplateId"]
        return answer["LaunchTemplate"]["LaunchTemplateId"]

    async def create_fleet(self, params: dict[str, Any], requested: int, market: str) -> LaunchOutcome:
        try:
            response = await self.ec2.create_fleet(**params)
        except ClientError as error:
            return refused_outcome(error_code(error), str(error), requested, market)
        return fleet_outcome(response, requested, market)

    async def failed_task_events(self, log_group: str, cursor: LogCursor) -> FailuresRead:
        events: list[dict[str, Any]] = []
        token, pages = None, 0
        try:
            while True:
                pages += 1
                page = await self.logs.filter_log_events(**failures_params(log_group, cursor, token))
                token = read_more(events, page, cursor, pages)
                if token is None:
                    return FailuresRead(events)
        except ClientError as error:
            if error_code(error) == NOT_FOUND:
                return FailuresRead(events)
            return FailuresRead(events, f"{error_code(error)}: {error}")

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
