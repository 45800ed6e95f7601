"""Your code on a real Linux image, with and without internet, with nothing switched off.

The instances here boot the local cloud's Debian 12 minimal image (debootstrap's minbase plus python3 and
ca-certificates: no pip, no venv package, a PEP 668 system Python), in namespaces of their own, and run the
project's real bootstrap: the watchdog, the image's python3, the boot loader (the cluster's bundle from S3,
checked by SHA-256, into a venv of its own), the worker. The job's handler is a module of the user's, found
beside the DAG file, and it imports a requirement that is not installed in the Airflow environment: both
reach the workers only in the bundle. A failure to build or boot the image fails these tests, with the
reason; they never skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from tests.localcloud.helpers import wait_for
from tests.network_layouts import add_endpoints, private_vpc
from tests.wheels import write_wheel

from .harness import Job

TASKS = 30
REQUIREMENT = "ec2cluster-imagetestreq"  # built here: no index has it, Airflow's environment lacks it
HANDLER_MODULE = """\
import sys

import ec2cluster_imagetestreq


def run(payload, context):
    return {
        "n": 3 * payload["n"],
        "requirement": ec2cluster_imagetestreq.NAME,
        "python": sys.executable,
        "version": "%d.%d" % sys.version_info[:2],
    }
"""


@pytest.fixture(scope="module")
def debian_12(cloud):
    return cloud.register_rootfs_image("debian-12")


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A DAG folder with the user's handler module beside the DAG file, and a wheel of its requirement
    that pip finds only through this test's --find-links folder (PIP_FIND_LINKS, as a user's pip.conf)."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "my_dag.py").write_text("# the DAG file: the launch looks for the handler's module beside it\n")
    (dags / "image_tasks.py").write_text(HANDLER_MODULE)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, REQUIREMENT)
    monkeypatch.setenv(
        "PIP_FIND_LINKS", " ".join(filter(None, [os.environ.get("PIP_FIND_LINKS"), str(wheels)]))
    )
    return dags


def run_job_on_debian(job: Job, dags: Path, image_id: str, **launch_options) -> list[dict]:
    job.context["dag"] = SimpleNamespace(fileloc=str(dags / "my_dag.py"))
    job.enqueue([{"n": n} for n in range(TASKS)])
    job.launch(
        2,
        "image_tasks:run",
        launch_options={"image_id": image_id, "code": None, "requirements": [REQUIREMENT], **launch_options},
    )
    summary = job.drain(timeout=240)
    assert summary["tasks_done"] == TASKS, summary
    return job.results()


@pytest.mark.e2e
@pytest.mark.timeout(420)
@pytest.mark.parametrize("network", ["public", "private"])
def test_your_handler_and_requirement_run_on_debian_12(cloud_env, debian_12, user_project, network):
    assert importlib.util.find_spec("ec2cluster_imagetestreq") is None  # only the bundle has it
    assert importlib.util.find_spec("image_tasks") is None  # nor the handler's module
    job = Job(cloud_env, f"image-{network}")
    options = {}
    if network == "private":
        # No NAT gateway, no public IP: the instances reach DynamoDB and S3 through gateway endpoints and
        # SQS through an interface endpoint, and nothing else (no package index).
        layout = private_vpc(cloud_env.client("ec2"))
        add_endpoints(cloud_env.client("ec2"), layout, cloud_env.region)
        options = {"network": "private", "subnet_ids": [layout.private_subnet]}
    results = run_job_on_debian(job, user_project, debian_12, **options)

    assert sorted(r["task_id"] for r in results) == sorted(f"t{n:09d}" for n in range(TASKS))
    for result in results:
        n = int(result["task_id"][1:])
        assert result["result"]["n"] == 3 * n
        assert result["result"]["requirement"] == REQUIREMENT
        # The image's Python 3.11, in the venv the boot loader made (not the host's, not the system's).
        assert result["result"]["python"] == "/opt/ec2cluster/venv/bin/python"
        assert result["result"]["version"] == "3.11"
    for instance_id in job.instance_ids():
        info = cloud_env.worker_processes()[instance_id]
        assert info["image"]["flavour"] == "debian-12"
        reachable = info["reachable"]
        if network == "private":
            assert "internet" not in reachable and info["unreachable"].get("internet")
        console = (Path(cloud_env.work_dir) / "logs" / f"{instance_id}.log").read_text()
        for step in ("fetching bundle", "unpacking bundle", "creating environment", "starting worker"):
            assert f"booting: {step}" in console, console[-2000:]
    torn = job.teardown()
    assert torn["bundles_deleted"] == 1
    job.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_handler_that_needs_airflows_environment_does_not_run_on_the_workers(cloud_env, tmp_path):
    # The module is in the bundle, but what it imports is only in the Airflow environment.
    module = tmp_path / "needs_airflow.py"
    module.write_text(
        "import airflow_ec2cluster  # noqa: F401\n\n\ndef run(payload, context):\n    return 1\n"
    )
    job = Job(cloud_env, "airflow-only")
    job.enqueue([{"n": n} for n in range(10)])
    job.launch(2, "needs_airflow:run", launch_options={"code": [str(module)]})
    with pytest.raises(AirflowFailException) as failed:
        job.drain(timeout=120, repeated_failure_limit=2)
    assert "No module named 'airflow_ec2cluster'" in str(failed.value)
    job.teardown()
    job.assert_nothing_left()


HANGING_PYTHON = """#!/bin/bash
# An interpreter that never answers (a stuck mount, a package manager's lock): the bootstrap hangs.
exec sleep 100000
"""


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_hanging_bootstrap_is_shut_down_by_the_instances_watchdog(cloud_env, tmp_path):
    hanging = tmp_path / "hanging-python"
    hanging.write_text(HANGING_PYTHON)
    hanging.chmod(0o755)
    job = Job(cloud_env, "watchdog")
    job.enqueue([{"n": 1}])
    job.launch(1, "handlers:double", launch_options={"python": [str(hanging)], "boot_timeout": 10})
    (instance_id,) = job.instance_ids()
    # No controller acts here: the instance's own watchdog powers it off once boot_timeout has passed.
    wait_for(lambda: not job.instances(), 120, "the instance to shut itself down")
    console = (Path(cloud_env.work_dir) / "logs" / f"{instance_id}.log").read_text()
    assert (
        "ec2cluster: startup-failed: the worker did not start within 10 s of boot (boot_timeout)" in console
    )
    job.teardown(delete_queues=True)
    job.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_a_rebooted_worker_starts_again_and_no_idle_instance_is_left_billed(cloud_env, debian_12):
    job = Job(cloud_env, "reboot")
    job.enqueue([{"n": n, "sleep": 2} for n in range(8)])
    job.launch(1, "handlers:double", launch_options={"image_id": debian_12})
    (instance_id,) = job.instance_ids()
    status = wait_for(lambda: worker_item(job, instance_id, "running"), 120, "the worker to run")
    cloud_env.client("ec2").reboot_instances(InstanceIds=[instance_id])
    wait_for(lambda: cloud_env.worker_processes()[instance_id]["boots"] == 2, 120, "the instance to reboot")
    # Its per-boot script starts the worker again: a new start, on the same instance (same id).
    wait_for(
        lambda: (
            (item := worker_item(job, instance_id, "running")) and item["started_at"] > status["started_at"]
        ),
        120,
        "the worker to run again after the reboot",
    )
    summary = job.drain(timeout=240)
    assert summary["tasks_done"] == 8 and job.instance_ids() == {instance_id}
    # With nothing left to do the worker stops itself and the instance powers off, before any teardown.
    wait_for(lambda: not job.instances(), 120, "the idle instance to shut itself down")
    job.teardown()
    job.assert_nothing_left()


def worker_item(job: Job, instance_id: str, state: str) -> dict | None:
    for item in job.hook.worker_statuses(job.state_table, job.cluster_id):
        if item.get("worker_id") == instance_id and item.get("state") == state:
            return item
    return None
