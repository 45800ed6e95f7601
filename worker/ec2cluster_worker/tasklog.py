"""The task log: one item per message, keyed by the message's log key (its first task's id).

A message of one task gets the flat item of that task (``task_id``, ``status``, ``result``...). A group's
item lists its tasks in ``tasks`` (``task_id``, ``status``, ``duration_s``, ``result`` | ``output`` |
``error`` each) with ``task_count``, ``tasks_done`` and ``tasks_failed``, and its ``status`` says the whole
message: ``done`` (every task done), ``failed`` (some failed: the message is retried) or ``partial`` (the
worker stopped before running them all: the message is handed back). One item per message is what makes a
group cheap: a DynamoDB write unit per KB, not per task. A redelivered message is logged under the same key,
so a re-run overwrites its own item.

A failed task has ``error`` (what a person reads: ``ValueError: bad payload 7``, or a command's exit status
and last stderr line) and, when there is more, ``error_detail`` (the traceback or the stderr's end), kept
short in a group (DETAIL_CHARS_IN_GROUP each): the item's size is what its write costs, and 400 KB its limit.

All items of a received batch go in one BatchWriteItem (boto3's BatchWriter, which resends UnprocessedItems
and, with overwrite_by_pkeys, keeps one item when a duplicate delivery puts the same key twice). It runs on
the low-level client with items serialised here: the resource layer's request transformation walks and
copies every request, about a tenth of the worker's CPU per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from boto3.dynamodb.table import BatchWriter
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from . import records
from .messages import Delivery
from .results import MAX_ERROR_CHARS, TaskResult, truncate_error

# A DynamoDB item holds at most 400 KB; leave room for the task log's other attributes.
MAX_INLINE_RESULT_BYTES = 350_000
# The end of a traceback says the most; a flat item keeps MAX_ERROR_CHARS of it, a group's entry this much.
DETAIL_CHARS_IN_GROUP = 1000
# BatchGetItem reads at most 100 keys per call.
MAX_GET_KEYS = 100
_serialize = TypeSerializer().serialize
_deserialize = TypeDeserializer().deserialize


def wire_item(item: dict[str, Any]) -> dict[str, Any]:
    return {name: _serialize(value) for name, value in item.items()}


def python_item(item: dict[str, Any]) -> dict[str, Any]:
    return {name: _deserialize(value) for name, value in item.items()}


def dynamo_number(value: float) -> Decimal:
    # DynamoDB numbers go through Decimal; milliseconds are precise enough for times.
    return Decimal(str(round(value, 3)))


@dataclass
class MessageRun:
    """One received message and what came of its tasks on this delivery."""

    key: str
    delivery: Delivery
    grouped: bool
    task_count: int
    results: list[TaskResult] = field(default_factory=list)
    # Entries of tasks logged done by an earlier delivery: not run again, written back unchanged.
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    not_run: int = 0  # tasks not started because the worker is stopping
    outstanding: int = 0  # tasks queued or running on a slot (the message ends at 0)

    @property
    def tasks_done(self) -> int:
        return len(self.kept) + sum(1 for result in self.results if result.done)

    @property
    def tasks_failed(self) -> int:
        return sum(1 for result in self.results if not result.done)

    @property
    def status(self) -> str:
        if self.not_run:
            return records.TASK_PARTIAL
        return records.TASK_FAILED if self.tasks_failed else records.TASK_DONE

    @property
    def finished_before(self) -> bool:
        """Every task was logged done by an earlier delivery: nothing to run or write, only to delete."""
        return not self.results and not self.not_run


def task_log_item(
    result: TaskResult,
    *,
    cluster_id: str,
    log_shards: int,
    retention_seconds: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The flat item of a message of one task."""
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
    if result.error_detail:
        item["error_detail"] = tail(result.error_detail, MAX_ERROR_CHARS)
    if result.done and extra:
        item.update(stored_attributes(extra))
    return item


def tail(text: str, chars: int) -> str:
    return text if len(text) <= chars else "..." + text[-(chars - 3) :]


def stored_attributes(extra: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in extra.items() if key in ("result", "output")}


def task_entry(result: TaskResult, extra: dict[str, Any] | None) -> dict[str, Any]:
    """One task of a group's item: kept small, since the item's size is what a write costs."""
    entry: dict[str, Any] = {
        "task_id": result.task_id,
        "status": result.status,
        "duration_s": dynamo_number(result.duration_s),
    }
    if result.error is not None:
        entry["error"] = result.error
    if result.error_detail:
        entry["error_detail"] = tail(result.error_detail, DETAIL_CHARS_IN_GROUP)
    if result.done and extra:
        entry.update(stored_attributes(extra))
    return entry


