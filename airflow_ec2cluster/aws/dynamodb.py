"""DynamoDB: the state table, its queries, the task log's batch reads, and Python <-> DynamoDB values.

The META item's requests are in :mod:`airflow_ec2cluster.meta`; key layouts are the worker's
(:mod:`ec2cluster_worker.records`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from ec2cluster_worker import records

from airflow_ec2cluster.tasklog import COUNT_ATTRIBUTES

# BatchGetItem takes at most 100 keys a call.
DYNAMODB_GET_BATCH = 100

TABLE_NOT_FOUND = "ResourceNotFoundException"
TABLE_IN_USE = "ResourceInUseException"
CONDITION_FAILED = "ConditionalCheckFailedException"

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


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


# -- the state table ---------------------------------------------------------------------------------------


def create_table_params(table: str) -> dict[str, Any]:
    """CreateTable arguments of a state table: string keys, on-demand billing."""
    return {"TableName": table, **records.STATE_TABLE_SCHEMA}


def ttl_params(table: str) -> dict[str, Any]:
    """UpdateTimeToLive arguments: records expire on ``expires_at``."""
    return {
        "TableName": table,
        "TimeToLiveSpecification": {"Enabled": True, "AttributeName": records.TTL_ATTRIBUTE},
    }


def query_params(table: str, pk: str, **extra: Any) -> dict[str, Any]:
    """Query arguments for one partition (``extra``: projection and more; its names are merged)."""
    return {
        "TableName": table,
        "KeyConditionExpression": "#pk = :pk",
        "ExpressionAttributeNames": {"#pk": records.PK, **extra.pop("ExpressionAttributeNames", {})},
        "ExpressionAttributeValues": serialize_item({":pk": pk}),
        **extra,
    }


def count_projection() -> dict[str, Any]:
    """What the counting Query of the task log projects (status, a group's task counts)."""
    return {
        "ProjectionExpression": ", ".join(COUNT_ATTRIBUTES),
        "ExpressionAttributeNames": COUNT_ATTRIBUTES,
    }


def batch_get_request(table: str, cluster_id: str, task_ids: list[str], shards: int) -> dict[str, Any]:
    """BatchGetItem ``RequestItems`` for the task-log items of ``task_ids`` (at most DYNAMODB_GET_BATCH)."""
    keys = [serialize_item(records.task_log_key(cluster_id, task_id, shards)) for task_id in task_ids]
    return {
        table: {
            "Keys": keys,
            # tasks: a group's per-task entries, so a dead-lettered group's unfinished tasks can be listed.
            "ProjectionExpression": "#sk, task_id, #st, #err, finished_at, attempt, #t",
            "ExpressionAttributeNames": {"#sk": records.SK, "#st": "status", "#err": "error", "#t": "tasks"},
        }
    }


def batch_get_found(response: dict[str, Any], table: str) -> dict[str, dict[str, Any]]:
    """The task-log items of one BatchGetItem answer, by task id (sort key)."""
    found = {}
    for raw in response.get("Responses", {}).get(table, []):
        item = deserialize_item(raw)
        found[item[records.SK]] = item
    return found


def unprocessed_keys(response: dict[str, Any]) -> dict[str, Any] | None:
    """The ``RequestItems`` still to ask for (throttled keys), or None when the batch is complete."""
    return response.get("UnprocessedKeys") or None
