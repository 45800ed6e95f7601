"""Shared helpers for the local cloud tests: waiting, and finding processes by process group."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def live_processes() -> dict[int, int]:
    """pid -> process group id, for every live (not zombie) process visible in /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces): state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            found[int(entry.name)] = int(fields[2])
    return found


def processes_in_groups(groups: set[int]) -> list[int]:
    return [pid for pid, group in live_processes().items() if group in groups]


def pid_alive(pid: int) -> bool:
    return pid in live_processes() and pid != os.getpid()


def instance_log(cloud, instance_id: str) -> str:
    """What the instance's user data has written so far (its console)."""
    path = cloud.work_dir / "logs" / f"{instance_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_log_line(cloud, instance_id: str, marker: str, timeout: float) -> str:
    """Wait until the instance's log has a line starting with ``marker``; the whole log."""

    def found() -> str | None:
        text = instance_log(cloud, instance_id)
        return text if any(line.startswith(marker) for line in text.splitlines()) else None

    return wait_for(found, timeout, f"{marker!r} in the log of {instance_id}")  # type: ignore[return-value]


def launch_instance(cloud, user_data: bytes | str, image_id: str | None = None, **params) -> str:
    """One instance (of ``image_id``, default the local cloud's AMI) with the worker instance profile,
    terminated when it shuts down; its id."""
    answer = cloud.client("ec2").run_instances(
        ImageId=image_id or cloud.ami_id,
        MinCount=1,
        MaxCount=1,
        UserData=user_data,
        InstanceInitiatedShutdownBehavior="terminate",
        IamInstanceProfile={"Name": cloud.instance_profile_name},
        **params,
    )
    return answer["Instances"][0]["InstanceId"]


BUNDLE_BUCKET = "ec2cluster-localcloud-tests"  # within the project policies' default pattern (ec2cluster-*)


def stored_bundle(
    cloud, cluster_id: str, code=(), requirements=(), *, python_version=None, bucket=BUNDLE_BUCKET
):
    """Build the cluster's bundle as the launch does, store it in the local cloud's S3; boot.json's entry."""
    from airflow_ec2cluster.aws.s3 import bundle_object_key
    from airflow_ec2cluster.bundle import Target, build_bundle
    from airflow_ec2cluster.defaults import DEFAULT_BUNDLE_PREFIX

    bundle = build_bundle(list(code), list(requirements), Target(python_version=python_version))
    s3 = cloud.client("s3")
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
    key = bundle_object_key(DEFAULT_BUNDLE_PREFIX, cluster_id, bundle.sha256)
    s3.upload_file(str(bundle.path), bucket, key)
    return {"sha256": bundle.sha256, "size": bundle.size, "s3": {"bucket": bucket, "key": key}}


def worker_user_data(cloud, config: dict, code=(), requirements=(), **render_options) -> bytes:
    """User data of a worker running ``config``, with its bundle stored, as the launch renders it."""
    from airflow_ec2cluster.userdata import render_user_data

    bundle = stored_bundle(cloud, config["cluster_id"], code, requirements)
    return render_user_data(config, bundle=bundle, **render_options)


def instance_left_behind(image: dict) -> list[str]:
    """What of an image-backed instance (``worker_processes()[id]["image"]``) is still there.

    A namespace's id alone cannot tell: the kernel gives a freed namespace's id to the next one created
    (another test's instance, on the other xdist worker, within the same second). So: its init (the kernel
    ends every other process of a PID namespace before its init is gone), this process's threads or open
    descriptors in its mount or network namespace (the runner's listener threads join the latter), and its
    overlay in the host's mount table.
    """
    left = []
    init = image["init_pid"]
    if init is not None and _readlink(f"/proc/{init}/ns/pid") == image["pid_namespace"]:
        left.append(f"its init (pid {init})")
    for kind, ns in (("mnt", image["mount_namespace"]), ("net", image["net_namespace"])):
        links = [f"/proc/self/task/{tid}/ns/{kind}" for tid in os.listdir("/proc/self/task")]
        links += [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")]
        if any(_readlink(link) == ns for link in links):
            left.append(f"this process in or holding its {kind} namespace {ns}")
    if any(image["root"] in line for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        left.append(f"its root {image['root']} mounted on the host")
    return left


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