def group_log_item(
    run: MessageRun,
    attributes: dict[str, dict[str, Any]],
    *,
    cluster_id: str,
    worker_id: str,
    log_shards: int,
    retention_seconds: int,
    now: float,
) -> dict[str, Any]:
    new_entries = {
        result.task_id: task_entry(result, attributes.get(result.task_id)) for result in run.results
    }
    entries = [*run.kept.values(), *new_entries.values()]
    started = min((result.started_at for result in run.results), default=now)
    item: dict[str, Any] = {
        **records.task_log_key(cluster_id, run.key, log_shards),
        "task_id": run.key,
        "status": run.status,
        "cluster_id": cluster_id,
        "worker_id": worker_id,
        "message_id": run.delivery.message_id,
        "attempt": run.delivery.attempt,
        "started_at": dynamo_number(started),
        "finished_at": dynamo_number(now),
        "duration_s": dynamo_number(sum(result.duration_s for result in run.results)),
        "task_count": run.task_count,
        "tasks_done": run.tasks_done,
        "tasks_failed": run.tasks_failed,
        "tasks": entries,
        records.TTL_ATTRIBUTE: int(now) + retention_seconds,
    }
    failed = [result for result in run.results if not result.done]
    if failed:
        first = failed[0]
        item["error"] = truncate_error(
            f"{len(failed)} of {run.task_count} tasks failed; {first.task_id}: {first.error}"
        )
    return item


def fit_inline_results(run: MessageRun, attributes: dict[str, dict[str, Any]]) -> None:
    """Fail the tasks whose inline results no longer fit in the message's one item (S3 takes big ones)."""
    total = sum(len(str(entry.get("result", ""))) for entry in run.kept.values())
    # The failed tasks' errors share the item too.
    total += sum(
        len(result.error or "") + min(len(result.error_detail or ""), DETAIL_CHARS_IN_GROUP)
        for result in run.results
        if not result.done
    )
    for index, result in enumerate(run.results):
        inline = attributes.get(result.task_id, {}).get("result")
        if not result.done or inline is None:
            continue
        total += len(inline.encode("utf-8"))
        if total > MAX_INLINE_RESULT_BYTES:
            run.results[index] = result.failed_with(
                f"the results of this message's tasks add up to over {MAX_INLINE_RESULT_BYTES} bytes, more "
                "than fit in its DynamoDB item: use an s3 output, or enqueue fewer tasks per message"
            )


def done_entries(item: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The task entries of a logged message that are done, by task id."""
    if "tasks" in item:
        return {
            entry["task_id"]: entry for entry in item["tasks"] if entry.get("status") == records.TASK_DONE
        }
    if item.get("status") == records.TASK_DONE:
        return {item["task_id"]: item}
    return {}


class TaskLog:
    def __init__(
        self, client: Any, table_name: str, *, cluster_id: str, log_shards: int, retention_seconds: int
    ) -> None:
        self.client = client  # a low-level DynamoDB client
        self.table_name = table_name
        self.cluster_id = cluster_id
        self.log_shards = log_shards
        self.retention_seconds = retention_seconds

    def items(
        self, runs: list[MessageRun], attributes: dict[str, dict[str, Any]], *, worker_id: str, now: float
    ) -> list[dict[str, Any]]:
        items = []
        for run in runs:
            if run.finished_before:
                continue
            if not run.grouped and run.results:
                result = run.results[0]
                items.append(
                    task_log_item(
                        result,
                        cluster_id=self.cluster_id,
                        log_shards=self.log_shards,
                        retention_seconds=self.retention_seconds,
                        extra=attributes.get(result.task_id),
                    )
                )
            elif run.grouped and (run.results or run.kept):
                items.append(
                    group_log_item(
                        run,
                        attributes,
                        cluster_id=self.cluster_id,
                        worker_id=worker_id,
                        log_shards=self.log_shards,
                        retention_seconds=self.retention_seconds,
                        now=now,
                    )
                )
        # Done last: when a duplicate delivery put one key twice in a batch, the done item is kept.
        return sorted(items, key=lambda item: item["status"] == records.TASK_DONE)

    def write(self, items: list[dict[str, Any]]) -> None:
        """One BatchWriteItem per 25 items; raises (botocore errors) when the log could not be written."""
        if not items:
            return
        with BatchWriter(self.table_name, self.client, overwrite_by_pkeys=[records.PK, records.SK]) as batch:
            for item in items:
                batch.put_item(Item=wire_item(item))

    def done_before(self, keys: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """Per log key, the entries of tasks an earlier delivery logged done (one BatchGetItem per 100)."""
        found: dict[str, dict[str, dict[str, Any]]] = {}
        unique = sorted(set(keys))
        for start in range(0, len(unique), MAX_GET_KEYS):
            request = {
                self.table_name: {
                    "Keys": [
                        wire_item(records.task_log_key(self.cluster_id, key, self.log_shards))
                        for key in unique[start : start + MAX_GET_KEYS]
                    ],
                    "ProjectionExpression": "sk, task_id, #st, #r, #o, #t",
                    "ExpressionAttributeNames": {
                        "#st": "status",
                        "#r": "result",
                        "#o": "output",
                        "#t": "tasks",
                    },
                }
            }
            while request:
                response = self.client.batch_get_item(RequestItems=request)
                for wire in response.get("Responses", {}).get(self.table_name, []):
                    item = python_item(wire)
                    found[item[records.SK]] = done_entries(item)
                request = response.get("UnprocessedKeys") or None
        return found
