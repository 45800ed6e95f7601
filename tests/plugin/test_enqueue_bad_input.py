"""A failed enqueue leaves nothing behind: bad input is refused before anything is created, each error naming
the field and the fix; a bad task found mid-stream, after messages were sent, deletes what the enqueue made,
and the re-run after the fix sends every task exactly once."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.stub import Stubber

from airflow_ec2cluster.cluster import QUEUE_NAME_PREFIX
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook, QueueNameNotFreeYet
from airflow_ec2cluster.meta import MetaUpdate
from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator
from airflow_ec2cluster.operators.enqueue import PEEK_MESSAGES, EnqueueInputError
from airflow_ec2cluster.packing import MAX_MESSAGE_BYTES
from tests.plugin.conftest import REGION

TABLE = "ec2cluster-state-bad-input"
BUCKET = "inputs"
ID_FIX = r"use 1-200 characters of A-Za-z0-9_\.:-"


def operator(cluster_id: str, **kwargs) -> EC2ClusterEnqueueOperator:
    kwargs.setdefault("state_table", TABLE)
    return EC2ClusterEnqueueOperator(
        task_id="enqueue", cluster_id=cluster_id, aws_conn_id=None, region_name=REGION, **kwargs
    )


def leftovers(cluster_id: str, table: str = TABLE) -> dict:
    """The cluster's queues (by its name prefix) and META item, and whether the state table exists."""
    queues = (
        boto3.client("sqs", region_name=REGION)
        .list_queues(QueueNamePrefix=QUEUE_NAME_PREFIX + cluster_id)
        .get("QueueUrls", [])
    )
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    if table not in dynamodb.list_tables()["TableNames"]:
        return {"queues": queues, "meta": None, "table": False}
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(table, cluster_id)
    return {"queues": queues, "meta": meta, "table": True}


def put_object(key: str, body: bytes) -> str:
    s3 = boto3.client("s3", region_name=REGION)
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


def tasks_with(index: int, payload: object, count: int = 20) -> list:
    """``count`` payloads with id fields, the one at ``index`` replaced by ``payload``."""
    tasks: list = [{"id": f"task-{i}", "n": i} for i in range(count)]
    tasks[index] = payload
    return tasks


def broken_generator(index: int, payload: object, count: int = 20):
    def source():
        yield from tasks_with(index, payload, count)

    return source


