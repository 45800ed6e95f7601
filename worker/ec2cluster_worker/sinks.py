"""Output sinks: where the results of done tasks go.

The interface (custom sinks implement it)::

    class MySink:
        def __init__(self, options: dict, context: SinkContext): ...
        def write(self, completed: list[TaskResult]) -> dict[str, dict]: ...
        def close(self) -> None: ...          # optional

``write`` gets the done tasks of one received batch and returns, per task id, the attributes to put on that
task's task-log item (``{"output": "s3://..."}``, or ``{"result": "<json>"}``). A task whose attributes
contain ``"error"``, or that is missing from the answer, was not stored: the worker logs it as failed and
leaves its message for a retry. Raising fails the whole batch the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from . import records
from .aws import AwsClients
from .config import CustomOutputSpec, DynamoDBOutputSpec, OutputSpec, S3OutputSpec
from .handlers import HandlerError, load_target
from .results import TaskResult
from .tasklog import MAX_INLINE_RESULT_BYTES


class Sink(Protocol):
    def write(self, completed: list[TaskResult]) -> dict[str, dict[str, Any]]: ...


@dataclass(frozen=True)
class SinkContext:
    cluster_id: str
    worker_id: str
    log_shards: int
    retention_seconds: int
    clients: AwsClients  # make further clients with clients.client("service"), in __init__ (main thread)


def result_line(result: TaskResult) -> str:
    """A done task as one JSON object: what the S3 sinks store."""
    assert result.result_json is not None
    return f'{{"task_id":{json.dumps(result.task_id)},"result":{result.result_json}}}'


def result_too_large(result: TaskResult) -> str | None:
    size = len((result.result_json or "").encode("utf-8"))
    if size <= MAX_INLINE_RESULT_BYTES:
        return None
    return (
        f"result is {size} bytes of JSON, over the {MAX_INLINE_RESULT_BYTES} that fit in a DynamoDB item; "
        "use an s3 output"
    )


class InlineDynamoDBSink:
    """The default: the result rides on the task-log item itself (one item write per task in all)."""

    def write(self, completed: list[TaskResult]) -> dict[str, dict[str, Any]]:
        stored: dict[str, dict[str, Any]] = {}
        for result in completed:
            too_large = result_too_large(result)
            stored[result.task_id] = {"error": too_large} if too_large else {"result": result.result_json}
        return stored


class DynamoDBTableSink:
    """Results in their own table, same key layout as the task log, one item per task keyed by task id."""

    def __init__(self, table: str, context: SinkContext) -> None:
        self.table_name = table
        self.context = context
        self.table = context.clients.dynamodb_resource.Table(table)

    def write(self, completed: list[TaskResult]) -> dict[str, dict[str, Any]]:
        stored: dict[str, dict[str, Any]] = {}
        items = []
        expires_at = int(time.time()) + self.context.retention_seconds
        for result in completed:
            too_large = result_too_large(result)
            if too_large:
                stored[result.task_id] = {"error": too_large}
                continue
            items.append(
                {
                    **records.task_log_key(self.context.cluster_id, result.task_id, self.context.log_shards),
                    "task_id": result.task_id,
                    "cluster_id": self.context.cluster_id,
                    "worker_id": result.worker_id,
                    "finished_at": Decimal(str(round(result.finished_at, 3))),
                    "result": result.result_json,
                    records.TTL_ATTRIBUTE: expires_at,
                }
            )
        try:
            with self.table.batch_writer(overwrite_by_pkeys=[records.PK, records.SK]) as batch:
                for item in items:
                    batch.put_item(Item=item)
        except (BotoCoreError, ClientError) as error:
            failure = {"error": f"writing results to DynamoDB table {self.table_name!r} failed: {error}"}
            return {**stored, **{item["task_id"]: failure for item in items}}
        for item in items:
            stored[item["task_id"]] = {"output": f"dynamodb://{self.table_name}/{item['task_id']}"}
        return stored


class S3Sink:
    """One JSON object per task at <prefix>/<cluster>/<task id>.json, or one JSON-lines object per batch."""

    def __init__(self, spec: S3OutputSpec, context: SinkContext) -> None:
        self.spec = spec
        self.context = context
        self.s3 = context.clients.client("s3")

    def key_prefix(self) -> str:
        return (
            f"{self.spec.prefix}/{self.context.cluster_id}" if self.spec.prefix else self.context.cluster_id
        )

    def task_key(self, task_id: str) -> str:
        return f"{self.key_prefix()}/{task_id}.json"

    def batch_key(self) -> str:
        stamp = int(time.time() * 1000)
        return f"{self.key_prefix()}/batches/{self.context.worker_id}-{stamp}-{uuid.uuid4().hex[:8]}.jsonl"

    def write(self, completed: list[TaskResult]) -> dict[str, dict[str, Any]]:
        if not completed:
            return {}
        if self.spec.per == "batch":
            key = self.batch_key()
            body = "".join(result_line(result) + "\n" for result in completed)
            outcome = self._put(key, body, "application/x-ndjson")
            return {result.task_id: outcome for result in completed}
        return {
            result.task_id: self._put(self.task_key(result.task_id), result_line(result), "application/json")
            for result in completed
        }

    def _put(self, key: str, body: str, content_type: str) -> dict[str, Any]:
        try:
            self.s3.put_object(
                Bucket=self.spec.bucket, Key=key, Body=body.encode("utf-8"), ContentType=content_type
            )
        except (BotoCoreError, ClientError) as error:
            return {"error": f"writing s3://{self.spec.bucket}/{key} failed: {error}"}
        return {"output": f"s3://{self.spec.bucket}/{key}"}


def build_sink(spec: OutputSpec, context: SinkContext) -> Sink:
    if isinstance(spec, DynamoDBOutputSpec):
        return InlineDynamoDBSink() if spec.table is None else DynamoDBTableSink(spec.table, context)
    if isinstance(spec, S3OutputSpec):
        return S3Sink(spec, context)
    if isinstance(spec, CustomOutputSpec):
        sink_class = load_target(spec.target, "output.target")
        try:
            sink = sink_class(dict(spec.options), context)
        except Exception as error:
            raise HandlerError(
                f"output.target: {spec.target}(options, context) failed ({type(error).__name__}: {error}); "
                "check output.options"
            ) from error
        if not callable(getattr(sink, "write", None)):
            raise HandlerError(
                f"output.target: {spec.target!r} has no write(completed) method; see ec2cluster_worker.sinks"
            )
        return sink
    raise HandlerError(f"output: unsupported output {spec!r}")


def write_results(
    sink: Sink, completed: list[TaskResult]
) -> tuple[list[TaskResult], dict[str, dict[str, Any]]]:
    """(results, task-log attributes per task id): results the sink did not store are turned into failures."""
    if not completed:
        return [], {}
    try:
        stored = sink.write(completed)
    except Exception as error:  # a custom sink's bug must not kill the worker
        stored = {
            result.task_id: {"error": f"output sink failed: {type(error).__name__}: {error}"}
            for result in completed
        }
    outcomes: list[TaskResult] = []
    attributes: dict[str, dict[str, Any]] = {}
    for result in completed:
        extra = stored.get(result.task_id) if isinstance(stored, dict) else None
        if not isinstance(extra, dict):
            outcomes.append(result.failed_with("output sink did not store the result"))
        elif "error" in extra:
            outcomes.append(result.failed_with(str(extra["error"])))
        else:
            outcomes.append(result)
            attributes[result.task_id] = extra
    return outcomes, attributes
