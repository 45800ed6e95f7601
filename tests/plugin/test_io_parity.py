"""The sensor (hook, sync) and the trigger (AsyncClusterIO, aiobotocore) send the same requests for a round.

One drain round is driven with ``run_sync`` on an EC2ClusterHook and with ``run_async`` on an
AsyncClusterIO, each over recording fakes of the botocore clients that answer from the same fixed world;
the sequences of (service, operation, arguments) must be identical, and so must the outcomes.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.aws.dynamodb import deserialize_item, serialize_item
from airflow_ec2cluster.calls import run_async, run_sync
from airflow_ec2cluster.cluster import LaunchSpec, launch_client_token
from airflow_ec2cluster.drain.round import DrainSettings, drain_round
from airflow_ec2cluster.hooks.async_io import AsyncClusterIO
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from tests.plugin.conftest import REGION

NOW = 1_700_000_000.0
CLUSTER = "parity-1"
TABLE = "parity-state"
QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/parity-1-tasks"
DLQ = "https://sqs.us-east-1.amazonaws.com/123456789012/parity-1-dlq"
SHARDS = 4
log = logging.getLogger(__name__)

Call = tuple[str, str, dict[str, Any]]


class World:
    """Fixed answers for every call a round makes; the same for both runs (nothing is mutated)."""

    def __init__(
        self,
        *,
        meta: dict[str, Any],
        main: dict[str, str],
        dead: dict[str, str],
        instances: list[dict[str, Any]],
        workers: list[dict[str, Any]],
        token_instances: list[dict[str, Any]] = (),
        task_log: list[dict[str, Any]] = (),
        dead_letters: list[dict[str, Any]] = (),
        ended: list[dict[str, Any]] = (),
        consoles: dict[str, str] | None = None,
        log_events: list[dict[str, Any]] = (),
    ) -> None:
        self.log_events = list(log_events)
        self.ended, self.consoles = list(ended), dict(consoles or {})
        self.meta, self.main, self.dead = meta, main, dead
        self.instances, self.token_instances = instances, list(token_instances)
        self.workers, self.task_log, self.dead_letters = workers, list(task_log), list(dead_letters)

    def answer(self, service: str, operation: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, f"{service}_{operation}")
        return handler(**kwargs)

    # DynamoDB
    def dynamodb_get_item(self, **kwargs: Any) -> dict[str, Any]:
        return {"Item": serialize_item(self.meta)}

    def dynamodb_update_item(self, **kwargs: Any) -> dict[str, Any]:
        return {} if "ConditionExpression" in kwargs else {"Attributes": serialize_item(self.meta)}

    def dynamodb_query(self, **kwargs: Any) -> dict[str, Any]:
        pk = deserialize_item(kwargs["ExpressionAttributeValues"])[":pk"]
        items = self.workers if pk == records.workers_pk(CLUSTER) else self.task_log
        return {"Items": [serialize_item(i) for i in items if i[records.PK] == pk]}

    def dynamodb_batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        keys = [deserialize_item(key) for key in RequestItems[TABLE]["Keys"]]
        found = [i for i in self.task_log if {records.PK: i[records.PK], records.SK: i[records.SK]} in keys]
        return {"Responses": {TABLE: [serialize_item(i) for i in found]}}

    # SQS
    def sqs_get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        return {"Attributes": self.main if QueueUrl == QUEUE else self.dead}

    def sqs_receive_message(self, **kwargs: Any) -> dict[str, Any]:
        return {"Messages": self.dead_letters}

    def sqs_change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        return {"Successful": [{"Id": entry["Id"]} for entry in kwargs["Entries"]]}

    # CloudWatch Logs (events with timestamps at or after startTime, at most limit)
    def logs_filter_log_events(self, **kwargs: Any) -> dict[str, Any]:
        found = [e for e in self.log_events if e["timestamp"] >= kwargs.get("startTime", 0)]
        return {"events": found[: kwargs["limit"]]}

    # EC2
    def ec2_describe_instances(
        self, Filters: list[dict[str, Any]] | None = None, InstanceIds: list[str] | None = None
    ) -> dict[str, Any]:
        if InstanceIds is not None:
            return {
                "Reservations": [{"Instances": [i for i in self.ended if i["InstanceId"] in InstanceIds]}]
            }
        by_token = any(f["Name"].endswith("launch-token") for f in Filters)
        instances = self.token_instances if by_token else self.instances
        return {"Reservations": [{"Instances": instances}]}

    def ec2_describe_spot_price_history(self, InstanceTypes: list[str], **kwargs: Any) -> dict[str, Any]:
        zones = ("us-east-1a", "us-east-1b")
        return {
            "SpotPriceHistory": [
                {
                    "InstanceType": t,
                    "AvailabilityZone": z,
                    "ProductDescription": "Linux/UNIX",
                    "SpotPrice": "0.0400",
                    "Timestamp": datetime.fromtimestamp(NOW - 60, tz=timezone.utc),
                }
                for t in InstanceTypes
                for z in zones
            ]
        }

    def ec2_get_console_output(self, InstanceId: str, Latest: bool) -> dict[str, Any]:
        return {
            "InstanceId": InstanceId,
            "Output": base64.b64encode(self.consoles[InstanceId].encode()).decode(),
        }

    def ec2_terminate_instances(self, InstanceIds: list[str]) -> dict[str, Any]:
        return {"TerminatingInstances": [{"InstanceId": iid} for iid in InstanceIds]}

    def ec2_create_launch_template(self, **kwargs: Any) -> dict[str, Any]:
        return {
            "LaunchTemplate": {"LaunchTemplateId": "lt-1", "LaunchTemplateName": kwargs["LaunchTemplateName"]}
        }

    def ec2_create_fleet(self, **kwargs: Any) -> dict[str, Any]:
        override = kwargs["LaunchTemplateConfigs"][0]["Overrides"][0]
        return {
            "FleetId": "fleet-1",
            "Instances": [
                {
                    "InstanceIds": ["i-new"],
                    "InstanceType": override["InstanceType"],
                    "Lifecycle": "on-demand",
                    "LaunchTemplateAndOverrides": {"Overrides": override},
                }
            ],
            "Errors": [],
        }


class Recorder:
    def __init__(self, world: World) -> None:
        self.world = world
        self.calls: list[Call] = []

    def __call__(self, service: str, operation: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((service, operation, copy.deepcopy(kwargs)))
        return self.world.answer(service, operation, kwargs)


class FakeClient:
    """A botocore client's surface as the hook uses it: operations and paginators, one page each."""

    def __init__(self, service: str, record: Recorder) -> None:
        self.service, self.record = service, record

    def __getattr__(self, operation: str):
        if operation.startswith("_"):
            raise AttributeError(operation)
        return lambda **kwargs: self.record(self.service, operation, kwargs)

    def get_paginator(self, operation: str):
        client = self

        class Paginator:
            def paginate(self, **kwargs: Any):
                return iter([client.record(client.service, operation, kwargs)])

        return Paginator()


