"""EC2ClusterEnqueueOperator against moto: batches, size limit, resume, sources."""

from __future__ import annotations

import json

import boto3
import pytest
from airflow.sdk.exceptions import AirflowException

from airflow_ec2cluster.cluster import QUEUE_NAME_PREFIX
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator
from airflow_ec2cluster.operators.enqueue import PEEK_MESSAGES
from airflow_ec2cluster.packing import MAX_MESSAGE_BYTES
from tests.plugin.conftest import REGION

TABLE = "ec2cluster-state-test"


def enqueue(cluster_id: str, **kwargs) -> EC2ClusterEnqueueOperator:
    # Most tests here look at SQS mechanics with one task per message; grouping has its own tests below.
    kwargs.setdefault("tasks_per_message", 1)
    return EC2ClusterEnqueueOperator(
        task_id="enqueue",
        cluster_id=cluster_id,
        state_table=TABLE,
        aws_conn_id=None,
        region_name=REGION,
        **kwargs,
    )


def grouped(cluster_id: str, **kwargs) -> EC2ClusterEnqueueOperator:
    return EC2ClusterEnqueueOperator(
        task_id="enqueue",
        cluster_id=cluster_id,
        state_table=TABLE,
        aws_conn_id=None,
        region_name=REGION,
        **kwargs,
    )


def queue_messages(queue_url: str) -> int:
    attrs = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def receive_all(queue_url: str) -> list[dict]:
    sqs = boto3.client("sqs", region_name=REGION)
    bodies = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return bodies
        bodies += [json.loads(m["Body"]) for m in messages]


def count_calls(operator, operation: str) -> list[int]:
    calls = [0]

    def on_call(model, **_):
        if model.name == operation:
            calls[0] += 1

    operator.hook.sqs.meta.events.register("before-call", on_call)
    return calls


def test_enqueue_sends_in_batches_and_records_meta(aws, context, cluster_id):
    operator = enqueue(cluster_id, tasks=[{"n": i} for i in range(25)])
    calls = count_calls(operator, "SendMessageBatch")
    result = operator.execute(context)
    assert result["enqueued"] == 25 and result["cluster_id"] == cluster_id
    assert calls[0] == 3
    bodies = receive_all(result["queue_url"])
    assert sorted(b["task_id"] for b in bodies) == [f"t{i:09d}" for i in range(25)]
    assert {b["task_id"]: b["payload"]["n"] for b in bodies}["t000000007"] == 7
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id)
    assert meta.enqueued == 25 and meta.enqueue_complete is True
    assert meta.queue_url == result["queue_url"] and meta.dlq_url == result["dlq_url"]


def test_queue_has_dead_letter_queue_and_encryption(aws, context, cluster_id):
    result = enqueue(cluster_id, tasks=[1], max_receive_count=5, visibility_timeout=200).execute(context)
    attrs = boto3.client("sqs", region_name=REGION).get_queue_attributes(
        QueueUrl=result["queue_url"], AttributeNames=["All"]
    )["Attributes"]
    redrive = json.loads(attrs["RedrivePolicy"])
    assert (
        redrive["deadLetterTargetArn"].endswith(f"{cluster_id}-dlq") and int(redrive["maxReceiveCount"]) == 5
    )
    assert attrs["VisibilityTimeout"] == "200" and attrs["SqsManagedSseEnabled"] == "true"
    ttl = boto3.client("dynamodb", region_name=REGION).describe_time_to_live(TableName=TABLE)
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "expires_at"


def test_retried_enqueue_does_not_double_the_work(aws, context, cluster_id):
    tasks = [{"n": i} for i in range(30)]
    first = enqueue(cluster_id, tasks=tasks).execute(context)
    second_operator = enqueue(cluster_id, tasks=tasks)
    calls = count_calls(second_operator, "SendMessageBatch")
    second = second_operator.execute(context)
    assert second["enqueued"] == 30 and calls[0] == 0
    assert queue_messages(first["queue_url"]) == 30


