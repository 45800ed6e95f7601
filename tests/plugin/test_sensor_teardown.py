"""QueueDrainedSensor pokes on a cluster whose worker status items the test writes; teardown."""

from __future__ import annotations

import json
import logging
import time

import boto3
import pytest
from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException
from ec2cluster_worker import records

from airflow_ec2cluster.calls import run_sync
from airflow_ec2cluster.cluster import QUEUE_NAME_PREFIX, TAG_CLUSTER_ID, task_queue_name
from airflow_ec2cluster.drain.round import drain_round
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import (
    EC2ClusterLaunchOperator,
    EC2ClusterTeardownOperator,
)
from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor
from tests.plugin.conftest import REGION, enqueue_and_launch, write_worker_status

TABLE = "ec2cluster-state-test"
COMMON = {"state_table": TABLE, "aws_conn_id": None, "region_name": REGION}


@pytest.fixture
def cluster(aws, context, cluster_id, ami_id, instance_profile):
    return enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=20)


def sensor(cluster_id: str, **kwargs) -> QueueDrainedSensor:
    params = {"task_id": "drain", "cluster_id": cluster_id, "poke_interval": 0, "drained_checks": 2, **COMMON}
    params.update(kwargs)
    return QueueDrainedSensor(**params)


def write_status(cluster_id: str, worker_id: str, **fields) -> None:
    write_worker_status(TABLE, cluster_id, worker_id, **fields)


def write_task_log(cluster_id: str, count: int, status: str = "done") -> None:
    with boto3.resource("dynamodb", region_name=REGION).Table(TABLE).batch_writer() as batch:
        for i in range(count):
            task_id = f"t{i:09d}"
            batch.put_item(
                Item={**records.task_log_key(cluster_id, task_id), "task_id": task_id, "status": status}
            )


def drain_queue(queue_url: str) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )


def live_ids(cluster_id: str) -> set[str]:
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    return {i["InstanceId"] for i in hook.list_cluster_instances(cluster_id, ("pending", "running"))}


def test_healthy_busy_cluster_keeps_waiting(cluster, context):
    for iid in cluster["instance_ids"]:
        write_status(cluster["cluster_id"], iid)
    assert sensor(cluster["cluster_id"]).poke(context) is False
    assert live_ids(cluster["cluster_id"]) == set(cluster["instance_ids"])


def test_hung_worker_is_reaped_and_replaced(cluster, context):
    healthy, hung = cluster["instance_ids"]
    write_status(cluster["cluster_id"], healthy)
    write_status(cluster["cluster_id"], hung, heartbeat_at=int(time.time() - 1000))
    assert sensor(cluster["cluster_id"], heartbeat_timeout=60).poke(context) is False
    live = live_ids(cluster["cluster_id"])
    assert hung not in live and healthy in live and len(live) == 2
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster["cluster_id"])
    assert meta.replacements_launched == 1 and meta.reaped_total == 1 and len(meta.instance_ids) == 3


def test_a_reached_max_cost_stops_replacements_and_says_so(
    aws, context, cluster_id, ami_id, instance_profile
):
    # A cap any instance-second reaches: the hung worker is reaped and not replaced.
    capped = enqueue_and_launch(context, cluster_id, ami_id, TABLE, tasks=20, max_cost=1e-9)
    healthy, hung = capped["instance_ids"]
    write_status(cluster_id, healthy)
    write_status(cluster_id, hung, heartbeat_at=int(time.time() - 1000))
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    assert hook.get_meta(TABLE, cluster_id).max_cost == 1e-9
    settings = sensor(cluster_id, heartbeat_timeout=60).settings()
    outcome = run_sync(drain_round(cluster_id, settings, logging.getLogger(__name__)), hook)
    assert outcome.failure is None and outcome.launched == ()
    assert "reached max_cost $0.0000000010: no replacement or scale-out is launched" in outcome.progress
    assert live_ids(cluster_id) == {healthy}
    assert hook.get_meta(TABLE, cluster_id).replacements_launched == 0
    # Once the last worker is gone too, the work left can never run: the drain fails, naming the cap.
    write_status(cluster_id, healthy, heartbeat_at=int(time.time() - 1000))
    with pytest.raises(
        AirflowFailException, match=r"reached max_cost \$0.0000000010, .*raise the launch's max_cost"
    ):
        sensor(cluster_id, heartbeat_timeout=60).poke(context)


def test_fails_fast_when_no_worker_can_run_the_work(cluster, context):
    for iid in cluster["instance_ids"]:
        write_status(cluster["cluster_id"], iid, heartbeat_at=int(time.time() - 1000))
    with pytest.raises(AirflowFailException, match="20 messages of tasks remain .* replace_reaped is off"):
        sensor(cluster["cluster_id"], replace_reaped=False).poke(context)
    assert live_ids(cluster["cluster_id"]) == set()