class FakeAsyncClient(FakeClient):
    """An aiobotocore client's surface: awaited operations, async-iterated paginators."""

    def __getattr__(self, operation: str):
        if operation.startswith("_"):
            raise AttributeError(operation)

        async def call(**kwargs: Any) -> dict[str, Any]:
            return self.record(self.service, operation, kwargs)

        return call

    def get_paginator(self, operation: str):
        client = self

        class Paginator:
            def paginate(self, **kwargs: Any):
                async def pages():
                    yield client.record(client.service, operation, kwargs)

                return pages()

        return Paginator()


def instance(iid: str, launched: float, state: str = "running", **fields: Any) -> dict[str, Any]:
    return {
        "InstanceId": iid,
        "State": {"Name": state},
        "LaunchTime": datetime.fromtimestamp(launched, tz=timezone.utc),
        **fields,
    }


def worker(iid: str, **fields: Any) -> dict[str, Any]:
    return {
        records.PK: records.workers_pk(CLUSTER),
        records.SK: iid,
        "worker_id": iid,
        "state": "running",
        "started_at": int(NOW - 900),
        "heartbeat_at": int(NOW - 5),
        "busy": True,
        "busy_since": int(NOW - 5),
        "tasks_done": 0,
        "tasks_failed": 0,
        **fields,
    }