def test_interrupted_enqueue_resumes_after_the_recorded_point(aws, context, cluster_id):
    # Past the first PEEK_MESSAGES, which are read before the queues exist.
    tasks = [{"n": i} for i in range(PEEK_MESSAGES + 30)]
    broken_at = PEEK_MESSAGES + 22

    def source():
        for i, task in enumerate(tasks):
            if i == broken_at:
                raise RuntimeError("source broke")
            yield task

    with pytest.raises(AirflowException, match=f"stopped after {PEEK_MESSAGES + 20} tasks"):
        enqueue(cluster_id, tasks_callable=source).execute(context)
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    meta = hook.get_meta(TABLE, cluster_id)
    assert meta.enqueued == PEEK_MESSAGES + 20 and meta.enqueue_complete is False
    result = enqueue(cluster_id, tasks=tasks).execute(context)
    assert result["enqueued"] == len(tasks)
    ids = sorted(b["task_id"] for b in receive_all(result["queue_url"]))
    assert ids == [f"t{i:09d}" for i in range(len(tasks))]  # each once: resumed, not restarted


def test_a_source_that_breaks_before_the_first_send_creates_nothing(aws, context, cluster_id):
    def source():
        yield {"n": 0}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        enqueue(cluster_id, tasks_callable=source).execute(context)
    assert (
        boto3.client("sqs", region_name=REGION)
        .list_queues(QueueNamePrefix=QUEUE_NAME_PREFIX + cluster_id)
        .get("QueueUrls")
        is None
    )


def test_oversized_payload_is_refused_with_its_task_id(aws, context, cluster_id):
    tasks = [{"n": 0}, {"blob": "x" * MAX_MESSAGE_BYTES}]
    with pytest.raises(AirflowException, match=r"tasks\[1\]: task t000000001 is 1,048,.* 1,048,576 bytes"):
        enqueue(cluster_id, tasks=tasks).execute(context)


def test_large_messages_split_batches_under_the_request_limit(aws, context, cluster_id):
    tasks = [{"blob": "x" * 400_000} for _ in range(5)]
    operator = enqueue(cluster_id, tasks=tasks)
    calls = count_calls(operator, "SendMessageBatch")
    assert operator.execute(context)["enqueued"] == 5
    assert calls[0] == 3  # 2 + 2 + 1: each request stays under 1 MiB


def test_id_field_and_its_validation(aws, context, cluster_id):
    result = enqueue(cluster_id, tasks=[{"id": "a-1"}, {"id": "b.2"}], id_field="id").execute(context)
    assert sorted(b["task_id"] for b in receive_all(result["queue_url"])) == ["a-1", "b.2"]
    with pytest.raises(AirflowException, match=r"tasks\[1\]: task_id 'x' is taken by an earlier task"):
        enqueue(f"{cluster_id}-d", tasks=[{"id": "x"}, {"id": "x"}], id_field="id").execute(context)
    with pytest.raises(AirflowException, match="invalid"):
        enqueue(f"{cluster_id}-e", tasks=[{"id": "has space"}], id_field="id").execute(context)


def test_jsonl_from_s3_streams_and_names_bad_lines(aws, context, cluster_id):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="inputs")
    s3.put_object(Bucket="inputs", Key="ok.jsonl", Body=b'{"id": 1}\n\n{"id": 2}\n{"id": 3}\n')
    s3.put_object(Bucket="inputs", Key="bad.jsonl", Body=b'{"id": 1}\n{"id": \n')
    result = enqueue(cluster_id, s3_uri="s3://inputs/ok.jsonl").execute(context)
    assert result["enqueued"] == 3
    with pytest.raises(AirflowException, match="line 2 of s3_uri s3://inputs/bad.jsonl: not valid JSON"):
        enqueue(f"{cluster_id}-b", s3_uri="s3://inputs/bad.jsonl").execute(context)


def test_cluster_id_defaults_to_the_dag_run(aws, context):
    result = enqueue(None, tasks=[1]).execute(context)
    from airflow_ec2cluster.cluster import cluster_id_for

    assert result["cluster_id"] == cluster_id_for("plugin_test", context["run_id"])


def test_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        EC2ClusterEnqueueOperator(task_id="x", tasks=[1], s3_uri="s3://a/b")


