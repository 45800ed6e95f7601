"""LocalCloud: a moto server subprocess plus the instance runner, as one context manager.

    with LocalCloud() as cloud:
        os.environ.update(cloud.env())      # boto3 now talks to the local cloud
        ...                                 # RunInstances starts real worker processes

On exit (normal, exception or Ctrl-C) it stops every instance's process group, then the server, and
leaves no child process behind.

The account has what a new AWS account has: a default VPC with an internet gateway (0.0.0.0/0 on its main
route table), so an instance launched in it with a public IP reaches AWS's services and the internet. What
an instance reaches follows the VPC's state (``ec2cluster_localcloud.network``); the internet is a local
package index (``package_index_url``) over a wheel cache (``wheel_cache``).

Capacity (``ec2cluster_localcloud.capacity``): each (instance type, zone, market) pool and each vCPU quota
is unlimited unless set (``capacity=`` a document or its file, ``set_capacity``, ``set_vcpu_quota``, the
work dir's ``capacity.json``, or the control server); RunInstances and CreateFleet answer as EC2 does when
a pool is dry or a quota is reached. Spot instances can be interrupted one by one, the oldest N of a
cluster, or at random (``set_spot_interruptions``).

Its default AMI (``ami_id``) runs an instance's user data as a process on the host. An image-backed AMI
(``register_rootfs_image``: a real Debian root filesystem, built once with debootstrap and cached in
``image_cache``) boots each instance as an isolated root of its own
(``ec2cluster_localcloud.rootfs_instance``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import boto3
from botocore.config import Config

from ec2cluster_localcloud import capacity as capacity_model
from ec2cluster_localcloud.account import ROOT_ACCESS_KEY_ID, ROOT_SECRET_ACCESS_KEY
from ec2cluster_localcloud.blackhole import REACHABILITY_FILE
from ec2cluster_localcloud.control import (
    CAPACITY,
    CONTROL_URL_ENV,
    INTERRUPT_OLDEST_SPOT,
    REBALANCE_RECOMMENDATION,
    SPOT_INTERRUPTION,
    SPOT_INTERRUPTIONS,
    ControlServer,
)
from ec2cluster_localcloud.images import ensure_rootfs
from ec2cluster_localcloud.package_index import PYPI_SIMPLE, PackageIndex, WheelCache
from ec2cluster_localcloud.rootfs_instance import ROOTFS_TAG
from ec2cluster_localcloud.runner import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_POLL_SECONDS,
    SPOT_NOTICE_SECONDS,
    InstanceRunner,
)

log = logging.getLogger(__name__)

INSTANCE_PROFILE_NAME = "ec2cluster-worker"
CLUSTER_TAG = "ec2cluster:cluster-id"
AMI_NAME = "ec2cluster-local-worker"
SERVER_START_TIMEOUT_SECONDS = 60.0
SERVER_STOP_TIMEOUT_SECONDS = 10.0
EC2_ASSUME_ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ],
}


class LocalCloudError(RuntimeError):
    """The local cloud could not start."""


class LocalCloud:
    """A moto server on 127.0.0.1 and an instance runner; see the module docstring."""

    def __init__(
        self,
        port: int = 0,
        region: str = "us-east-1",
        *,
        work_dir: str | Path | None = None,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        sqs_speedup: bool = True,
        enforce_iam: bool = True,
        wheel_cache: str | Path | None = None,
        package_upstream: str | None = PYPI_SIMPLE,
        image_cache: str | Path | None = None,
        capacity: str | Path | Mapping | None = None,
    ):
        """``capacity``: the capacity document (a dict or a JSON file's path; see
        ``ec2cluster_localcloud.capacity``; default: everything unlimited). ``wheel_cache``: the package
        index's directory of wheels (default
        ``~/.cache/ec2cluster-localcloud/wheels``, shared across runs); ``package_upstream``: the index a
        project missing from it is fetched from once (None: serve the cache only, never leave loopback);
        ``image_cache``: where image-backed AMIs' root filesystems are cached (default
        ``~/.cache/ec2cluster-localcloud/images``, see ``ec2cluster_localcloud.images``)."""
        self.port = port
        self.region = region
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.sqs_speedup = sqs_speedup
        self.enforce_iam = enforce_iam
        self._given_work_dir = Path(work_dir) if work_dir is not None else None
        self.work_dir: Path | None = None
        self.endpoint_url: str | None = None
        self.ami_id: str | None = None
        self.instance_profile_name = INSTANCE_PROFILE_NAME
        self._server: subprocess.Popen | None = None
        self._runner: InstanceRunner | None = None
        self._control: ControlServer | None = None
        self.control_url: str | None = None
        self.wheel_cache = WheelCache(wheel_cache)
        self.package_upstream = package_upstream
        self._package_index: PackageIndex | None = None
        self.package_index_url: str | None = None
        self.image_cache = Path(image_cache) if image_cache is not None else None
        self._initial_capacity = capacity_model.load(capacity)  # checked now: a bad one never starts
        self._capacity_lock = threading.Lock()
        self.capacity_file: Path | None = None

    # Context manager

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self.work_dir = self._given_work_dir or Path(tempfile.mkdtemp(prefix="ec2cluster-localcloud-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.capacity_file = self.work_dir / capacity_model.CAPACITY_FILE
        capacity_model.write(self.capacity_file, self._initial_capacity)
        try:
            self._package_index = PackageIndex(self.wheel_cache, upstream=self.package_upstream)
            self.package_index_url = self._package_index.start()
            self.endpoint_url = self._start_server()
            self._bootstrap_account()
            self._runner = InstanceRunner(
                self.endpoint_url,
                self.region,
                self.work_dir,
                env=self.env(),
                poll_seconds=self.poll_seconds,
                grace_seconds=self.grace_seconds,
                package_index_url=self.package_index_url,
                reachability_file=self.work_dir / REACHABILITY_FILE,
                image_cache=self.image_cache,
            )
            self._runner.start()
            self._control = ControlServer(
                {
                    SPOT_INTERRUPTION: lambda body: self.inject_spot_interruption(
                        str(body["instance_id"]), float(body.get("notice_seconds", SPOT_NOTICE_SECONDS))
                    ),
                    REBALANCE_RECOMMENDATION: lambda body: self.inject_rebalance_recommendation(
                        str(body["instance_id"])
                    ),
                    CAPACITY: self._control_capacity,
                    SPOT_INTERRUPTIONS: lambda body: self.set_spot_interruptions(
                        float(body.get("rate_per_hour", 0)),
                        float(body.get("notice_seconds", SPOT_NOTICE_SECONDS)),
                        seed=body.get("seed"),
                    ),
                    INTERRUPT_OLDEST_SPOT: lambda body: {
                        "instance_ids": self.interrupt_oldest_spot_instances(
                            int(body.get("count", 1)),
                            float(body.get("notice_seconds", SPOT_NOTICE_SECONDS)),
                            cluster_id=body.get("cluster_id"),
                            tags=body.get("tags"),
                        )
                    },
                }
            )
            self.control_url = self._control.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the workers' process groups, then the server. Safe to call twice."""
        # A second Ctrl-C must not leave children behind: ignore SIGINT while cleaning up (main thread only).
        restore = _ignore_sigint()
        try:
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._runner is not None:
                self._runner.stop()
                self._runner = None
            if self._server is not None:
                _stop_process(self._server, SERVER_STOP_TIMEOUT_SECONDS)
                self._server = None
            if self._package_index is not None:
                self._package_index.close()
                self._package_index = None
            if self._given_work_dir is None and self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        finally:
            restore()

    # What clients need

    def env(self) -> dict[str, str]:
        """The environment a client (boto3, the AWS CLI, Airflow) needs to use the local cloud."""
        self._require_started()
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ROOT_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": ROOT_SECRET_ACCESS_KEY,
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def airflow_conn_env(
        self, conn_id: str = "aws_default", credentials: dict[str, str] | None = None
    ) -> dict[str, str]:
        """An ``AIRFLOW_CONN_<ID>`` variable pointing the amazon provider at the local cloud.

        ``credentials`` (an IAM user's AccessKeyId and SecretAccessKey, from ``create_user``): the
        connection acts as that user; without, as the account's root.
        """
        self._require_started()
        credentials = credentials or {
            "AccessKeyId": ROOT_ACCESS_KEY_ID,
            "SecretAccessKey": ROOT_SECRET_ACCESS_KEY,
        }
        connection = {
            "conn_type": "aws",
            "login": credentials["AccessKeyId"],
            "password": credentials["SecretAccessKey"],
            "extra": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }
        return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(connection)}

    # Identities (the account's root creates them; with enforce_iam, their policies are all they may do)

    def create_user(self, name: str, policy: dict) -> dict[str, str]:
        """An IAM user holding exactly ``policy`` (inline); its access key (AccessKeyId, SecretAccessKey)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}

    def set_user_policy(self, name: str, policy: dict) -> None:
        """Replace the user's policy (takes effect on its next request)."""
        self.client("iam").put_user_policy(
            UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy)
        )

    def set_worker_policy(self, policy: dict, role: str = INSTANCE_PROFILE_NAME) -> None:
        """The worker role's one policy: what instances launched with its profile may do."""
        self.client("iam").put_role_policy(
            RoleName=role, PolicyName=f"{role}-policy", PolicyDocument=json.dumps(policy)
        )

    def control_env(self) -> dict[str, str]:
        """Where ``ec2cluster-localcloud spot-interrupt`` and ``rebalance`` find this local cloud."""
        self._require_started()
        return {CONTROL_URL_ENV: self.control_url}

    def inject_spot_interruption(self, instance_id: str, notice_seconds: float = SPOT_NOTICE_SECONDS) -> None:
        """Post a spot interruption notice in the instance's metadata; terminate it when the notice ends.

        EC2 gives two minutes; a test may give less. KeyError for an instance that is not running here.
        """
        self._require_started()
        if notice_seconds < 0:
            raise ValueError(f"notice_seconds must be 0 or more, not {notice_seconds}")
        self._runner.inject_spot_interruption(instance_id, notice_seconds)

    def inject_rebalance_recommendation(self, instance_id: str) -> None:
        """Post an EC2 rebalance recommendation in the instance's metadata (nothing is terminated)."""
        self._require_started()
        self._runner.inject_rebalance_recommendation(instance_id)

    # Capacity and spot interruptions

    def capacity(self) -> dict:
        """The capacity document now (what the work dir's ``capacity.json`` says)."""
        self._require_started()
        return capacity_model.load(self.capacity_file)

    def set_capacity_document(self, document: Mapping | str | Path | None) -> dict:
        """Replace the whole document (None: everything unlimited); the next launch obeys it."""
        self._require_started()
        with self._capacity_lock:
            new = capacity_model.load(document)
            capacity_model.write(self.capacity_file, new)
        return new

    def set_capacity(
        self, instance_type: str, availability_zone: str, market: str, count: int | None
    ) -> dict:
        """How many instances of the pool may be live at once (None: unlimited); market ``on-demand`` or
        ``spot``. Takes effect at the next launch; returns the document."""
        self._require_started()
        with self._capacity_lock:
            new = capacity_model.with_pool(
                capacity_model.load(self.capacity_file), instance_type, availability_zone, market, count
            )
            capacity_model.write(self.capacity_file, new)
        return new

    def set_vcpu_quota(self, market: str, group: str, vcpus: int | None) -> dict:
        """The vCPU quota of an instance-family group (``standard``, ``g``, ``p``...) on a market (None:
        unlimited). Takes effect at the next launch; returns the document."""
        self._require_started()
        with self._capacity_lock:
            new = capacity_model.with_quota(capacity_model.load(self.capacity_file), market, group, vcpus)
            capacity_model.write(self.capacity_file, new)
        return new

    def _control_capacity(self, body: dict) -> dict:
        if "document" in body:
            self.set_capacity_document(body["document"])
        pool = body.get("pool")
        if pool is not None:
            self.set_capacity(
                str(pool["instance_type"]),
                str(pool["availability_zone"]),
                str(pool["market"]),
                pool.get("capacity"),
            )
        quota = body.get("vcpu_quota")
        if quota is not None:
            self.set_vcpu_quota(str(quota["market"]), str(quota["group"]), quota.get("vcpus"))
        return {"capacity": self.capacity()}

    def set_spot_interruptions(
        self, rate_per_hour: float, notice_seconds: float = SPOT_NOTICE_SECONDS, seed: int | None = None
    ) -> None:
        """Interrupt running spot instances at random, as EC2 reclaims capacity: ``rate_per_hour``
        interruptions per instance-hour (0: none; ``math.inf``: every one at the runner's next poll), each
        through the notice path (metadata ``spot/instance-action``, then terminated after
        ``notice_seconds``); ``seed`` makes the draws repeatable."""
        self._require_started()
        self._runner.set_spot_interruptions(rate_per_hour, notice_seconds, seed)

    def interrupt_oldest_spot_instances(
        self,
        count: int = 1,
        notice_seconds: float = SPOT_NOTICE_SECONDS,
        *,
        cluster_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[str]:
        """A notice now to the ``count`` oldest running spot instances (of ``cluster_id``: its
        ``ec2cluster:cluster-id`` tag; with ``tags``) that have none yet; their ids, oldest first."""
        self._require_started()
        if count < 0:
            raise ValueError(f"count must be 0 or more, not {count}")
        wanted = dict(tags or {})
        if cluster_id is not None:
            wanted[CLUSTER_TAG] = cluster_id
        # (moto's DescribeInstances has no instance-lifecycle filter: the lifecycle is checked below)
        filters = [{"Name": "instance-state-name", "Values": ["running"]}] + [
            {"Name": f"tag:{key}", "Values": [value]} for key, value in wanted.items()
        ]
        found = [
            instance
            for page in self.client("ec2").get_paginator("describe_instances").paginate(Filters=filters)
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
            if instance.get("InstanceLifecycle") == "spot"
        ]
        processes = self.worker_processes()
        candidates = sorted(
            (
                i
                for i in found
                if i["InstanceId"] in processes
                and processes[i["InstanceId"]]["metadata_url"]
                and not processes[i["InstanceId"]]["spot_notice"]
            ),
            key=lambda i: (i["LaunchTime"], i.get("AmiLaunchIndex", 0), i["InstanceId"]),
        )
        chosen = [i["InstanceId"] for i in candidates[:count]]
        for instance_id in chosen:
            self.inject_spot_interruption(instance_id, notice_seconds)
        return chosen

    def register_rootfs_image(self, flavour: str = "debian-12") -> str:
        """An AMI backed by a real root filesystem (``debian-12``: Debian 12 minimal, python3 without pip,
        PEP 668; ``debian-11``), built with debootstrap on first use (about a minute, then cached); its id.

        Its instances boot as isolated roots of their own and run their user data as root, as cloud-init
        does (ec2cluster_localcloud.rootfs_instance). Raises ImageError when the image cannot be built."""
        self._require_started()
        ensure_rootfs(flavour, self.image_cache)
        ec2 = self.client("ec2")
        image_id = ec2.register_image(
            Name=f"ec2cluster-local-{flavour}",
            Description=f"airflow-ec2cluster local image: a {flavour} root filesystem",
            Architecture="x86_64",
            RootDeviceName="/dev/xvda",
            VirtualizationType="hvm",
        )["ImageId"]
        # moto's RegisterImage drops TagSpecifications: tag it afterwards (the runner reads this tag).
        ec2.create_tags(Resources=[image_id], Tags=[{"Key": ROOTFS_TAG, "Value": flavour}])
        return image_id

    def add_wheel(self, path: str | Path) -> Path:
        """Put a wheel (or sdist) in the package index's cache, for instances that reach the internet."""
        return self.wheel_cache.add(path)

    def worker_processes(self) -> dict[str, dict]:
        """Instance id -> its process (pid, pgid, alive, returncode, home, log_path, and what its network
        reaches: ``reachable`` {destination: through what}, ``unreachable`` {destination: why not})."""
        return self._runner.processes() if self._runner is not None else {}

    def client(self, service: str, credentials: dict[str, str] | None = None):
        """A boto3 client for the local cloud: as the root, or with ``credentials`` (AccessKeyId,
        SecretAccessKey and, for a role session, SessionToken: what IAM and STS return)."""
        self._require_started()
        credentials = credentials or {
            "AccessKeyId": ROOT_ACCESS_KEY_ID,
            "SecretAccessKey": ROOT_SECRET_ACCESS_KEY,
        }
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials.get("SessionToken"),
            config=Config(retries={"mode": "standard"}),
        )

    # Start-up

    def _require_started(self) -> None:
        if self.endpoint_url is None:
            raise LocalCloudError("the local cloud is not started: use it as a context manager")

    def _start_server(self) -> str:
        command = [sys.executable, "-m", "ec2cluster_localcloud.server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port)]
        if not self.sqs_speedup:
            command.append("--no-sqs-speedup")
        if self.enforce_iam:
            command.append("--enforce-iam")
        command += ["--work-dir", str(self.work_dir)]
        command += ["--reachability-file", str(self.work_dir / REACHABILITY_FILE)]
        with open(self.work_dir / "server.log", "ab") as server_log:
            self._server = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=server_log,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it after the workers
            )
        endpoint_url = _read_ready_line(self._server, SERVER_START_TIMEOUT_SECONDS, self.work_dir)
        _wait_until_answering(endpoint_url, SERVER_START_TIMEOUT_SECONDS)
        return endpoint_url

    def _bootstrap_account(self) -> None:
        """What a real account would have: the worker instance profile and an AMI to launch."""
        iam = self.client("iam")
        iam.create_role(
            RoleName=INSTANCE_PROFILE_NAME, AssumeRolePolicyDocument=json.dumps(EC2_ASSUME_ROLE_POLICY)
        )
        iam.create_instance_profile(InstanceProfileName=INSTANCE_PROFILE_NAME)
        iam.add_role_to_instance_profile(
            InstanceProfileName=INSTANCE_PROFILE_NAME, RoleName=INSTANCE_PROFILE_NAME
        )
        image = self.client("ec2").register_image(
            Name=AMI_NAME,
            Description="airflow-ec2cluster local worker image (runs the user data as a local process)",
            Architecture="x86_64",
            RootDeviceName="/dev/xvda",
            VirtualizationType="hvm",
        )
        self.ami_id = image["ImageId"]


def _read_ready_line(process: subprocess.Popen, timeout: float, work_dir: Path) -> str:
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, remaining))
        if not ready:
            raise LocalCloudError(
                f"the local cloud's server did not start in {timeout:.0f} s; see {work_dir}/server.log"
            )
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            raise LocalCloudError(
                f"the local cloud's server exited (status {process.wait()}); see {work_dir}/server.log"
            )
        line += chunk
    process.stdout.close()
    # Imported here: importing the server module at package import would make `python -m ...server`
    # import it twice (runpy warns).
    from ec2cluster_localcloud.server import READY_PREFIX

    text = line.decode().strip()
    if not text.startswith(READY_PREFIX + " "):
        raise LocalCloudError(f"unexpected first line from the local cloud's server: {text!r}")
    return text.split(" ", 1)[1]


def _wait_until_answering(endpoint_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint_url}/moto-api/", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise LocalCloudError(f"the local cloud's server at {endpoint_url} does not answer") from None
            time.sleep(0.05)


def _stop_process(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _ignore_sigint():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)
