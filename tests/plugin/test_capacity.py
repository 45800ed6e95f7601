"""Launching over the fleet and living with capacity errors: the pure parts (requests, answers, backoff,
the drain's decision to wait or fail). The local cloud's own capacity is tested in tests/localcloud."""

from __future__ import annotations

from dataclasses import replace

import pytest

from airflow_ec2cluster.aws.fleet import (
    LaunchedInstance,
    LaunchOutcome,
    PoolError,
    create_fleet_params,
    fleet_outcome,
    launch_template_data,
    launch_template_name,
    requirement_problems,
    types_matching,
)
from airflow_ec2cluster.calls import Call
from airflow_ec2cluster.capacity import (
    after_launch,
    last_errors_text,
    launch_retry_at,
    launch_workers,
    min_count_for,
    pools_to_avoid,
)
from airflow_ec2cluster.cluster import LaunchSpec
from airflow_ec2cluster.drain.decisions import (
    InstanceInfo,
    Policy,
    QueueCounts,
    Snapshot,
    WorkerStatus,
    decide,
)
from airflow_ec2cluster.meta import ClusterMeta

NOW = 1_800_000_000.0
SPEC = LaunchSpec(
    image_id="ami-1",
    instance_type="c5.large",
    instance_types=["c5.large", "m5.large"],
    user_data_b64="IyE=",
    subnet_ids=["subnet-a", "subnet-b"],
    security_group_ids=["sg-1"],
    root_device_name="/dev/xvda",
    volume_size_gb=8,
    capacity="spot-then-on-demand",
    launch_template_id="lt-1",
)