def test_drained_after_consecutive_empty_checks_returns_the_summary(cluster, context):
    cid = cluster["cluster_id"]
    drain_queue(cluster["queue_url"])
    boto3.client("sqs", region_name=REGION).send_message(
        QueueUrl=cluster["dlq_url"], MessageBody=json.dumps({"task_id": "t000000019", "payload": {}})
    )
    write_task_log(cid, 19)
    for iid in cluster["instance_ids"]:
        # Worker counters lag (a killed worker): the exact task-log count settles it.
        write_status(cid, iid, busy=False, idle_since=int(time.time()), tasks_done=5)
    drain = sensor(cid)
    assert drain.poke(context) is False
    result = drain.poke(context)
    assert isinstance(result, PokeReturnValue) and result.is_done
    summary = result.xcom_value
    assert summary["tasks_done"] == 19 and summary["dead_lettered"] == 1 and summary["enqueued"] == 20
    assert summary["dead_lettered_task_ids"] == ["t000000019"]
    assert summary["workers_used"] == 2 and summary["instance_seconds"] > 0
    # What it cost: the two t3.micro on-demand instances' EC2 time at the price table's figure.
    (pool,) = summary["instance_seconds_by_pool"]
    assert (pool["instance_type"], pool["market"], pool["usd_per_hour"]) == ("t3.micro", "on-demand", 0.0104)
    assert pool["instance_seconds"] == summary["instance_seconds"]
    assert summary["estimated_cost_usd"] == round(summary["instance_seconds"] / 3600 * 0.0104, 4)
    assert summary["cost_unknown_instance_seconds"] == 0 and summary["on_demand_prices_as_of"]
    assert summary["max_cost"] is None and summary["max_cost_reached"] is False


def test_execute_returns_the_summary_as_xcom(cluster, context):
    drain_queue(cluster["queue_url"])
    write_task_log(cluster["cluster_id"], 20)
    summary = sensor(cluster["cluster_id"], drained_checks=3).execute(context)
    assert summary["tasks_done"] == 20 and summary["tasks_failed"] == 0


def count_calls_per_poke(cluster_id: str, context) -> int:
    drain = sensor(cluster_id)
    hook = drain.hook
    calls: list[str] = []
    for client in (hook.sqs, hook.ec2, hook.dynamodb):
        client.meta.events.register("before-call", lambda model, **_: calls.append(model.name))
    assert drain.poke(context) is False
    return len(calls)


def test_api_calls_per_poke_do_not_grow_with_logged_tasks(aws, context, ami_id, instance_profile):
    counts = []
    for logged in (100, 10_000):
        cid = f"calls-{logged}-{int(time.time() * 1000) % 100000}"
        descriptor = enqueue_and_launch(context, cid, ami_id, TABLE, tasks=3)
        write_task_log(cid, logged)
        for iid in descriptor["instance_ids"]:
            write_status(cid, iid, tasks_done=logged // 2)
        counts.append(count_calls_per_poke(cid, context))
    assert counts[0] == counts[1] <= 6, counts


def test_teardown_terminates_every_state_and_deletes_queues(cluster, context):
    cid = cluster["cluster_id"]
    ec2 = boto3.client("ec2", region_name=REGION)
    ec2.stop_instances(InstanceIds=[cluster["instance_ids"][0]])
    sqs = boto3.client("sqs", region_name=REGION)
    sqs.purge_queue(
        QueueUrl=sqs.get_queue_url(QueueName=task_queue_name(cid))["QueueUrl"]
    )  # the work is done
    result = EC2ClusterTeardownOperator(
        task_id="teardown", cluster_id=cid, delete_queues=True, waiter_delay=1, **COMMON
    ).execute(context)
    assert sorted(result["terminated"]) == sorted(cluster["instance_ids"]) and result["queues_deleted"]
    states = {
        i["State"]["Name"]
        for r in ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cid]}])[
            "Reservations"
        ]
        for i in r["Instances"]
    }
    assert states == {"terminated"}
    queues = (
        boto3.client("sqs", region_name=REGION)
        .list_queues(QueueNamePrefix=QUEUE_NAME_PREFIX + cid)
        .get("QueueUrls", [])
    )
    assert queues == []
    # The final cost: both instances, ended (one stopped first), at the table's price; META keeps their
    # usage, so the figure holds once EC2 no longer lists them.
    cost = result["cost"]
    (pool,) = cost["instance_seconds_by_pool"]
    assert (pool["instance_type"], pool["market"], pool["usd_per_hour"]) == ("t3.micro", "on-demand", 0.0104)
    assert cost["cost_unknown_instance_seconds"] == 0 and cost["instance_seconds"] >= 0
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cid)
    assert sorted(meta.instance_usage) == sorted(cluster["instance_ids"])
    assert all(usage["end"] is not None for usage in meta.instance_usage.values())
    again = EC2ClusterTeardownOperator(task_id="teardown2", cluster_id=cid, **COMMON).execute(context)
    assert again["terminated"] == [] and again["cost"]["instance_seconds"] == cost["instance_seconds"]


def test_teardown_keeps_queues_that_still_hold_work_for_a_re_run(cluster, context):
    cid = cluster["cluster_id"]
    result = EC2ClusterTeardownOperator(
        task_id="teardown", cluster_id=cid, delete_queues=True, waiter_delay=1, **COMMON
    ).execute(context)
    assert sorted(result["terminated"]) == sorted(cluster["instance_ids"]) and not result["queues_deleted"]
    queues = (
        boto3.client("sqs", region_name=REGION)
        .list_queues(QueueNamePrefix=QUEUE_NAME_PREFIX + cid)
        .get("QueueUrls", [])
    )
    assert len(queues) == 2


def test_teardown_works_as_an_airflow_teardown_task():
    from airflow.sdk import DAG

    with DAG("teardown_shape", schedule=None):
        launch = EC2ClusterLaunchOperator(
            task_id="launch", num_workers=1, image_id="ami-1", instance_type="t3.micro", handler={}
        )
        drain = QueueDrainedSensor(task_id="drain")
        teardown = EC2ClusterTeardownOperator(task_id="teardown")
        launch >> drain >> teardown.as_teardown(setups=launch)
    assert teardown.is_teardown and launch.is_setup
    assert teardown.trigger_rule == "all_done_setup_success"
