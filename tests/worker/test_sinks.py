"""Output sinks and the task-log items they feed (moto in process)."""

from __future__ import annotations

import json

import boto3
import pytest
from ec2cluster_worker import records
from ec2cluster_worker.aws import AwsClients
from ec2cluster_worker.config import CustomOutputSpec, DynamoDBOutputSpec, S3OutputSpec
from ec2cluster_worker.handlers import HandlerError
from ec2cluster_worker.messages import Delivery
from ec2cluster_worker.results import done_result, failed_result
from ec2cluster_worker.sinks import MAX_INLINE_RESULT_BYTES, SinkContext, build_sink, write_results
from ec2cluster_worker.tasklog import MessageRun, TaskLog, task_log_item
from moto import mock_aws

from .cloud import REGION, create_state_table


def single_run(result):
    delivery = Delivery(result.message_id, f"rh-{result.task_id}", result.attempt)
    return MessageRun(result.task_id, delivery, grouped=False, task_count=1, results=[result])


@pytest.fixture
def clients(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield AwsClients(REGION)


@pytest.fixture
def context(clients):
    return SinkContext(
        cluster_id="c-1", worker_id="w-1", log_shards=4, retention_seconds=100, clients=clients
    )


def done(task_id: str, result, finished_at: float = 1000.0):
    return done_result(
        task_id=task_id,
        attempt=1,
        worker_id="w-1",
        message_id=f"m-{task_id}",
        started_at=finished_at - 0.5,
        finished_at=finished_at,
        result=result,
    )


def test_inline_dynamodb_result_rides_on_the_task_log(context):
    sink = build_sink(DynamoDBOutputSpec(), context)
    results, attributes = write_results(
        sink, [done("a", {"x": 1}), done("b", "x" * (MAX_INLINE_RESULT_BYTES + 1))]
    )
    assert attributes == {"a": {"result": '{"x":1}'}}
    assert results[0].done
    assert not results[1].done and "use an s3 output" in results[1].error


def test_dynamodb_table_sink(context):
    table = create_state_table("results-table")
    sink = build_sink(DynamoDBOutputSpec(table=table), context)
    _, attributes = write_results(sink, [done("a", [1, 2]), done("b", None)])
    assert attributes == {
        "a": {"output": "dynamodb://results-table/a"},
        "b": {"output": "dynamodb://results-table/b"},
    }
    item = (
        boto3.resource("dynamodb", region_name=REGION)
        .Table(table)
        .get_item(Key=records.task_log_key("c-1", "a", 4))["Item"]
    )
    assert json.loads(item["result"]) == [1, 2]
    assert item["expires_at"] >= 1100


def test_dynamodb_table_sink_reports_a_missing_table(context):
    sink = build_sink(DynamoDBOutputSpec(table="no-such-table"), context)
    results, attributes = write_results(sink, [done("a", 1)])
    assert attributes == {}
    assert "no-such-table" in results[0].error


@pytest.mark.parametrize("per", ["task", "batch"])
def test_s3_sink(context, per):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="out-bucket")
    sink = build_sink(S3OutputSpec(bucket="out-bucket", prefix="p/q", per=per), context)
    _, attributes = write_results(sink, [done("a", {"n": 1}), done("b", {"n": 2})])
    uris = {task_id: extra["output"] for task_id, extra in attributes.items()}
    if per == "task":
        assert uris == {"a": "s3://out-bucket/p/q/c-1/a.json", "b": "s3://out-bucket/p/q/c-1/b.json"}
        body = s3.get_object(Bucket="out-bucket", Key="p/q/c-1/a.json")["Body"].read()
        assert json.loads(body) == {"task_id": "a", "result": {"n": 1}}
    else:
        assert uris["a"] == uris["b"] and uris["a"].startswith("s3://out-bucket/p/q/c-1/batches/w-1-")
        body = s3.get_object(Bucket="out-bucket", Key=uris["a"][len("s3://out-bucket/") :])["Body"].read()
        assert [json.loads(line) for line in body.splitlines()] == [
            {"task_id": "a", "result": {"n": 1}},
            {"task_id": "b", "result": {"n": 2}},
        ]


def test_s3_sink_failure_fails_the_tasks_not_the_worker(context):
    sink = build_sink(S3OutputSpec(bucket="no-such-bucket"), context)
    results, attributes = write_results(sink, [done("a", 1)])
    assert attributes == {}
    assert "s3://no-such-bucket/c-1/a.json" in results[0].error


def test_custom_sink_is_loaded_with_options(context, tmp_path):
    path = tmp_path / "out.jsonl"
    sink = build_sink(
        CustomOutputSpec(target="tests.worker.sample_handlers:FileSink", options={"path": str(path)}), context
    )
    _, attributes = write_results(sink, [done("a", 1)])
    assert attributes == {"a": {"output": f"file://{path}"}}
    assert json.loads(path.read_text()) == {"task_id": "a", "result": 1}


def test_custom_sink_errors(context):
    with pytest.raises(HandlerError, match=r"^output\.target: cannot import"):
        build_sink(CustomOutputSpec(target="no_such_sinks:Sink"), context)
    with pytest.raises(HandlerError, match=r"^output\.target: .*failed \(KeyError"):
        build_sink(CustomOutputSpec(target="tests.worker.sample_handlers:FileSink"), context)
    broken = build_sink(CustomOutputSpec(target="tests.worker.sample_handlers:BrokenSink"), context)
    results, _ = write_results(broken, [done("a", 1)])
    assert results[0].error == "output sink failed: RuntimeError: sink is broken"


def test_unserialisable_results_fail():
    result = done("a", {"when": object()})
    assert not result.done and result.error.startswith("result is not JSON-serialisable")


def test_task_log_items_and_one_batch_write(clients):
    table = create_state_table("state-for-log")
    log = TaskLog(clients.dynamodb, table, cluster_id="c-1", log_shards=4, retention_seconds=100)
    failure = failed_result(
        task_id="dup",
        attempt=2,
        worker_id="w-1",
        message_id="m-x",
        started_at=1,
        finished_at=2,
        error="e" * 3000,
    )
    calls = []
    clients.dynamodb.meta.events.register("before-call.dynamodb.BatchWriteItem", lambda **kw: calls.append(1))
    outcomes = [done("a", 1), done("dup", 2), failure] + [done(f"t{n}", n) for n in range(20)]
    runs = [single_run(result) for result in outcomes]
    log.write(log.items(runs, {"a": {"result": "1"}, "dup": {"result": "2"}}, worker_id="w-1", now=3.0))
    assert len(calls) == 1  # 22 distinct items: one BatchWriteItem
    stored = boto3.resource("dynamodb", region_name=REGION).Table(table)
    dup = stored.get_item(Key=records.task_log_key("c-1", "dup", 4))["Item"]
    assert dup["status"] == "done" and dup["result"] == "2"  # done wins over a duplicate's failure
    item = task_log_item(failure, cluster_id="c-1", log_shards=4, retention_seconds=100)
    assert item["status"] == "failed" and len(item["error"]) == 2000 and item["error"].startswith("...")
    assert item["attempt"] == 2 and item["expires_at"] == 102
    assert "result" not in item and "output" not in item
