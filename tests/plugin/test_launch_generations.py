"""Launch generations: a re-run after a failure launches again from the current arguments; a retry never
launches twice. The decision is pure (``plan_launch``); the operator is run against moto."""

from __future__ import annotations

import base64
import json

import boto3
import pytest

from airflow_ec2cluster.cluster import LaunchSpec, task_queue_name
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.meta import ClusterMeta, MetaUpdate
from airflow_ec2cluster.operators.launch import ADOPT, RESUME, START, plan_launch
from airflow_ec2cluster.userdata import parse_user_data
from tests.plugin.conftest import REGION
from tests.plugin.test_launch import TABLE, cluster_instances, launch, record_calls
from tests.plugin.test_launch import queues as queues  # noqa: F401  (the fixture)

SPEC = LaunchSpec(image_id="ami-1", instance_type="t3.micro", user_data_b64="IyE=")
FIXED = LaunchSpec(image_id="ami-1", instance_type="t3.micro", user_data_b64="IyEK")


def plan_of(plan) -> tuple:
    return (plan.action, plan.generation, plan.count, plan.token)


@pytest.fixture
def jobs_code(tmp_path) -> list[str]:
    """A package ``jobs`` of the user's (shipped in the bundle), with a broken and a fixed handler."""
    package = tmp_path / "jobs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import no_such_dependency\n")
    (package / "fixed.py").write_text("def run(payload, context):\n    return payload\n")
    return [str(package)]


# -- the decision ------------------------------------------------------------------------------------------


def test_a_first_launch_starts_generation_one_with_the_historic_token():
    plan = plan_launch(ClusterMeta(cluster_id="c-1"), [], SPEC, 4, None)
    assert (plan.action, plan.generation, plan.count, plan.token) == (START, 1, 4, "c-1-launch")


def test_live_instances_are_adopted_never_added_to():
    meta = ClusterMeta(cluster_id="c-1", launch_spec=SPEC, launch_generation=2, launched_generation=1)
    retry = plan_launch(meta, ["i-1"], SPEC, 4, 10)
    assert (retry.action, retry.generation, retry.count, retry.renew) == (ADOPT, 2, 0, False)
    # A fix while old workers still run: none launched, but a fresh budget for the workers from now on.
    fixed = plan_launch(meta, ["i-1"], FIXED, 4, 10)
    assert (fixed.action, fixed.generation, fixed.count, fixed.renew) == (ADOPT, 2, 0, True)


def test_a_generation_started_and_not_recorded_is_repeated_with_its_token():
    meta = ClusterMeta(
        cluster_id="c-1", launch_spec=SPEC, launch_generation=2, launched_generation=1, launch_count=3
    )
    plan = plan_launch(meta, [], SPEC, 4, 10)
    assert (plan.action, plan.generation, plan.count, plan.token) == (RESUME, 2, 3, "c-1-launch-g2")
    # Changed arguments are a new launch, not a retry of the old one.
    changed = plan_launch(meta, [], FIXED, 4, 10)
    assert (changed.action, changed.generation, changed.token) == (START, 3, "c-1-launch-g3")


def test_a_re_run_with_nothing_live_starts_the_next_generation_for_the_work_left():
    meta = ClusterMeta(
        cluster_id="c-1", launch_spec=SPEC, instance_ids=["i-1"], launch_generation=1, launched_generation=1
    )
    assert plan_of(plan_launch(meta, [], FIXED, 4, 2)) == (START, 2, 2, "c-1-launch-g2")
    assert plan_of(plan_launch(meta, [], FIXED, 4, 40))[:3] == (START, 2, 4)
    assert plan_of(plan_launch(meta, [], FIXED, 4, 0))[:3] == (START, 2, 0)
    # A META item written before generations existed: launched once, recorded.
    old = ClusterMeta(cluster_id="c-1", launch_spec=SPEC, instance_ids=["i-1"])
    assert plan_of(plan_launch(old, [], SPEC, 4, 2)) == (START, 2, 2, "c-1-launch-g2")
    # ...and launched once, not recorded: its CreateFleet again, with the token it used.
    unrecorded = ClusterMeta(cluster_id="c-1", launch_spec=SPEC)
    assert plan_of(plan_launch(unrecorded, [], SPEC, 4, 2)) == (RESUME, 1, 4, "c-1-launch")


# -- the operator ------------------------------------------------------------------------------------------


def all_instances(cluster_id: str) -> list[dict]:
    return cluster_instances(cluster_id, ("pending", "running", "shutting-down", "terminated", "stopped"))


def user_data_of(spec: LaunchSpec) -> str:
    return parse_user_data(base64.b64decode(spec.user_data_b64))


