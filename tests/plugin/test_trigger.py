"""QueueDrainedTrigger in an event loop on the moto server: reaps, replaces, drains, survives restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import boto3
import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.calls import run_async
from airflow_ec2cluster.cluster import launch_client_token
from airflow_ec2cluster.drain.round import DrainSettings, drain_round
from airflow_ec2cluster.hooks.async_io import AsyncClusterIO
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.meta import PendingLaunch
from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator
from airflow_ec2cluster.triggers.ec2cluster import QueueDrainedTrigger
from tests.plugin.conftest import MOTO_AMI_ID, REGION, FakeTaskInstance, write_worker_status

TABLE = "ec2cluster-state-trigger"
COMMON = {"state_table": TABLE, "aws_conn_id": None, "region_name": REGION}
log = logging.getLogger(__name__)


@pytest.fixture
def cluster(aws_endpoint):
    cluster_id = f"trig-{uuid.uuid4().hex[:12]}"
    context = {"ti": FakeTaskInstance("trigger_test", cluster_id), "run_id": cluster_id}
    # One task per message: no worker runs here, so ten visible messages stand for ten tasks of work.
    enqueued = EC2ClusterEnqueueOperator(
        task_id="enqueue",
        cluster_id=cluster_id,
        tasks=[{"n": i} for i in range(10)],
        tasks_per_message=1,
        **COMMON,
    ).execute(context)
    descriptor = EC2ClusterLaunchOperator(
        task_id="launch",
        cluster_id=cluster_id,
        num_workers=2,
        image_id=MOTO_AMI_ID,
        instance_type="t3.micro",
        instance_profile=None,
        handler={"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
        **COMMON,
    ).execute(context)
    return {**enqueued, **descriptor}


def hook() -> EC2ClusterHook:
    return EC2ClusterHook(aws_conn_id=None, region_name=REGION)


def write_status(cluster_id: str, worker_id: str, **fields) -> None:
    write_worker_status(TABLE, cluster_id, worker_id, **fields)


def live_ids(cluster_id: str) -> set[str]:
    return {i["InstanceId"] for i in hook().list_cluster_instances(cluster_id, ("pending", "running"))}


def settings(**overrides) -> DrainSettings:
    return DrainSettings(state_table=TABLE, drained_checks=2, **overrides)


async def one_round(cluster_id: str, **overrides):
    async with AsyncClusterIO.open(hook()) as io:
        return await run_async(drain_round(cluster_id, settings(**overrides), log), io)


def test_round_reaps_a_hung_worker_and_launches_one_replacement(cluster):
    cid = cluster["cluster_id"]
    healthy, hung = cluster["instance_ids"]
    write_status(cid, healthy)
    write_status(cid, hung, heartbeat_at=int(time.time() - 1000))
    outcome = asyncio.run(one_round(cid, heartbeat_timeout=60))
    assert not outcome.drained and outcome.failure is None and len(outcome.launched) == 1
    live = live_ids(cid)
    assert hung not in live and healthy in live and len(live) == 2
    meta = hook().get_meta(TABLE, cid)
    assert meta.replacements_launched == 1 and meta.reaped_total == 1
    assert len(meta.instance_ids) == 3 and meta.pending_launch is None
    # The next round sees a full cluster: nothing more is launched.
    write_status(cid, outcome.launched[0])
    again = asyncio.run(one_round(cid, heartbeat_timeout=60))
    assert again.launched == () and live_ids(cid) == live


def test_two_triggers_at_once_never_exceed_the_cluster_size(cluster):
    cid = cluster["cluster_id"]
    # Both instances gone (spot interruption): two rounds at once both see an empty cluster with work left.
    # (Not two rounds reaping the same instance at once: moto's TerminateInstances is not safe for that.)
    hook().terminate_instances(cluster["instance_ids"], wait=False)

    async def two_rounds():
        return await asyncio.gather(
            one_round(cid, heartbeat_timeout=60), one_round(cid, heartbeat_timeout=60)
        )

    asyncio.run(two_rounds())
    assert len(live_ids(cid)) == 2
    meta = hook().get_meta(TABLE, cid)
    assert meta.replacements_launched == 2 and meta.pending_launch is None


def test_a_restarted_trigger_finishes_a_launch_claimed_before_the_restart(cluster):
    cid = cluster["cluster_id"]
    healthy, hung = cluster["instance_ids"]
    write_status(cid, healthy)
    write_status(cid, hung, heartbeat_at=int(time.time() - 1000))
    hook().terminate_instances([hung], wait=False)
    # The triggerer died after claiming replacement 0 and before RunInstances returned.
    pending = PendingLaunch(generation=0, count=1, token=launch_client_token(cid, 0, 1))
    assert hook().claim_replacement_launch(TABLE, cid, pending)
    assert not hook().claim_replacement_launch(TABLE, cid, pending)
    first = asyncio.run(one_round(cid, heartbeat_timeout=60))
    assert len(first.launched) == 1 and len(live_ids(cid)) == 2
    # And the same launch finished again (a second restart) adopts the tagged instance instead of launching.
    assert asyncio.run(one_round(cid, heartbeat_timeout=60)).launched == ()
    meta = hook().get_meta(TABLE, cid)
    assert len(live_ids(cid)) == 2 and meta.replacements_launched == 1 and meta.pending_launch is None


def drain_queue(queue_url: str) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )


def test_trigger_run_yields_the_summary_when_drained(cluster):
    cid = cluster["cluster_id"]
    drain_queue(cluster["queue_url"])
    boto3.client("sqs", region_name=REGION).send_message(
        QueueUrl=cluster["dlq_url"], MessageBody=json.dumps({"task_id": "t000000009", "payload": {}})
    )
    with boto3.resource("dynamodb", region_name=REGION).Table(TABLE).batch_writer() as batch:
        for i in range(10):
            task_id = f"t{i:09d}"
            status = {"status": "failed", "error": "ValueError: bad tweet"} if i == 9 else {"status": "done"}
            batch.put_item(Item={**records.task_log_key(cid, task_id), "task_id": task_id, **status})
    for iid in cluster["instance_ids"]:
        write_status(cid, iid, busy=False, idle_since=int(time.time()), tasks_done=4)
    trigger = QueueDrainedTrigger(
        cluster_id=cid, settings=settings().to_dict(), poll_interval=0, aws_conn_id=None, region_name=REGION
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_ec2cluster.triggers.ec2cluster.QueueDrainedTrigger"
    rebuilt = QueueDrainedTrigger(**kwargs)

    async def events():
        return [event.payload async for event in rebuilt.run()]

    (event,) = asyncio.run(asyncio.wait_for(events(), timeout=60))
    assert event["status"] == "success"
    summary = event["summary"]
    assert summary["tasks_done"] == 9 and summary["tasks_failed"] == 1 and summary["dead_lettered"] == 1
    assert summary["dead_letters"] == [{"task_id": "t000000009", "error": "ValueError: bad tweet"}]


def test_trigger_reports_failure_when_no_worker_can_run_the_work(cluster):
    cid = cluster["cluster_id"]
    for iid in cluster["instance_ids"]:
        write_status(cid, iid, heartbeat_at=int(time.time() - 1000))
    trigger = QueueDrainedTrigger(
        cluster_id=cid,
        settings=settings(replace_reaped=False, heartbeat_timeout=60).to_dict(),
        poll_interval=0,
        aws_conn_id=None,
        region_name=REGION,
    )

    async def events():
        return [event.payload async for event in trigger.run()]

    (event,) = asyncio.run(events())
    assert event["status"] == "failure" and "replace_reaped is off" in event["message"]
    assert live_ids(cid) == set()


def test_calls_per_round_match_the_sync_poke(cluster):
    cid = cluster["cluster_id"]
    for iid in cluster["instance_ids"]:
        write_status(cid, iid)

    async def counted_round():
        calls: list[str] = []
        async with AsyncClusterIO.open(hook()) as io:
            for client in (io.sqs, io.ec2, io.dynamodb):
                client.meta.events.register("before-call", lambda model, **_: calls.append(model.name))
            await run_async(drain_round(cid, settings(), log), io)
        return calls

    calls = asyncio.run(counted_round())
    assert sorted(calls) == sorted(
        ["GetItem", "GetQueueAttributes", "GetQueueAttributes", "DescribeInstances", "Query"]
    ), calls


def test_a_round_in_the_triggerer_stops_early_on_a_repeated_start_up_failure_of_gone_instances(cluster):
    # The instances are gone before any round saw them; their status items say why they stopped.
    cid = cluster["cluster_id"]
    boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=cluster["instance_ids"])
    reason = "startup-failed: handler.target: cannot import module 'jobs' (ModuleNotFoundError: ...)"
    now = time.time()
    for n, worker_id in enumerate(["i-a", "i-b", "i-c"]):
        write_status(
            cid, worker_id, state="stopped", busy=False, heartbeat_at=int(now - 10 + n), stop_reason=reason
        )
    logged = []

    class Log:
        def __getattr__(self, level):
            return lambda message, *args: logged.append((level, message % args))

    async def round_():
        async with AsyncClusterIO.open(hook()) as io:
            return await run_async(drain_round(cid, settings(), Log()), io)

    outcome = asyncio.run(round_())
    assert "3 workers in a row failed at start with the same error" in outcome.failure
    assert "ModuleNotFoundError" in outcome.failure and outcome.launched == ()
    assert live_ids(cid) == set()
    stops = [text for level, text in logged if text.startswith("Worker ")]
    assert sorted(stops) == [f"Worker {w} stopped: {reason}" for w in ("i-a", "i-b", "i-c")]
    # Logged once: the next round does not repeat them.
    logged.clear()
    asyncio.run(round_())
    assert not [text for _, text in logged if text.startswith("Worker ")]
