"""Capacity: no empty pool, quota or interruption stops a job that could still finish.

The local cloud answers launches as EC2 does when a pool has no room (InsufficientInstanceCapacity) or a
quota is reached (VcpuLimitExceeded), with partial fulfilment and per-pool errors from CreateFleet, and
reclaims spot instances at random through the metadata notice. Each test changes capacity only on observed
progress (tasks done, a launch recorded short in the META item), never on the clock, and puts the account's
capacity back afterwards (the reliability suite shares one local cloud).
"""

from __future__ import annotations

import math

import pytest
from airflow.sdk.exceptions import AirflowException
from ec2cluster_localcloud import prices

from .harness import Job

SUBNET_ZONES = ("us-east-1a", "us-east-1b")
FAST_CAPACITY = {"launch_backoff": 0.5, "launch_backoff_max": 2}


@pytest.fixture
def capacity(cloud_env):
    """The local cloud's capacity, put back to unlimited after the test."""
    yield cloud_env
    cloud_env.set_capacity_document(None)
    cloud_env.set_spot_interruptions(0)


def default_subnets(cloud) -> list[str]:
    """One default subnet in each of SUBNET_ZONES, in that order."""
    subnets = cloud.client("ec2").describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
        "Subnets"
    ]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets}
    return [by_zone[zone] for zone in SUBNET_ZONES]


def instance_pools(job: Job) -> list[tuple[str, str, str]]:
    """(type, zone, market) of every instance the cluster ever had."""
    every = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated")
    return sorted(
        (
            i["InstanceType"],
            i["Placement"]["AvailabilityZone"],
            i.get("InstanceLifecycle") or "on-demand",
        )
        for i in job.instances(every)
    )


