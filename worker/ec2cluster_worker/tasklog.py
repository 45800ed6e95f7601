"""The task log: one item per task (done or failed attempt), keyed by task id so a re-run overwrites it.

All items of a received batch go in one BatchWriteItem (boto3's batch_writer, which resends UnprocessedItems
and, with overwrite_by_pkeys, keeps one item when a duplicate delivery puts the same task id twice).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from . import records
from .results import TaskResult


def dynamo_number(value: float) -> Decimal:
    # DynamoDB numbers go through Decimal; milliseconds are precise enough for times.
    return Decimal(str(round(value, 3)))


def task_log_item(
    result: TaskResult,
    *,
    cluster_id: str,
    log_shards: int,
    retention_seconds: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        **records.task_log_key(cluster_id, result.task_id, log_shards),
        "task_id": result.task_id,
        "status": result.status,
        "cluster_id": cluster_id,
        "worker_id": result.worker_id,
        "message_id": result.message_id,
        "attempt": result.attempt,
        "started_at": dynamo_number(result.started_at),
        "finished_at": dynamo_number(result.finished_at),
        "duration_s": dynamo_number(result.duration_s),
        records.TTL_ATTRIBUTE: int(result.finished_at) + retention_seconds,
    }
    if result.error is not None:
        item["error"] = result.error
    if result.done and extra:
        item.update({key: value for key, value in extra.items() if key in ("result", "output")})
    return item


class TaskLog:
    def __init__(self, table: Any, *, cluster_id: str, log_shards: int, retention_seconds: int) -> None:
        self.table = table  # a boto3 DynamoDB Table resource (main thread only)
        self.cluster_id = cluster_id
        self.log_shards = log_shards
        self.retention_seconds = retention_seconds

    def items(
        self, outcomes: list[TaskResult], attributes: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        # Done last: when a duplicate delivery put one task id twice in a batch, the done item is kept.
        outcomes = sorted(outcomes, key=lambda result: result.done)
        return [
            task_log_item(
                result,
                cluster_id=self.cluster_id,
                log_shards=self.log_shards,
                retention_seconds=self.retention_seconds,
                extra=attributes.get(result.task_id),
            )
            for result in outcomes
        ]

    def write(self, outcomes: list[TaskResult], attributes: dict[str, dict[str, Any]]) -> None:
        """One BatchWriteItem per 25 items; raises (botocore errors) when the log could not be written."""
        if not outcomes:
            return
        with self.table.batch_writer(overwrite_by_pkeys=[records.PK, records.SK]) as batch:
            for item in self.items(outcomes, attributes):
                batch.put_item(Item=item)
