"""Networking on the local cloud, whose instances reach what their VPC lets them reach (as on AWS).

- The default VPC (public mode: a public IP, the cluster's own security group) runs jobs: every other
  reliability test does; here a private subnet with VPC endpoints and no internet runs one too.
- Broken layouts launch nothing and name the subnet, the missing path and the fix: a private subnet with
  neither NAT nor endpoints; endpoints but none for S3 (where the bundle is); a security group with no
  egress.
- A network that breaks after the preflight (an endpoint deleted between the preflight and the launch):
  the workers fail fast, saying which service they cannot reach, on their status item when DynamoDB is
  reachable and on their console when it is not; the drain stops after a few boot failures with that cause
  instead of spending its replacement budget.
"""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from tests.network_layouts import add_endpoints, default_vpc, group_without_egress, private_vpc

from .harness import Job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HANDLER = "handlers:double"
TASKS = 40
WORKERS = 2
BUDGET = 2 * WORKERS  # the sensor's default max_replacements
LIMIT = 3


def cluster_groups(cloud, cluster_id: str) -> list[str]:
    found = cloud.client("ec2").describe_security_groups(
        Filters=[{"Name": f"tag:{TAG_CLUSTER_ID}", "Values": [cluster_id]}]
    )
    return [g["GroupId"] for g in found["SecurityGroups"]]


def test_a_private_subnet_with_endpoints_and_no_internet_runs_the_job(cloud_env, capsys):
    layout = private_vpc(cloud_env.client("ec2"))
    add_endpoints(cloud_env.client("ec2"), layout, cloud_env.region)
    job = Job(cloud_env, "net-private")
    job.enqueue([{"n": n} for n in range(TASKS)])
    launched = job.launch(
        WORKERS, HANDLER, launch_options={"network": "private", "subnet_ids": [layout.private_subnet]}
    )
    # No endpoint for CloudWatch Logs: said by the preflight, and the job runs all the same.
    assert "Preflight: the workers' logs will not reach CloudWatch Logs" in capsys.readouterr().out
    summary = job.drain(timeout=180)
    processes = cloud_env.worker_processes()
    instances = {i for i in launched["instance_ids"]}
    for instance_id in instances:
        network = processes[instance_id]
        assert "gateway endpoint" in network["reachable"]["dynamodb"], network
        assert "interface endpoint" in network["reachable"]["sqs"], network
        assert "gateway endpoint" in network["reachable"]["s3"], network  # the bundle's way in
        assert "internet" in network["unreachable"], network
    (group,) = cluster_groups(cloud_env, job.cluster_id)
    torn = job.teardown(delete_queues=True)
    job.assert_nothing_left()
    assert torn["security_groups_deleted"] == [group] and cluster_groups(cloud_env, job.cluster_id) == []
    assert summary["tasks_done"] == TASKS
    assert sorted(r["task_id"] for r in job.results()) == [f"t{n:09d}" for n in range(TASKS)]


@pytest.mark.parametrize("layout_kind", ["neither-nat-nor-endpoints", "endpoints-but-no-s3", "no-egress"])
def test_a_broken_layout_launches_nothing_and_names_the_fix(cloud_env, layout_kind):
    ec2 = cloud_env.client("ec2")
    job = Job(cloud_env, "net-broken")
    job.enqueue([{"n": n} for n in range(4)])
    layout = private_vpc(ec2)
    options = {"network": "private", "subnet_ids": [layout.private_subnet]}
    if layout_kind == "endpoints-but-no-s3":
        add_endpoints(ec2, layout, cloud_env.region, services=("dynamodb", "sqs"))
    if layout_kind == "no-egress":
        options = {"security_group_ids": [group_without_egress(ec2, default_vpc(ec2))]}
    with pytest.raises(AirflowException) as refused:
        job.launch(WORKERS, HANDLER, launch_options=options)
    message = str(refused.value)
    assert "nothing was launched" in message
    expected = {
        "neither-nat-nor-endpoints": ["cannot reach dynamodb, sqs, s3", "VPC endpoints:", "NAT gateway"],
        "endpoints-but-no-s3": ["cannot reach s3", "gateway endpoint"],
        "no-egress": [
            "allow no HTTPS egress (TCP 443) towards dynamodb, sqs, s3",
            "leave security_group_ids out",
        ],
    }[layout_kind]
    for text in expected:
        assert text in message, message
    assert job.instances() == [] and cluster_groups(cloud_env, job.cluster_id) == []
    job.teardown(delete_queues=True)


@pytest.mark.parametrize("lost", ["sqs", "dynamodb"])
def test_a_network_broken_after_the_preflight_fails_fast_with_its_cause(cloud_env, monkeypatch, capsys, lost):
    ec2 = cloud_env.client("ec2")
    layout = private_vpc(ec2)
    services = ("dynamodb", "sqs", "s3")
    endpoints = dict(zip(services, add_endpoints(ec2, layout, cloud_env.region, services), strict=True))
    original = EC2ClusterHook.create_fleet

    def drift_then_run(self, *args, **kwargs):
        # Someone deletes an endpoint after the preflight read the VPC: the instances boot without it.
        if endpoints.get(lost):
            ec2.delete_vpc_endpoints(VpcEndpointIds=[endpoints.pop(lost)])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EC2ClusterHook, "create_fleet", drift_then_run)
    job = Job(cloud_env, f"net-drift-{lost}")
    job.enqueue([{"n": n} for n in range(TASKS)])
    job.launch(WORKERS, HANDLER, launch_options={"network": "private", "subnet_ids": [layout.private_subnet]})
    with pytest.raises(AirflowFailException) as failed:
        job.drain(timeout=240, repeated_failure_limit=LIMIT)
    message = str(failed.value)
    assert f"{LIMIT} workers in a row failed at start with the same error" in message, message
    assert f"cannot reach {lost} (" in message and "VPC endpoint" in message, message
    used = job.instance_ids()
    assert len(used) < WORKERS + BUDGET, f"{len(used)} instances launched"
    meta = job.hook.get_meta(job.state_table, job.cluster_id)
    if lost == "dynamodb":  # no status item could be written: the cause came from the consoles
        assert job.worker_states() == {}
        assert "Instances that did not boot, the last lines of their consoles:" in message
        assert "ec2cluster: startup-failed: cannot reach dynamodb" in message
        assert (
            sum(1 for f in meta.boot_failures.values() if f["reason"].startswith("cannot reach dynamodb"))
            >= LIMIT
        )
    else:
        assert meta.boot_failures == {}
    logged = capsys.readouterr().out
    assert "stopped: startup-failed: cannot reach" in logged
    job.teardown(delete_queues=True)
    job.assert_nothing_left()
    print(f"\nRELIABILITY network-drift-{lost}: instances={len(used)} (budget {WORKERS}+{BUDGET})")