def message_ids_peak_bytes(operator: EC2ClusterEnqueueOperator) -> int:
    """Peak memory allocated while the operator's messages are generated (and dropped) one by one."""
    import tracemalloc

    tracemalloc.start()
    try:
        for _ in operator.messages(hook=None):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_positional_ids_keep_no_set_so_memory_stays_flat():
    def source(count):
        return ({"id": f"u{i}"} for i in range(count))

    def peak(count, **kwargs):
        operator = EC2ClusterEnqueueOperator(
            task_id="enqueue", tasks_callable=source, tasks_callable_kwargs={"count": count}, **kwargs
        )
        return message_ids_peak_bytes(operator)

    # Positional: the same peak for 2,000 and 40,000 tasks. With id_field: every id is kept (duplicates).
    assert peak(40_000) < peak(2_000) + 64 * 1024
    assert peak(40_000, id_field="id") > peak(2_000, id_field="id") + 1_000_000


def tasks_of(bodies: list[dict]) -> list[tuple[str, object]]:
    return [(t["task_id"], t["payload"]) for body in bodies for t in body["tasks"]]


def test_ten_tasks_a_message_by_default(aws, context, cluster_id):
    operator = grouped(cluster_id, tasks=[{"n": i} for i in range(25)])
    calls = count_calls(operator, "SendMessageBatch")
    result = operator.execute(context)
    assert (result["enqueued"], result["enqueued_messages"], calls[0]) == (25, 3, 1)
    bodies = sorted(receive_all(result["queue_url"]), key=lambda body: body["tasks"][0]["task_id"])
    assert [len(body["tasks"]) for body in bodies] == [10, 10, 5]
    assert tasks_of(bodies) == [(f"t{i:09d}", {"n": i}) for i in range(25)]
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id)
    assert (meta.enqueued, meta.enqueued_messages, meta.tasks_per_message) == (25, 3, 10)


def test_a_group_closes_before_the_message_size_limit(aws, context, cluster_id):
    blob = "x" * 300_000  # three fit in 1 MiB, four do not
    result = grouped(cluster_id, tasks=[{"blob": blob} for _ in range(7)]).execute(context)
    assert (result["enqueued"], result["enqueued_messages"]) == (7, 3)
    sizes = sorted(len(body["tasks"]) for body in receive_all(result["queue_url"]))
    assert sizes == [1, 3, 3]


def test_interrupted_grouped_enqueue_resumes_with_the_same_grouping(aws, context, cluster_id):
    # Past the first PEEK_MESSAGES messages of 2 tasks, read before the queues exist.
    tasks = [{"n": i} for i in range(2 * PEEK_MESSAGES + 30)]
    broken_at = 2 * PEEK_MESSAGES + 24  # 111 messages of 2 are complete: 11 SendMessageBatch of 10 went out

    def source():
        for i, task in enumerate(tasks):
            if i == broken_at:
                raise RuntimeError("source broke")
            yield task

    with pytest.raises(AirflowException, match=f"stopped after {2 * PEEK_MESSAGES + 20} tasks"):
        grouped(cluster_id, tasks_callable=source, tasks_per_message=2).execute(context)
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id)
    assert (meta.enqueued, meta.enqueued_messages, meta.enqueue_complete) == (
        2 * PEEK_MESSAGES + 20,
        PEEK_MESSAGES + 10,
        False,
    )
    with pytest.raises(
        AirflowException, match="tasks_per_message: this cluster's enqueue was started with 2"
    ):
        grouped(cluster_id, tasks=tasks, tasks_per_message=3).execute(context)
    result = grouped(cluster_id, tasks=tasks, tasks_per_message=2).execute(context)
    assert (result["enqueued"], result["enqueued_messages"]) == (len(tasks), len(tasks) // 2)
    expected = [(f"t{i:09d}", {"n": i}) for i in range(len(tasks))]
    assert sorted(tasks_of(receive_all(result["queue_url"]))) == expected


@pytest.mark.parametrize("value", [0, 101, "10", 2.5, True])
def test_tasks_per_message_is_checked_before_anything_runs(value):
    with pytest.raises(ValueError, match=r"tasks_per_message: .* is not a whole number from 1 to 100; use 1"):
        EC2ClusterEnqueueOperator(task_id="x", tasks=[1], tasks_per_message=value)