def assert_every_task_done(job: Job, tasks: int, summary: dict) -> None:
    results = job.results()
    assert sorted(r["task_id"] for r in results) == [f"t{n:09d}" for n in range(tasks)]
    assert all(r["status"] == "done" for r in results)
    assert summary["tasks_done"] == tasks and summary["dead_lettered"] == 0


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_an_empty_spot_pool_at_launch_the_fleet_takes_other_pools_then_on_demand(capacity):
    """Spot: c5.large has no room anywhere, m5.large one instance in one zone; the rest is on-demand."""
    for zone in SUBNET_ZONES:
        capacity.set_capacity("c5.large", zone, "spot", 0)
    capacity.set_capacity("m5.large", SUBNET_ZONES[0], "spot", 1)
    capacity.set_capacity("m5.large", SUBNET_ZONES[1], "spot", 0)
    job = Job(capacity, "cap-spot")
    job.enqueue([{"n": n} for n in range(40)], tasks_per_message=2)
    launched = job.launch(
        3,
        "handlers:double",
        launch_options={
            "instance_type": ["c5.large", "m5.large"],
            "capacity": "spot-then-on-demand",
            "subnet_ids": default_subnets(capacity),
        },
    )
    assert len(launched["instance_ids"]) == 3
    pools = instance_pools(job)
    assert ("m5.large", SUBNET_ZONES[0], "spot") in pools
    assert sum(1 for pool in pools if pool[2] == "spot") == 1, pools
    assert sum(1 for pool in pools if pool[2] == "on-demand") == 2, pools
    summary = job.drain(timeout=200, **FAST_CAPACITY)
    job.teardown()
    job.assert_nothing_left()
    assert_every_task_done(job, 40, summary)
    first = summary["launches"][0]
    assert first["launched"] == 3 and first["requested"] == 3
    assert {e["code"] for e in first["errors"]} == {"InsufficientInstanceCapacity"}
    assert any("c5.large" in e["pool"] and "(spot)" in e["pool"] for e in first["errors"])
    assert job.xcom["teardown"]["launch_templates_deleted"], job.xcom["teardown"]
    # What it cost, by pool: spot at DescribeSpotPriceHistory's price (the local cloud's, which its spot
    # allocation ranks by), on-demand at the provider's table, every instance-second priced.
    costed = {
        (p["instance_type"], p["availability_zone"], p["market"]): p
        for p in summary["instance_seconds_by_pool"]
    }
    assert set(costed) == set(pools)
    for (instance_type, _, market), pool in costed.items():
        assert pool["usd_per_hour"] == prices.price(instance_type, market) and pool["instance_seconds"] > 0
    assert summary["cost_unknown_instance_seconds"] == 0
    assert summary["estimated_cost_usd"] == pytest.approx(
        sum(p["instance_seconds"] / 3600 * p["usd_per_hour"] for p in costed.values()), abs=1e-3
    )
    print(
        f"\nRELIABILITY spot pool empty at launch: pools={pools} launches={summary['launches']} "
        f"cost=${summary['estimated_cost_usd']} for {summary['instance_seconds']} instance-seconds"
    )


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_vcpu_quota_below_the_size_gives_a_partial_cluster_that_finishes_the_job(capacity):
    """On-demand standard quota: 4 vCPUs, c5.large has 2: two workers of the five asked for."""
    capacity.set_vcpu_quota("on-demand", "standard", 4)
    job = Job(capacity, "cap-quota")
    job.enqueue([{"n": n} for n in range(40)], tasks_per_message=2)
    launched = job.launch(5, "handlers:double", launch_options={"instance_type": "c5.large"})
    assert len(launched["instance_ids"]) == 2
    summary = job.drain(timeout=200, **FAST_CAPACITY)
    job.teardown()
    job.assert_nothing_left()
    assert_every_task_done(job, 40, summary)
    assert any("VcpuLimitExceeded" in key for key in summary["launch_errors"]), summary["launch_errors"]
    assert summary["workers_used"] <= 5
    print(f"\nRELIABILITY quota: launched 2 of 5, launch_errors={summary['launch_errors']}")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_pool_that_drains_mid_run_and_comes_back_grows_the_cluster_again(capacity):
    zone = SUBNET_ZONES[0]
    capacity.set_capacity("c5.large", zone, "on-demand", 3)
    job = Job(capacity, "cap-drain")
    tasks = 120
    job.enqueue([{"n": n, "sleep": 0.5} for n in range(tasks)], tasks_per_message=1)
    job.launch(
        3,
        "handlers:double",
        launch_options={"instance_type": "c5.large", "subnet_ids": default_subnets(capacity)[:1]},
    )
    steps: list[str] = []
    ec2 = capacity.client("ec2")

    def drain_then_refill() -> None:
        if not steps and job.messages_done() >= 6:
            # The pool shrinks: two workers' instances are reclaimed, and there is no room for others.
            live = sorted(i["InstanceId"] for i in job.instances(("running",)))
            capacity.set_capacity("c5.large", zone, "on-demand", len(live) - 2)
            ec2.terminate_instances(InstanceIds=live[:2])
            steps.append("drained")
        elif steps == ["drained"]:
            meta = job.hook.get_meta(job.state_table, job.cluster_id)
            if meta.launch_failures >= 1 and meta.capacity_wait_since == 0:
                capacity.set_capacity("c5.large", zone, "on-demand", 3)  # the pool comes back
                steps.append("refilled")

    summary = job.drain(timeout=240, between_pokes=drain_then_refill, **FAST_CAPACITY)
    job.teardown()
    job.assert_nothing_left()
    assert steps == ["drained", "refilled"], steps
    assert_every_task_done(job, tasks, summary)
    short = [entry for entry in summary["launches"] if entry["launched"] < entry["requested"]]
    assert short and all(e["code"] == "InsufficientInstanceCapacity" for s in short for e in s["errors"])
    assert summary["replacements_launched"] >= 2 and summary["workers_used"] >= 5, summary
    print(
        f"\nRELIABILITY pool drained and refilled: workers_used={summary['workers_used']} "
        f"launches={summary['launches']}"
    )


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_spot_interruptions_at_random_through_a_job_lose_nothing(capacity):
    job = Job(capacity, "cap-interrupt")
    tasks = 120
    job.enqueue([{"n": n, "sleep": 0.5} for n in range(tasks)], tasks_per_message=1)
    job.launch(3, "handlers:double", launch_options={"capacity": "spot"})
    phase: list[str] = []

    def interruptions() -> None:
        stopped = [
            item
            for item in job.hook.worker_statuses(job.state_table, job.cluster_id)
            if item.get("stop_reason") == "spot-interruption"
        ]
        if not phase and job.messages_done() >= 6:
            # About one interruption per instance every 10 s, each after a 6 s notice: longer than the
            # worker's 5 s metadata poll, so its worker sees it (EC2 gives two minutes).
            capacity.set_spot_interruptions(360.0, notice_seconds=6, seed=15)
            phase.append("interrupting")
        elif phase == ["interrupting"] and len(stopped) >= 2:
            capacity.set_spot_interruptions(0)
            phase.append("calm")

    summary = job.drain(timeout=240, between_pokes=interruptions, max_replacements=12, **FAST_CAPACITY)
    job.teardown()
    job.assert_nothing_left()
    assert phase == ["interrupting", "calm"], phase
    assert_every_task_done(job, tasks, summary)
    assert summary["replacements_launched"] >= 2
    print(
        f"\nRELIABILITY random spot interruptions: workers_used={summary['workers_used']} "
        f"replacements={summary['replacements_launched']}"
    )


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_capacity_gone_for_good_fails_the_run_with_its_cause_after_capacity_timeout(capacity):
    zone = SUBNET_ZONES[0]
    capacity.set_capacity("c5.large", zone, "on-demand", 0)
    job = Job(capacity, "cap-gone")
    job.enqueue([{"n": n} for n in range(10)], tasks_per_message=1)
    launched = job.launch(
        2,
        "handlers:double",
        launch_options={"instance_type": "c5.large", "subnet_ids": default_subnets(capacity)[:1]},
    )
    assert launched["instance_ids"] == []
    with pytest.raises(AirflowException) as failure:
        job.drain(timeout=180, capacity_timeout=5, **FAST_CAPACITY)
    message = str(failure.value)
    assert "no worker could be launched" in message and "InsufficientInstanceCapacity" in message
    assert "c5.large" in message and "capacity_timeout 5s" in message
    meta = job.hook.get_meta(job.state_table, job.cluster_id)
    assert meta.launch_failures >= 2 and not math.isclose(meta.capacity_wait_since, 0.0)
    job.teardown()
    job.assert_nothing_left()
    assert job.instance_ids() == set()
    assert job.messages_left() == 10  # nothing lost: the work waits in the queue for a re-run


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_rebalance_recommendation_hands_work_back_and_the_replacement_goes_to_another_pool(capacity):
    job = Job(capacity, "cap-rebalance")
    # About 30 s of work for two workers, posted from the first task done: a worker polls for the
    # recommendation every 5 s, and sees it long before the queue runs dry (then it would stop queue-empty).
    tasks = 80
    job.enqueue([{"n": n, "sleep": 0.75} for n in range(tasks)], tasks_per_message=1)
    job.launch(
        2,
        "handlers:double",
        launch_options={
            "capacity": "spot",
            "instance_type": "c5.large",
            "subnet_ids": default_subnets(capacity),
        },
    )
    rebalanced: list[dict] = []

    def recommend_when_under_way() -> None:
        if rebalanced or job.messages_done() < 1:
            return
        running = [
            i for i in job.instances(("running",)) if job.worker_states().get(i["InstanceId"]) == "running"
        ]
        if running:
            capacity.inject_rebalance_recommendation(running[0]["InstanceId"])
            rebalanced.append(running[0])

    summary = job.drain(timeout=240, between_pokes=recommend_when_under_way, **FAST_CAPACITY)
    job.teardown()
    job.assert_nothing_left()
    assert rebalanced, "the job finished before a recommendation could be posted"
    (first,) = rebalanced
    statuses = {item["sk"]: item for item in job.hook.worker_statuses(job.state_table, job.cluster_id)}
    stopped = statuses[first["InstanceId"]]
    assert stopped["stop_reason"] == "rebalance-recommendation", stopped
    assert stopped["availability_zone"] == first["Placement"]["AvailabilityZone"]
    assert stopped["lifecycle"] == "spot"
    every = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated")
    later = [i for i in job.instances(every) if i["LaunchTime"] > first["LaunchTime"]]
    assert later, "no replacement was launched"
    assert {i["Placement"]["AvailabilityZone"] for i in later} == set(SUBNET_ZONES) - {
        first["Placement"]["AvailabilityZone"]
    }
    assert_every_task_done(job, tasks, summary)
    print(
        f"\nRELIABILITY rebalance: {first['InstanceId']} in {first['Placement']['AvailabilityZone']} stopped "
        f"early; replacements in {sorted({i['Placement']['AvailabilityZone'] for i in later})}"
    )
