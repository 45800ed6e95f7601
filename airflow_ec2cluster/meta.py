"""The cluster's META item (pk = C#<cluster>, sk = META): every request on it.

Shared by the hook and AsyncClusterIO, so both read and write the item with the same requests.
"""

from __future__ import annotations

import time
from typing import Any

from ec2cluster_worker import records

from airflow_ec2cluster.aws.dynamodb import deserialize_item, serialize_item
from airflow_ec2cluster.cluster import META_INSTANCE_IDS, META_REPLACEMENT_GENERATION, META_REPLACEMENTS
from airflow_ec2cluster.defaults import DEFAULT_RETENTION_SECONDS

# META attribute: a replacement launch claimed but not yet recorded ({generation, count, token}).
META_PENDING_LAUNCH = "pending_launch"


def meta_key(cluster_id: str) -> dict[str, Any]:
    return serialize_item({records.PK: records.cluster_pk(cluster_id), records.SK: records.META_SK})


def get_meta_params(table: str, cluster_id: str) -> dict[str, Any]:
    return {"TableName": table, "Key": meta_key(cluster_id), "ConsistentRead": True}


def update_meta_params(
    table: str,
    cluster_id: str,
    set_values: dict[str, Any] | None,
    add_values: dict[str, int] | None,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
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


def meta_of(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The META item of a GetItem (``Item``) or UpdateItem (``Attributes``) answer, as plain values."""
    return deserialize_item(raw) if raw else None