def meta(log_group: str | None = None, **fields: Any) -> dict[str, Any]:
    spec = LaunchSpec(
        image_id="ami-1",
        instance_type="t3.micro",
        user_data_b64=base64.b64encode(b"#!").decode(),
        log_group=log_group,
    )
    # The attribute names as the item holds them in the table (this test sees the wire, not the record).
    return {
        records.PK: records.cluster_pk(CLUSTER),
        records.SK: records.META_SK,
        "cluster_id": CLUSTER,
        "queue_url": QUEUE,
        "dlq_url": DLQ,
        "enqueued": 10,
        "enqueued_messages": 10,
        "enqueue_complete": True,
        "num_workers": 2,
        "log_shards": SHARDS,
        "launch_spec": json.dumps(spec.to_dict()),
        "instance_ids": ["i-1", "i-2"],
        "launched_at": NOW - 1000,
        **fields,
    }


def replace_a_hung_worker() -> World:
    return World(
        meta=meta(),
        main={"ApproximateNumberOfMessages": "5"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[instance("i-1", NOW - 1000), instance("i-2", NOW - 1000)],
        workers=[worker("i-1"), worker("i-2", heartbeat_at=int(NOW - 1000))],
    )


def finish_a_claimed_launch() -> World:
    token = launch_client_token(CLUSTER, 0, 1)
    return World(
        meta=meta(pending_launch={"generation": 0, "count": 1, "token": token}),
        main={"ApproximateNumberOfMessages": "5"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[instance("i-1", NOW - 1000), instance("i-3", NOW - 10, "pending")],
        token_instances=[instance("i-3", NOW - 10, "pending")],
        workers=[worker("i-1")],
        ended=[instance("i-2", NOW - 1000, "terminated")],
        consoles={"i-2": "boot\nec2cluster: bootstrap finished with status 0\n"},
    )


def explain_a_boot_failure() -> World:
    """i-2 and i-3 ended without a status item; their consoles say why (i-3's named no cause)."""
    line = "ec2cluster: startup-failed: cannot reach sqs (sqs.us-east-1.amazonaws.com:443): timed out"
    return World(
        meta=meta(instance_ids=["i-1", "i-2", "i-3"]),
        main={"ApproximateNumberOfMessages": "5"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[instance("i-1", NOW - 1000)],
        workers=[worker("i-1")],
        ended=[instance("i-2", NOW - 1000, "terminated"), instance("i-3", NOW - 1000, "shutting-down")],
        consoles={"i-2": f"[  3.1] cloud-init[990]: {line}\n", "i-3": ""},
    )


def reap_a_never_booted_instance() -> World:
    """i-2 runs, 1,000 s after launch, with no status item: reaped, and its console read."""
    return World(
        meta=meta(),
        main={"ApproximateNumberOfMessages": "5"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[instance("i-1", NOW - 1000), instance("i-2", NOW - 1000)],
        workers=[worker("i-1")],
        consoles={
            "i-2": "Cloud-init v. 24.1 running\n\nCollecting torch\n  Downloading torch-2.5.1.whl (906 MB)\n"
        },
    )


def failed_task_event(n: int, at: float, task_id: str) -> dict[str, Any]:
    line = {
        "ts": at,
        "level": "warning",
        "event": "task.failed",
        "worker_id": "i-1",
        "task_id": task_id,
        "attempt": 1,
        "error": f"ValueError: bad payload {n}",
        "detail": f'Traceback (most recent call last):\n  File "h.py", line 3\nValueError: bad payload {n}',
    }
    return {
        "eventId": f"e{n}",
        "logStreamName": "i-1",
        "timestamp": int(at * 1000),
        "message": json.dumps(line),
    }


def show_failed_tasks() -> World:
    """Tasks failed since the last round: the drain's log shows their errors from the log group."""
    return World(
        meta=meta(log_group=f"/ec2cluster/{CLUSTER}"),
        main={"ApproximateNumberOfMessages": "5"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[instance("i-1", NOW - 1000), instance("i-2", NOW - 1000)],
        workers=[worker("i-1", tasks_failed=5), worker("i-2", tasks_failed=3)],  # what they counted
        log_events=[failed_task_event(n, NOW - 30 + n, f"t{n:09d}") for n in range(8)],
    )


def drained_with_a_dead_letter() -> World:
    dead_id = "t000000009"
    task_log = [
        {**records.task_log_key(CLUSTER, f"t{i:09d}", SHARDS), "task_id": f"t{i:09d}", "status": "done"}
        for i in range(9)
    ]
    task_log.append(
        {
            **records.task_log_key(CLUSTER, dead_id, SHARDS),
            "task_id": dead_id,
            "status": "failed",
            "error": "E",
        }
    )
    body = json.dumps({"task_id": dead_id, "payload": {}})
    return World(
        meta=meta(consecutive_empty=1),
        main={"ApproximateNumberOfMessages": "0"},
        dead={"ApproximateNumberOfMessages": "1"},
        instances=[instance("i-1", NOW - 1000), instance("i-2", NOW - 1000)],
        workers=[
            worker("i-1", busy=False, idle_since=int(NOW - 10), tasks_done=5),
            worker("i-2", busy=False, idle_since=int(NOW - 10), tasks_done=4),
        ],
        task_log=task_log,
        dead_letters=[{"MessageId": "m-1", "ReceiptHandle": "r-1", "Body": body}],
    )


def drained_at_a_cost() -> World:
    """Drained: i-1 ran an hour on-demand, i-2 half an hour on spot (terminated, as EC2 stamped it), i-3 an
    hour of a type the price table lacks; the spot price is looked up once and kept in META."""
    task_log = [
        {**records.task_log_key(CLUSTER, f"t{i:09d}", SHARDS), "task_id": f"t{i:09d}", "status": "done"}
        for i in range(10)
    ]
    where = {"Placement": {"AvailabilityZone": "us-east-1a"}}
    ended_at = datetime.fromtimestamp(NOW - 1800, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return World(
        meta=meta(consecutive_empty=1, region="us-east-1", max_cost=5, instance_ids=["i-1", "i-2", "i-3"]),
        main={"ApproximateNumberOfMessages": "0"},
        dead={"ApproximateNumberOfMessages": "0"},
        instances=[
            instance("i-1", NOW - 3600, InstanceType="t3.micro", **where),
            instance(
                "i-2",
                NOW - 3600,
                "terminated",
                InstanceType="m5.large",
                InstanceLifecycle="spot",
                StateTransitionReason=f"User initiated ({ended_at} GMT)",
                **where,
            ),
            instance("i-3", NOW - 3600, InstanceType="x9.unpriced", **where),
        ],
        workers=[
            worker("i-1", busy=False, idle_since=int(NOW - 10), tasks_done=5),
            worker(
                "i-2", state="stopped", stop_reason="queue-empty", busy=False, heartbeat_at=int(NOW - 1800)
            ),
            worker("i-3", busy=False, idle_since=int(NOW - 10), tasks_done=5),
        ],
        task_log=task_log,
    )


def run_both(world: World, settings: DrainSettings):
    sync_record, async_record = Recorder(world), Recorder(world)
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    services = ("sqs", "ec2", "dynamodb", "logs")
    fakes = {service: FakeClient(service, sync_record) for service in services}
    hook.client = fakes.__getitem__  # the hook's clients, without a session
    sync_outcome = run_sync(drain_round(CLUSTER, settings, log), hook)
    io = AsyncClusterIO({service: FakeAsyncClient(service, async_record) for service in services})
    async_outcome = asyncio.run(run_async(drain_round(CLUSTER, settings, log), io))
    return sync_record.calls, async_record.calls, sync_outcome, async_outcome


@pytest.mark.parametrize(
    ("world", "expected"),
    [
        (
            replace_a_hung_worker,
            {"terminate_instances", "create_launch_template", "create_fleet", "update_item"},
        ),
        (finish_a_claimed_launch, {"update_item", "get_console_output"}),
        (explain_a_boot_failure, {"describe_instances", "get_console_output", "update_item"}),
        (reap_a_never_booted_instance, {"terminate_instances", "get_console_output", "update_item"}),
        (show_failed_tasks, {"filter_log_events", "update_item"}),
        (
            drained_with_a_dead_letter,
            {"receive_message", "change_message_visibility_batch", "batch_get_item", "update_item"},
        ),
        (drained_at_a_cost, {"describe_spot_price_history", "update_item"}),
    ],
)
def test_sync_and_async_rounds_send_the_same_requests(monkeypatch, world, expected):
    monkeypatch.setattr(time, "time", lambda: NOW)
    settings = DrainSettings(state_table=TABLE, heartbeat_timeout=60, drained_checks=2)
    sync_calls, async_calls, sync_outcome, async_outcome = run_both(world(), settings)
    assert sync_calls == async_calls
    assert expected <= {operation for _, operation, _ in sync_calls}
    assert sync_outcome == async_outcome


def test_the_rounds_end_as_their_scenarios_say(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    settings = DrainSettings(state_table=TABLE, heartbeat_timeout=60, drained_checks=2)
    *_, replaced = run_both(replace_a_hung_worker(), settings)
    assert replaced.launched == ("i-new",) and [r.instance_id for r in replaced.decision.reap] == ["i-2"]
    *_, finished = run_both(finish_a_claimed_launch(), settings)
    assert finished.launched == ("i-3",)
    *_, drained = run_both(drained_with_a_dead_letter(), settings)
    assert drained.drained and drained.summary["dead_letters"] == [{"task_id": "t000000009", "error": "E"}]
    assert drained.summary["tasks_done"] == 9 and drained.summary["tasks_failed"] == 1
    *_, explained = run_both(explain_a_boot_failure(), settings)
    stops = dict(explained.decision.stops)
    assert stops["i-2"].startswith("startup-failed: cannot reach sqs (sqs.us-east-1.amazonaws.com:443)")
    assert "i-3" not in stops  # its console named no cause: no evidence either way
    calls, _, _, reaped = run_both(reap_a_never_booted_instance(), settings)
    assert [r.instance_id for r in reaped.decision.reap] == ["i-2"]
    assert "i-2" not in dict(reaped.decision.stops)  # no cause named: no start-up failure counted
    # The console's last lines are kept in META, for the summary and a failure message.
    values = [
        value
        for _, operation, kwargs in calls
        if operation == "update_item"
        for value in deserialize_item(kwargs["ExpressionAttributeValues"]).values()
    ]
    (failures,) = [v for v in values if isinstance(v, dict) and "i-2" in v]
    assert failures["i-2"]["reason"] == ""
    assert failures["i-2"]["console"] == [
        "Cloud-init v. 24.1 running",
        "Collecting torch",
        "  Downloading torch-2.5.1.whl (906 MB)",
    ]


def test_a_drained_summary_states_the_cost_by_pool(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    settings = DrainSettings(state_table=TABLE, heartbeat_timeout=60, drained_checks=2)
    calls, _, drained, _ = run_both(drained_at_a_cost(), settings)
    summary = drained.summary
    assert drained.drained
    pools = {p["instance_type"]: p for p in summary["instance_seconds_by_pool"]}
    assert pools["t3.micro"]["instance_seconds"] == 3600 and pools["t3.micro"]["market"] == "on-demand"
    assert pools["m5.large"]["instance_seconds"] == 1800 and pools["m5.large"]["market"] == "spot"
    assert pools["m5.large"]["usd_per_hour"] == 0.04  # DescribeSpotPriceHistory's, not the table's
    # The unpriced type is said, never costed at 0.
    assert pools["x9.unpriced"]["estimated_cost_usd"] is None
    assert summary["cost_unknown_instance_types"] == ["x9.unpriced"]
    assert summary["cost_unknown_instance_seconds"] == 3600
    assert summary["instance_seconds"] == 3600 + 1800 + 3600
    assert summary["estimated_cost_usd"] == pytest.approx(0.0104 + 0.02)
    assert summary["max_cost"] == 5 and summary["max_cost_reached"] is False
    # META learns the ended instance's usage and the spot price, so neither is asked again.
    values = [
        value
        for _, operation, kwargs in calls
        if operation == "update_item"
        for value in deserialize_item(kwargs["ExpressionAttributeValues"]).values()
    ]
    (usage,) = [v for v in values if isinstance(v, dict) and "i-2" in v]
    assert usage["i-2"]["end"] == NOW - 1800 and usage["i-2"]["market"] == "spot"
    (prices,) = [v for v in values if isinstance(v, dict) and "m5.large/us-east-1a" in v]
    assert prices == {"m5.large/us-east-1a": {"price": 0.04, "at": NOW}}