def test_a_fleet_asks_every_type_in_every_subnet_in_the_order_given():
    params = create_fleet_params(
        cluster_id="c1", spec=SPEC, market="spot", count=4, client_token="tok", extra_tags={"t": "v"}
    )
    overrides = params["LaunchTemplateConfigs"][0]["Overrides"]
    assert [(o["InstanceType"], o["SubnetId"], o["Priority"]) for o in overrides] == [
        ("c5.large", "subnet-a", 0.0),
        ("c5.large", "subnet-b", 1.0),
        ("m5.large", "subnet-a", 2.0),
        ("m5.large", "subnet-b", 3.0),
    ]
    assert params["Type"] == "instant" and params["ClientToken"] == "tok"
    assert params["TargetCapacitySpecification"] == {
        "TotalTargetCapacity": 4,
        "DefaultTargetCapacityType": "spot",
        "OnDemandTargetCapacity": 0,
        "SpotTargetCapacity": 4,
    }
    assert params["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
    tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
    assert tags["ec2cluster:cluster-id"] == "c1" and tags["t"] == "v"
    on_demand = create_fleet_params(cluster_id="c1", spec=SPEC, market="on-demand", count=2, client_token="x")
    assert on_demand["OnDemandOptions"] == {"AllocationStrategy": "lowest-price"}
    assert "SpotOptions" not in on_demand


def test_avoided_pools_are_left_out_unless_nothing_else_remains():
    avoid = ["c5.large in subnet-a (spot)"]
    params = create_fleet_params(
        cluster_id="c1", spec=SPEC, market="spot", count=1, client_token="t", avoid=avoid
    )
    pools = [(o["InstanceType"], o["SubnetId"]) for o in params["LaunchTemplateConfigs"][0]["Overrides"]]
    assert ("c5.large", "subnet-a") not in pools and len(pools) == 3
    single = replace(SPEC, instance_types=["c5.large"], subnet_ids=["subnet-a"])
    params = create_fleet_params(
        cluster_id="c1", spec=single, market="spot", count=1, client_token="t", avoid=avoid
    )
    assert len(params["LaunchTemplateConfigs"][0]["Overrides"]) == 1


def test_the_launch_template_holds_what_every_worker_is():
    data = launch_template_data("c1", SPEC)
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True
    assert data["NetworkInterfaces"][0]["Groups"] == ["sg-1"]
    assert data["UserData"] == "IyE="
    # Same content, same name (a retry finds it); other content, another template.
    assert launch_template_name("c1", data) == launch_template_name("c1", launch_template_data("c1", SPEC))
    other = launch_template_data("c1", replace(SPEC, user_data_b64="IyEx"))
    assert launch_template_name("c1", other) != launch_template_name("c1", data)


def test_a_fleet_answer_reads_as_instances_per_pool_and_errors_per_pool():
    answer = {
        "Instances": [
            {
                "InstanceIds": ["i-1", "i-2"],
                "InstanceType": "m5.large",
                "Lifecycle": "spot",
                "LaunchTemplateAndOverrides": {"Overrides": {"InstanceType": "m5.large", "SubnetId": "s-b"}},
            }
        ],
        "Errors": [
            {
                "LaunchTemplateAndOverrides": {"Overrides": {"InstanceType": "c5.large", "SubnetId": "s-a"}},
                "Lifecycle": "spot",
                "ErrorCode": "InsufficientInstanceCapacity",
                "ErrorMessage": "We currently do not have sufficient c5.large capacity",
            }
        ],
    }
    outcome = fleet_outcome(answer, 3, "spot")
    assert outcome.instance_ids == ["i-1", "i-2"] and outcome.short == 1
    assert outcome.by_pool() == {"m5.large in s-b (spot)": 2}
    (error,) = outcome.errors
    assert error.capacity and error.pool == "c5.large in s-a (spot)"


def drive(generator, answers):
    """Run a launch generator against canned answers per call name; the calls made."""
    calls: list[Call] = []
    try:
        request = next(generator)
        while True:
            calls.append(request)
            request = generator.send(answers[request.name](request))
    except StopIteration as stop:
        return calls, stop.value


def fleet_answer(lifecycle: str, ids: list[str], errors: int = 0):
    def answer(request: Call) -> LaunchOutcome:
        requested = request.args[1]
        return LaunchOutcome(
            requested=requested,
            instances=tuple(LaunchedInstance(i, "c5.large", "subnet-a", lifecycle) for i in ids),
            errors=tuple(
                PoolError("m5.large", "subnet-b", lifecycle, "InsufficientInstanceCapacity", "none left")
                for _ in range(errors)
            ),
        )

    return answer


def test_spot_then_on_demand_asks_on_demand_for_what_spot_could_not_start():
    answers = iter([fleet_answer("spot", ["i-1"], errors=1), fleet_answer("on-demand", ["i-2", "i-3"])])
    calls, outcome = drive(launch_workers("c1", SPEC, 3, "tok"), {"create_fleet": lambda r: next(answers)(r)})
    assert [(c.args[2], c.args[1]) for c in calls] == [("spot", 3), ("on-demand", 2)]
    # Each market's call has its own ClientToken (a retry of the launch repeats both).
    assert [c.args[0]["ClientToken"] for c in calls] == ["tok", "tok-on"]
    assert outcome.instance_ids == ["i-1", "i-2", "i-3"] and outcome.short == 0
    assert len(outcome.errors) == 1


def test_fewer_than_the_minimum_are_released_at_once():
    calls, outcome = drive(
        launch_workers("c1", replace(SPEC, capacity="spot"), 4, "tok", min_count=3),
        {"create_fleet": fleet_answer("spot", ["i-1", "i-2"], errors=1), "terminate_instances": lambda r: []},
    )
    assert [c.name for c in calls] == ["create_fleet", "terminate_instances"]
    assert calls[1].args[0] == ["i-1", "i-2"]
    assert outcome.instances == () and outcome.released == ("i-1", "i-2") and outcome.short == 4


def test_the_minimum_is_what_brings_the_cluster_to_min_workers():
    spec = replace(SPEC, min_workers=3)
    assert min_count_for(spec, 5, 0) == 3
    assert min_count_for(spec, 5, 2) == 1
    assert min_count_for(spec, 2, 0) == 2
    assert min_count_for(replace(SPEC, min_workers=1), 5, 0) == 1


def short_outcome(launched: int = 0) -> LaunchOutcome:
    return LaunchOutcome(
        requested=3,
        instances=tuple(LaunchedInstance(f"i-{n}", "c5.large", "s", "spot") for n in range(launched)),
        errors=(PoolError("c5.large", "s", "spot", "InsufficientInstanceCapacity", "none"),),
    )


def test_launches_short_in_a_row_back_off_exponentially_up_to_the_cap():
    meta = ClusterMeta(cluster_id="c1")
    retry_times = []
    for n in range(6):
        update = after_launch(meta, short_outcome(), NOW + n, capacity=0)
        meta = replace(
            meta,
            launch_failures=update.launch_failures,
            launch_failed_at=update.launch_failed_at,
            capacity_wait_since=update.capacity_wait_since,
            launch_history=update.launch_history,
            launch_errors_total=update.launch_errors_total,
        )
        retry_times.append(launch_retry_at(meta, 10, 60) - (NOW + n))
    assert retry_times == [10, 20, 40, 60, 60, 60]
    # The wait for capacity started at the first failure with no worker, and holds.
    assert meta.capacity_wait_since == NOW
    assert meta.launch_errors_total == {"c5.large in s (spot): InsufficientInstanceCapacity": 6}
    assert "InsufficientInstanceCapacity" in last_errors_text(meta)
    # A launch that starts everything it asked for ends the backoff and the wait.
    full = LaunchOutcome(requested=1, instances=(LaunchedInstance("i-9", "m5.large", "s", "spot"),))
    done = after_launch(meta, full, NOW + 10, capacity=0)
    assert done.launch_failures == 0 and done.capacity_wait_since == 0.0
    # A short launch while workers run backs off, but nobody waits for capacity.
    partial = after_launch(ClusterMeta(cluster_id="c1"), short_outcome(1), NOW, capacity=2)
    assert partial.launch_failures == 1 and partial.capacity_wait_since == 0.0


def snapshot(**changes) -> Snapshot:
    base = Snapshot(
        counts=QueueCounts(visible=50, in_flight=0, delayed=0, dead_lettered=0),
        instances=(),
        workers=(),
        now=NOW,
        policy=Policy(cluster_size=3, capacity_timeout=300),
        enqueued=50,
        started_at=NOW - 1000,
    )
    return replace(base, **changes)


def test_the_drain_waits_out_a_launch_backoff_without_failing():
    decision = decide(
        snapshot(
            launch_retry_at=NOW + 20,
            launch_failures=2,
            launch_errors="c5.large in s (spot): InsufficientInstanceCapacity",
            capacity_wait_since=NOW - 100,
        )
    )
    assert decision.launch == 0 and decision.failure is None
    assert "launches short of capacity 2 in a row" in decision.progress
    assert "InsufficientInstanceCapacity" in decision.progress
    assert (
        "next in 20s" in decision.progress
        and "no worker for 100s of capacity_timeout 300s" in decision.progress
    )
    # Backoff over: the drain launches again.
    assert decide(snapshot(launch_retry_at=NOW - 1, launch_failures=2)).launch == 3


def test_the_drain_fails_once_no_worker_could_be_launched_for_capacity_timeout():
    decision = decide(
        snapshot(
            launch_retry_at=NOW + 20,
            launch_failures=5,
            launch_failed_at=NOW - 1,
            launch_errors="c5.large in s (spot): InsufficientInstanceCapacity",
            capacity_wait_since=NOW - 301,
        )
    )
    assert decision.failure is not None
    assert "no worker could be launched for 301s" in decision.failure
    assert "InsufficientInstanceCapacity" in decision.failure and "spot-then-on-demand" in decision.failure


def test_a_drain_back_after_capacity_timeout_tries_once_more_before_it_fails():
    # The only failed launch was the operator's, 10 minutes before this (late) first poke.
    late = snapshot(
        launch_failures=1,
        launch_failed_at=NOW - 600,
        launch_errors="c5.large in s (on-demand): InsufficientInstanceCapacity",
        capacity_wait_since=NOW - 600,
    )
    decision = decide(late)
    assert decision.failure is None and decision.launch == 3
    # That launch fell short too: now the run fails.
    again = decide(replace(late, launch_failures=2, launch_failed_at=NOW, now=NOW + 1))
    assert again.failure is not None and "no worker could be launched for 601s" in again.failure


def test_a_running_worker_keeps_the_drain_going_whatever_the_launches():
    worker = WorkerStatus("i-1", "running", NOW - 500, NOW - 1, busy=True, busy_since=NOW - 5)
    decision = decide(
        snapshot(
            instances=(InstanceInfo("i-1", "running", NOW - 600),),
            workers=(worker,),
            launch_retry_at=NOW + 20,
            launch_failures=9,
            capacity_wait_since=NOW - 10_000,
        )
    )
    assert decision.failure is None and decision.launch == 0


@pytest.mark.parametrize("visible", [0, 2])
def test_the_cluster_grows_to_its_ceiling_only_while_queued_work_exceeds_it(visible):
    worker = WorkerStatus("i-1", "running", NOW - 500, NOW - 1, busy=True, busy_since=NOW - 5)
    decision = decide(
        snapshot(
            counts=QueueCounts(visible=visible, in_flight=1, delayed=0, dead_lettered=0),
            instances=(InstanceInfo("i-1", "running", NOW - 600),),
            workers=(worker,),
            policy=Policy(cluster_size=5),
        )
    )
    assert decision.launch == visible


def test_a_rebalanced_workers_pool_is_avoided_by_its_replacements_for_a_while():
    spec = replace(SPEC, subnet_zones={"subnet-a": "us-east-1a", "subnet-b": "us-east-1b"})
    rebalanced = WorkerStatus(
        "i-1",
        "stopped",
        NOW - 100,
        NOW - 5,
        stop_reason="rebalance-recommendation",
        instance_type="c5.large",
        availability_zone="us-east-1a",
        lifecycle="spot",
    )
    idle = replace(rebalanced, worker_id="i-2", stop_reason="idle")
    assert pools_to_avoid([rebalanced, idle], spec, NOW) == ["c5.large in subnet-a (spot)"]
    assert pools_to_avoid([rebalanced], spec, NOW + 3600) == []
    params = create_fleet_params(
        cluster_id="c1",
        spec=spec,
        market="spot",
        count=1,
        client_token="t",
        avoid=pools_to_avoid([rebalanced], spec, NOW),
    )
    pools = [(o["InstanceType"], o["SubnetId"]) for o in params["LaunchTemplateConfigs"][0]["Overrides"]]
    assert ("c5.large", "subnet-a") not in pools and ("c5.large", "subnet-b") in pools


def type_info(name: str, vcpus: int, gib: float, metal: bool = False) -> dict:
    return {
        "InstanceType": name,
        "VCpuInfo": {"DefaultVCpus": vcpus},
        "MemoryInfo": {"SizeInMiB": int(gib * 1024)},
        "BareMetal": metal,
    }


def test_instance_requirements_match_types_by_vcpus_and_memory_smallest_first():
    infos = [
        type_info("m5.xlarge", 4, 16),
        type_info("c5.large", 2, 4),
        type_info("m5.large", 2, 8),
        type_info("c5.metal", 96, 192, metal=True),
        type_info("r5.large", 2, 16),
    ]
    assert types_matching({"vcpus": [2, 4], "memory_gib": [4, 16]}, infos) == [
        "c5.large",
        "m5.large",
        "r5.large",
        "m5.xlarge",
    ]
    assert types_matching({"vcpus": [2, 2], "memory_gib": [8, 8]}, infos) == ["m5.large"]
    assert types_matching({"vcpus": [2, 200], "max_types": 2}, infos) == ["c5.large", "m5.large"]
    assert requirement_problems({"vcpus": [2, 8]}) == []
    problems = requirement_problems({"vcpus": [8, 2], "memory": [1, 2], "max_types": 0})
    assert any("instance_requirements.vcpus" in p for p in problems)
    assert any("instance_requirements.memory: unknown" in p for p in problems)
    assert any("instance_requirements.max_types" in p for p in problems)
    assert requirement_problems({"memory_gib": [1, 2]}) == [
        'instance_requirements.vcpus: required, e.g. "vcpus": [2, 8]'
    ]