# (operator arguments, the error's pattern: the field, the task's place and the fix)
BAD_INPUTS = {
    "id with a space": (
        {"tasks": tasks_with(17, {"id": "a b"}), "id_field": "id"},
        rf"tasks\[17\]: task_id 'a b' \(its 'id' field\) is invalid: {ID_FIX}",
    ),
    "id too long": (
        {"tasks": tasks_with(3, {"id": "x" * 201}), "id_field": "id"},
        rf"tasks\[3\]: task_id 'x{{201}}' .*is invalid: {ID_FIX}",
    ),
    "id of the wrong type": (
        {"tasks": tasks_with(4, {"id": None}), "id_field": "id"},
        r"tasks\[4\]: task_id from its 'id' field is a NoneType .*: use text or a whole number",
    ),
    "no id field": (
        {"tasks": tasks_with(5, {"n": 5}), "id_field": "id"},
        r"tasks\[5\]: the payload has no 'id' field .*: add it to every payload, or leave id_field unset",
    ),
    "duplicate id": (
        {"tasks": tasks_with(9, {"id": "task-2"}), "id_field": "id"},
        r"tasks\[9\]: task_id 'task-2' is taken by an earlier task: task ids must be unique; fix",
    ),
    "payload not JSON": (
        {"tasks": tasks_with(6, {"when": object()})},
        r"tasks\[6\]: payload of task t000000006 is not JSON-serialisable .*: give JSON values only",
    ),
    "payload over 1 MiB": (
        {"tasks": tasks_with(7, {"blob": "x" * MAX_MESSAGE_BYTES})},
        rf"tasks\[7\]: task t000000007 is 1,048,6\d\d bytes .* {MAX_MESSAGE_BYTES:,} bytes: put large "
        "inputs in S3",
    ),
    # A list is checked whole: a bad task far past the first messages still creates nothing.
    "bad id far into a list": (
        {"tasks": tasks_with(5_000, {"id": "no/slash"}, count=6_000), "id_field": "id"},
        rf"tasks\[5000\]: task_id 'no/slash' .*{ID_FIX}",
    ),
    "generator with a bad id": (
        {"tasks_callable": broken_generator(12, {"id": "?"}), "id_field": "id"},
        rf"tasks_callable\(\)\[12\]: task_id '\?' .*{ID_FIX}",
    ),
    "callable returning a dict": (
        {"tasks_callable": lambda: {"a": 1}},
        r"tasks_callable's result: a dict is not a list of payloads: give a list",
    ),
    "tasks rendered as text": (
        {"tasks": "[1, 2, 3]"},
        r"tasks: a str is not a list of payloads: .*render_template_as_native_obj=True",
    ),
    "visibility_timeout": (
        {"tasks": [1], "visibility_timeout": 50_000},
        r"visibility_timeout: 50000 is not a whole number from 0 to 43,200: it is the seconds",
    ),
    "max_receive_count": (
        {"tasks": [1], "max_receive_count": 0},
        r"max_receive_count: 0 is not a whole number from 1 to 1,000: it is the receives",
    ),
    "retention_seconds": (
        {"tasks": [1], "retention_seconds": 30},
        r"retention_seconds: 30 is not a whole number from 60 to 1,209,600",
    ),
    "send_concurrency": (
        {"tasks": [1], "send_concurrency": 0},
        r"send_concurrency: 0 is not a whole number of at least 1: it is the SendMessageBatch requests",
    ),
    "state_table": (
        {"tasks": [1], "state_table": "no"},
        r"state_table: 'no' is not a DynamoDB table name: use 3-255 letters",
    ),
    "id_field empty": (
        {"tasks": [1], "id_field": ""},
        r"id_field: '' is not a field name: name the payload field",
    ),
    "s3_uri not s3": (
        {"s3_uri": "https://inputs.s3.amazonaws.com/tasks.jsonl"},
        r"s3_uri: 'https://inputs.s3.amazonaws.com/tasks.jsonl' is not an S3 object URI: write it as s3://",
    ),
    "s3_uri without key": (
        {"s3_uri": "s3://inputs/"},
        r"s3_uri: 's3://inputs/' names no object key: write it as s3://bucket/key",
    ),
    "s3_uri bad bucket": (
        {"s3_uri": "s3://my bucket/tasks.jsonl"},
        r"s3_uri: bucket 'my bucket' of .* is not a valid bucket name: use 3-63 lowercase letters",
    ),
    "s3_uri ip bucket": (
        {"s3_uri": "s3://192.168.1.10/tasks.jsonl"},
        r"s3_uri: bucket '192.168.1.10' .*not a valid bucket name",
    ),
    "s3 object missing": (
        {"s3_uri": "s3://inputs/missing.jsonl"},
        r"s3_uri: there is no object s3://inputs/missing.jsonl: check the bucket and key",
    ),
    "s3 bucket missing": (
        {"s3_uri": "s3://no-such-bucket-here/tasks.jsonl"},
        r"s3_uri: there is no object s3://no-such-bucket-here/tasks.jsonl: check the bucket and key",
    ),
    "s3 line not JSON": (
        {"s3_uri": "s3://inputs/bad-line-3.jsonl"},
        r"line 3 of s3_uri s3://inputs/bad-line-3.jsonl: not valid JSON .*: write one JSON value per line",
    ),
    "s3 line without id": (
        {"s3_uri": "s3://inputs/no-id.jsonl", "id_field": "id"},
        r"line 2 of s3_uri s3://inputs/no-id.jsonl: the payload has no 'id' field",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_field_and_the_fix_and_creates_nothing(aws, context, cluster_id, case):
    put_object("bad-line-3.jsonl", b'{"n": 1}\n{"n": 2}\n{"n": \n{"n": 4}\n')
    put_object("no-id.jsonl", b'{"id": "a"}\n{"n": 2}\n')
    kwargs, pattern = BAD_INPUTS[case]
    with pytest.raises(EnqueueInputError, match=pattern) as raised:
        operator(cluster_id, **kwargs).execute(context)
    assert f"Nothing was created for cluster {cluster_id}" in str(raised.value)
    # Not even the shared state table: every check came first.
    assert leftovers(cluster_id, kwargs.get("state_table", TABLE)) == {
        "queues": [],
        "meta": None,
        "table": False,
    }


def test_a_bad_cluster_id_creates_nothing(aws, context):
    with pytest.raises(Exception, match=r"cluster_id 'Bad_Id' is invalid: use 1-40 lowercase letters"):
        operator("Bad_Id", tasks=[1]).execute(context)
    assert leftovers("Bad_Id") == {"queues": [], "meta": None, "table": False}


def test_every_argument_problem_is_reported_at_once(aws, context, cluster_id):
    with pytest.raises(EnqueueInputError) as raised:
        operator(cluster_id, tasks=[1], visibility_timeout=-1, max_receive_count=5_000).execute(context)
    assert "visibility_timeout: -1" in str(raised.value) and "max_receive_count: 5000" in str(raised.value)


def test_an_unreadable_object_is_refused_before_anything_is_created(aws, context, cluster_id):
    uri = put_object("locked.jsonl", b'{"n": 1}\n')
    op = operator(cluster_id, s3_uri=uri)
    stubber = Stubber(op.hook.s3)
    stubber.add_client_error("head_object", service_error_code="403", http_status_code=403)
    with stubber, pytest.raises(EnqueueInputError) as raised:
        op.execute(context)
    assert "s3_uri: s3://inputs/locked.jsonl cannot be read with this connection" in str(raised.value)
    assert "grant s3:GetObject on key 'locked.jsonl' of bucket 'inputs'" in str(raised.value)
    assert leftovers(cluster_id) == {"queues": [], "meta": None, "table": False}


# -- a bad task found after messages were sent ------------------------------------------------------------


def jsonl(count: int, bad_line: int | None = None) -> bytes:
    lines = [json.dumps({"n": i}) for i in range(count)]
    if bad_line is not None:
        lines[bad_line - 1] = '{"n": '
    return "\n".join(lines).encode()


def tasks_on_queue(queue_url: str) -> list[str]:
    """Every task id of every message on the queue (received and kept invisible, so each is read once)."""
    sqs = boto3.client("sqs", region_name=REGION)
    ids = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600).get(
            "Messages", []
        )
        if not messages:
            return ids
        for message in messages:
            body = json.loads(message["Body"])
            ids += [task["task_id"] for task in body.get("tasks", [body])]


def test_a_bad_line_mid_stream_deletes_what_was_made_and_the_rerun_sends_each_task_once(
    aws, context, cluster_id
):
    # 25 tasks a message keeps in-process moto quick (its SendMessage slows with every message queued).
    count, bad_line, per_message = 6_000, 5_000, 25
    uri = put_object("job.jsonl", jsonl(count, bad_line))
    with pytest.raises(EnqueueInputError) as raised:
        operator(cluster_id, s3_uri=uri, tasks_per_message=per_message).execute(context)
    message = str(raised.value)
    assert f"line {bad_line} of s3_uri {uri}: not valid JSON" in message
    assert "write one JSON value per line" in message
    # 19 requests of 10 messages of 25 tasks went out before line 5,000 was read (the 20th was not full):
    # deleted, with the queues and the META item.
    assert "Nothing of this enqueue is left: the 190 messages (4750 tasks) already sent" in message
    assert leftovers(cluster_id) == {"queues": [], "meta": None, "table": True}

    put_object("job.jsonl", jsonl(count))  # the fix
    result = operator(cluster_id, s3_uri=uri, tasks_per_message=per_message).execute(context)
    assert (result["enqueued"], result["enqueued_messages"]) == (count, count // per_message)
    ids = tasks_on_queue(result["queue_url"])
    assert len(ids) == count and sorted(ids) == [f"t{i:09d}" for i in range(count)]


def test_a_duplicate_id_mid_stream_deletes_what_was_made(aws, context, cluster_id):
    # In-process moto's SendMessage slows with every message on the queue: 10 tasks a message, 130 messages.
    count = 10 * PEEK_MESSAGES + 300
    source = broken_generator(count - 10, {"id": "task-3"}, count)
    with pytest.raises(
        EnqueueInputError, match=rf"tasks_callable\(\)\[{count - 10}\]: task_id 'task-3' is taken"
    ):
        operator(cluster_id, tasks_callable=source, id_field="id").execute(context)
    assert leftovers(cluster_id) == {"queues": [], "meta": None, "table": True}
    fixed = broken_generator(count - 10, {"id": f"task-{count - 10}"}, count)
    result = operator(cluster_id, tasks_callable=fixed, id_field="id").execute(context)
    assert sorted(tasks_on_queue(result["queue_url"])) == sorted(f"task-{i}" for i in range(count))


def test_with_workers_launched_the_queues_stay_and_the_rerun_resumes(aws, context, cluster_id):
    count, bad_line = 3_000, 2_500
    uri = put_object("launched.jsonl", jsonl(count, bad_line))
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    hook.ensure_state_table(TABLE)
    hook.update_meta(TABLE, cluster_id, MetaUpdate(instance_ids=["i-0123456789abcdef0"]))
    with pytest.raises(EnqueueInputError, match="Workers were launched for cluster .* the enqueue resumes"):
        operator(cluster_id, s3_uri=uri).execute(context)
    left = leftovers(cluster_id)
    assert len(left["queues"]) == 2 and left["meta"].enqueued_messages == 240
    put_object("launched.jsonl", jsonl(count))
    result = operator(cluster_id, s3_uri=uri).execute(context)
    ids = tasks_on_queue(result["queue_url"])
    assert len(ids) == count and sorted(ids) == [f"t{i:09d}" for i in range(count)]


def test_a_finished_enqueue_is_not_checked_again(aws, context, cluster_id):
    uri = put_object("done.jsonl", jsonl(30))
    first = operator(cluster_id, s3_uri=uri).execute(context)
    boto3.client("s3", region_name=REGION).delete_object(Bucket=BUCKET, Key="done.jsonl")
    again = operator(cluster_id, s3_uri=uri).execute(context)  # nothing to read: it finished
    assert again == first and again["enqueued"] == 30


def test_a_queue_name_sqs_does_not_take_yet_says_to_retry(aws):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    stubber = Stubber(hook.sqs)
    stubber.add_client_error(
        "create_queue", service_error_code="AWS.SimpleQueueService.QueueDeletedRecently", http_status_code=400
    )
    with stubber, pytest.raises(QueueNameNotFreeYet, match="c1-dlq yet: .*deleted less than 60 seconds ago"):
        hook.ensure_queues("c1")