@pytest.mark.usefixtures("queues")
def test_a_re_run_after_every_worker_is_gone_launches_from_the_current_arguments(
    context, cluster_id, ami_id, instance_profile, jobs_code
):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    first = launch(
        cluster_id, ami_id, handler={"type": "python", "target": "jobs.broken:run"}, code=jobs_code
    )
    first_ids = first.execute(context)["instance_ids"]
    # The drain used the whole budget and every worker stopped (their instances terminated themselves).
    hook.update_meta(TABLE, cluster_id, MetaUpdate(replacements_launched=4, consecutive_empty=1))
    boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=first_ids)

    fixed = launch(cluster_id, ami_id, handler={"type": "python", "target": "jobs.fixed:run"}, code=jobs_code)
    runs = record_calls(fixed, "CreateFleet")
    second = fixed.execute(context)

    # One message is queued (the fixture enqueues one task): one worker, not num_workers (2).
    assert len(runs) == 1 and runs[0]["TargetCapacitySpecification"]["TotalTargetCapacity"] == 1
    assert runs[0]["ClientToken"] == f"{cluster_id}-launch-g2"
    assert len(second["instance_ids"]) == 1 and not set(second["instance_ids"]) & set(first_ids)
    meta = hook.get_meta(TABLE, cluster_id)
    assert (meta.launch_generation, meta.launched_generation, meta.replacements_launched) == (2, 2, 0)
    assert meta.consecutive_empty == 0 and meta.retired_instance_ids == first_ids
    assert sorted(meta.instance_ids) == sorted(first_ids + second["instance_ids"])
    # Replacements use the current arguments: the spec in META carries the fixed handler.
    assert "jobs.fixed:run" in user_data_of(meta.launch_spec)
    assert "jobs.broken:run" not in user_data_of(meta.launch_spec)


@pytest.mark.usefixtures("queues")
def test_a_fix_while_old_workers_still_run_launches_nothing_and_renews_the_budget(
    context, cluster_id, ami_id, instance_profile, jobs_code
):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    ids = launch(
        cluster_id, ami_id, handler={"type": "python", "target": "jobs.broken:run"}, code=jobs_code
    ).execute(context)["instance_ids"]
    hook.update_meta(TABLE, cluster_id, MetaUpdate(replacements_launched=4))
    fixed = launch(cluster_id, ami_id, handler={"type": "python", "target": "jobs.fixed:run"}, code=jobs_code)
    runs = record_calls(fixed, "CreateFleet")
    assert sorted(fixed.execute(context)["instance_ids"]) == sorted(ids) and runs == []
    meta = hook.get_meta(TABLE, cluster_id)
    assert meta.replacements_launched == 0 and sorted(meta.retired_instance_ids) == sorted(ids)
    assert "jobs.fixed:run" in user_data_of(meta.launch_spec)  # replacements boot the fixed handler


@pytest.mark.usefixtures("queues")
def test_a_re_run_with_nothing_queued_launches_nothing(context, cluster_id, ami_id, instance_profile):
    ids = launch(cluster_id, ami_id).execute(context)["instance_ids"]
    boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=ids)
    sqs = boto3.client("sqs", region_name=REGION)
    sqs.purge_queue(QueueUrl=sqs.get_queue_url(QueueName=task_queue_name(cluster_id))["QueueUrl"])
    rerun = launch(cluster_id, ami_id)
    runs = record_calls(rerun, "CreateFleet")
    assert rerun.execute(context)["instance_ids"] == [] and runs == []
    assert (
        EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id).launched_generation
        == 2
    )


@pytest.mark.usefixtures("queues")
@pytest.mark.parametrize("instances_gone", [False, True])
def test_a_retry_of_a_launch_that_died_after_run_instances_does_not_launch_twice(
    context, cluster_id, ami_id, instance_profile, instances_gone
):
    first = launch(cluster_id, ami_id, terminate_on_failure=False)
    real_update = first.hook.update_meta

    def die_after_run_instances(table, cluster, update):
        if update.launched_generation is not None:
            raise KeyboardInterrupt("the worker running the task died")
        return real_update(table, cluster, update)

    first.hook.update_meta = die_after_run_instances
    first_runs = record_calls(first, "CreateFleet")
    with pytest.raises(KeyboardInterrupt):
        first.execute(context)
    started = [i["InstanceId"] for i in all_instances(cluster_id)]
    assert len(started) == 2
    if instances_gone:
        # Not visible as live any more (gone, or not yet listed): only the ClientToken can tell.
        boto3.client("ec2", region_name=REGION).terminate_instances(InstanceIds=started)

    retry = launch(cluster_id, ami_id)
    runs = record_calls(retry, "CreateFleet")
    answer = retry.execute(context)
    assert len(all_instances(cluster_id)) == 2, "the retry started instances of its own"
    assert sorted(answer["instance_ids"]) == sorted(started)
    assert [r["ClientToken"] for r in runs] == ([first_runs[0]["ClientToken"]] if instances_gone else [])
    meta = EC2ClusterHook(aws_conn_id=None, region_name=REGION).get_meta(TABLE, cluster_id)
    assert sorted(meta.instance_ids) == sorted(started) and meta.launched_generation == 1
    assert json.dumps(meta.launch_spec.to_dict())  # recorded
