"""Where the cluster's records live in the DynamoDB state table.

One table (partition key ``pk``, sort key ``sk``, both strings) holds every cluster's records, each
cluster under its own key prefix so that two clusters never read each other's items. The worker writes
these records and the controller (the Airflow side) reads them, so the key formats are defined once, here.

- Worker status: ``pk = C#<cluster>#W``, ``sk = <worker id>``. One item per worker, overwritten on every
  heartbeat, so one Query on the partition returns the whole cluster's liveness.
- Task log: ``pk = C#<cluster>#T#<shard>``, ``sk = <task id>``. One item per task, keyed by task id so a task
  run twice overwrites its own item. The shard spreads a busy cluster's writes over many partitions.
- Cluster metadata: ``pk = C#<cluster>``, ``sk = META``: what the controller recorded (enqueued count...).
"""

from __future__ import annotations

import zlib

PK = "pk"
SK = "sk"
DEFAULT_LOG_SHARDS = 16
META_SK = "META"
# Records expire (DynamoDB TTL on this attribute) so that finished clusters cost nothing to keep.
TTL_ATTRIBUTE = "expires_at"
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600

# CreateTable arguments of a state table (besides TableName): string keys, on-demand billing.
STATE_TABLE_SCHEMA = {
    "AttributeDefinitions": [
        {"AttributeName": PK, "AttributeType": "S"},
        {"AttributeName": SK, "AttributeType": "S"},
    ],
    "KeySchema": [{"AttributeName": PK, "KeyType": "HASH"}, {"AttributeName": SK, "KeyType": "RANGE"}],
    "BillingMode": "PAY_PER_REQUEST",
}

# Worker status item: the attributes a worker writes and the controller reads.
STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_STOPPING = "stopping"
STATE_STOPPED = "stopped"

# Task log item status values. A group's item is partial when a stopping worker handed it back unfinished.
TASK_DONE = "done"
TASK_FAILED = "failed"
TASK_PARTIAL = "partial"


def cluster_pk(cluster_id: str) -> str:
    return f"C#{cluster_id}"


def workers_pk(cluster_id: str) -> str:
    return f"C#{cluster_id}#W"


def log_shard(task_id: str, shards: int = DEFAULT_LOG_SHARDS) -> int:
    # crc32, not hash(): the shard must be the same in every process and Python version.
    return zlib.crc32(task_id.encode("utf-8")) % shards


def log_pk(cluster_id: str, shard: int) -> str:
    return f"C#{cluster_id}#T#{shard:03d}"


def task_log_key(cluster_id: str, task_id: str, shards: int = DEFAULT_LOG_SHARDS) -> dict[str, str]:
    return {PK: log_pk(cluster_id, log_shard(task_id, shards)), SK: task_id}


def all_log_pks(cluster_id: str, shards: int = DEFAULT_LOG_SHARDS) -> list[str]:
    return [log_pk(cluster_id, shard) for shard in range(shards)]
