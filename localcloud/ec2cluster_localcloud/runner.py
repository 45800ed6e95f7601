"""The instance runner: every instance launched on the local cloud becomes a real process.

It polls the local cloud's EC2 (DescribeInstances) and, for each instance that reaches pending/running,
starts the instance's metadata service (ec2cluster_localcloud.metadata) and runs the instance's own user
data (``bash <script>``) in a process group of its own. The script gets what an instance gives it: the
metadata service's address, where it finds its instance id and its instance profile's credentials. It gets
no worker id, no credentials and no region. Its network is its VPC's (``ec2cluster_localcloud.network``):
at launch the runner reads the VPC's state, decides what the instance reaches, and stands in for DNS with
botocore's per-service endpoint variables (``AWS_ENDPOINT_URL_SQS``, ...; ``SERVICE_ENDPOINT_VARIABLES``):
the local cloud's endpoint for what it reaches, a blackhole (connections time out) for what it does not;
``AWS_ENDPOINT_URL`` (every other service: a public endpoint) and ``PIP_INDEX_URL`` (the local package
index) only when it reaches the internet. Its metadata is always reachable. The verdicts go to
``InstanceProcess.info()``, the log, and the reachability file the server enforces too. When an instance is
stopped or terminated its process group gets SIGTERM, then SIGKILL after a grace period. Its ``shutdown``
(``poweroff``, ``halt``: commands first on its PATH) powers it off the way EC2 would: the runner
terminates it (or stops it, as InstanceInitiatedShutdownBehavior says); a script that exits without
shutting down leaves it running, billed, as on EC2. The instance gets its own home (``EC2CLUSTER_HOME``)
and cloud-init directory (``EC2CLUSTER_CLOUD_DIR``) but shares the host's filesystem and interpreters:
the host is its image. A spot interruption notice can be injected: the instance is
reclaimed (terminated) when its notice period ends. Interruptions can also come at random
(``set_spot_interruptions``: a rate per instance-hour; at each poll every running spot instance without a
notice gets one with probability 1 - exp(-rate x the time since its last draw), through the same notice),
as EC2 reclaims spot capacity.

Like cloud-init, it runs an instance's user data once, at its first boot.

A reboot (RebootInstances, which the server passes on through ``<work dir>/reboot-requests``, or ``reboot``
run on the instance) restarts the instance's OS as on EC2: every process ends (SIGTERM, then SIGKILL after
the grace period: a hard reboot), the disk stays, the instance stays running with its id, metadata and
instance profile, and it boots again: cloud-init runs the executable files of its
``scripts/per-boot/`` in name order (a process-backed instance's are in its ``EC2CLUSTER_CLOUD_DIR``),
never the user data again. A process-backed instance without per-boot scripts then idles (no process),
running and billed, as on EC2. Each reboot is in the runner's log and on the instance's console
(``ec2cluster-localcloud: reboot``); ``InstanceProcess.info()`` counts the ``boots``.

An instance of an image-backed AMI (tagged ``ec2cluster-localcloud:rootfs``:
``LocalCloud.register_rootfs_image``) boots instead as an isolated root of its own
(``ec2cluster_localcloud.rootfs_instance``): the same metadata, endpoints and shutdown logic, in its own
namespaces, with cloud-init's environment; it runs until it powers itself off (``shutdown -h now``) or EC2
stops or terminates it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import logging
import math
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

from ec2cluster_localcloud.blackhole import Blackhole, ReachabilityFile
from ec2cluster_localcloud.images import ensure_rootfs
from ec2cluster_localcloud.metadata import CREDENTIAL_SECONDS, InstanceFacts, InstanceMetadataService
from ec2cluster_localcloud.network import INTERNET, Network, Reachability, reachability
from ec2cluster_localcloud.rootfs_instance import (
    DEFAULT_SIGNALS,
    REBOOT_EXIT_STATUS,
    ROOTFS_TAG,
    RootfsInstance,
    RootfsInstanceError,
)

log = logging.getLogger(__name__)
GZIP_MAGIC = b"\x1f\x8b"

RUNNING_STATES = frozenset({"pending", "running"})
DEFAULT_POLL_SECONDS = 0.4
# SIGTERM to SIGKILL. EC2 gives a shutting-down instance's processes time to stop; a worker needs about 1.5 s
# when idle (ec2cluster_worker.receiver: it does not wait out its long poll) plus whatever is left of the
# task in hand, and writes its 'stopped' status item first. 30 s covers that with room for a busy machine.
DEFAULT_GRACE_SECONDS = 30.0
KILL_WAIT_SECONDS = 5.0
# What an instance's processes inherit from the runner's environment: the host's basics. Nothing that names
# the account, its credentials or the region, nor the host's Python modules (PYTHONPATH).
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
POWER_OFF_MARKER = ".powered-off"
REBOOT_MARKER = ".reboot-requested"
REBOOT_REQUESTS_FILE = "reboot-requests"  # in the work dir: RebootInstances' instance ids (server.py)
CONSOLE_REBOOT_LINE = "ec2cluster-localcloud: reboot"
# A process-backed instance's shutdown/poweroff/halt: mark the power-off, then SIGTERM its process group
# (the instance's processes); the runner then stops or terminates it, as InstanceInitiatedShutdownBehavior
# says. reboot: SIGTERM only, after marking a reboot request the runner acts on.
POWER_COMMAND = """#!/bin/sh
# ec2cluster-localcloud: power this process-backed instance off (never the host)
touch "{marker}"
kill -TERM 0
"""
REBOOT_COMMAND = """#!/bin/sh
# ec2cluster-localcloud: reboot this process-backed instance (never the host)
touch "{marker}"
kill -TERM 0
"""
# A process-backed instance's boot after a reboot: its per-boot scripts (arguments), in order, each waited
# for, as cloud-init runs them.
PER_BOOT_COMMAND = """for script in "$@"; do
  "$script" </dev/null
  echo "ec2cluster-localcloud: per-boot script ${script##*/} exited with status $?"
done
"""
SPOT_NOTICE_SECONDS = 120.0  # EC2's two-minute warning
# botocore's per-service endpoint variables: where each service's requests go (DNS, on EC2).
SERVICE_ENDPOINT_VARIABLES = {
    "sqs": "AWS_ENDPOINT_URL_SQS",
    "dynamodb": "AWS_ENDPOINT_URL_DYNAMODB",
    "s3": "AWS_ENDPOINT_URL_S3",
    "sts": "AWS_ENDPOINT_URL_STS",
    "ec2": "AWS_ENDPOINT_URL_EC2",
    "logs": "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
}


@dataclass
class InstanceProcess:
    """One instance's process (None when its user data was empty) and what the runner did to it."""

    instance_id: str
    home: Path
    log_path: Path
    shutdown_behavior: str
    process: subprocess.Popen | None
    started_at: float = field(default_factory=time.monotonic)
    metadata: InstanceMetadataService | None = None
    term_sent_at: float | None = None
    killed: bool = False
    shutdown_requested: bool = False
    reclaim_at: float | None = None  # monotonic: when an injected spot notice's period ends
    reclaimed: bool = False
    reachability: Reachability | None = None  # what its network reaches, decided at launch
    rootfs: RootfsInstance | None = None  # an image-backed instance's root and namespaces
    facts: InstanceFacts | None = None  # what its metadata says (the same at every boot)
    boots: int = 1
    reboot_sent_at: float | None = None  # monotonic: a reboot is under way (its processes are ending)
    spot_action_time: float | None = None  # wall clock: an injected spot notice's time (kept over reboots)
    rebalance_recommended: bool = False
    boot_failed: bool = False  # an image-backed instance's root did not boot: it powers off
    spot: bool = False  # InstanceLifecycle spot: EC2 may reclaim it (random interruptions)
    interruption_drawn_at: float | None = None  # monotonic: the last random interruption draw

    @property
    def alive(self) -> bool:
        """The script, or anything it started in its process group, still runs."""
        if self.process is None:
            return False
        return self.process.poll() is None or group_exists(self.process.pid)

    @property
    def script_exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    @property
    def rebooting(self) -> bool:
        return self.reboot_sent_at is not None

    @property
    def reboot_requested(self) -> bool:
        """``reboot`` ran on the instance: an image-backed instance's init ended for a reboot; a
        process-backed one has its reboot marker."""
        if self.rootfs is not None:
            return (
                not self.boot_failed and self.script_exited and self.process.returncode == REBOOT_EXIT_STATUS
            )
        return (self.home / REBOOT_MARKER).exists()

    @property
    def powered_off(self) -> bool:
        """It powered itself off: an image-backed instance's init ended (not for a reboot); a process-backed
        one ran ``shutdown`` (its marker) and its script has exited. A script that exits without shutting
        down leaves the instance running, billed, as on EC2, and so does a reboot (under way, or asked for
        on the instance: a ``shutdown`` its ending processes run then changes nothing)."""
        if self.boot_failed:
            return not self.alive
        if not self.script_exited or self.rebooting or self.reboot_requested:
            return False
        return self.rootfs is not None or (self.home / POWER_OFF_MARKER).exists()

    @property
    def powering_off(self) -> bool:
        """A power-off is under way or done (a process-backed instance ran ``shutdown``; an image-backed
        one's init ended, not for a reboot): a reboot requested now is too late. The first ending wins."""
        if self.reboot_requested:
            return False
        if self.rootfs is not None:
            return self.boot_failed or self.script_exited
        return (self.home / POWER_OFF_MARKER).exists()

    @property
    def shut_down_while_rebooting(self) -> bool:
        """An image-backed instance's init powered off instead (a ``shutdown`` reached it before the
        reboot did): the instance powers off."""
        return self.rootfs is not None and self.script_exited and self.process.returncode == 0

    def info(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "pid": self.process.pid if self.process else None,
            "pgid": self.process.pid if self.process else None,
            "alive": self.alive,
            "returncode": self.process.poll() if self.process else None,
            "home": str(self.home),
            "log_path": str(self.log_path),
            "term_sent": self.term_sent_at is not None,
            "killed": self.killed,
            "metadata_url": self.metadata.url if self.metadata else None,
            "reclaimed": self.reclaimed,
            "reachable": dict(self.reachability.to_dict()["reachable"]) if self.reachability else {},
            "unreachable": self.reachability.unreachable if self.reachability else {},
            "image": self.rootfs.info() if self.rootfs else None,
            "boots": self.boots,
            "rebooting": self.rebooting,
            "spot": self.spot,
            "spot_notice": self.reclaim_at is not None,
        }


@dataclass(frozen=True)
class Plan:
    """What one poll decided: instances to start, groups to stop, instances to shut down or to reclaim,
    instances to reboot (their processes end), to boot again (they have ended) or to hard-reboot (they
    outlived the grace period: SIGKILL)."""

    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    shut_down: tuple[str, ...] = ()
    kill: tuple[str, ...] = ()
    reclaim: tuple[str, ...] = ()  # spot notices whose period has ended: EC2 terminates the instance
    reboot: tuple[str, ...] = ()
    boot: tuple[str, ...] = ()
    hard_reboot: tuple[str, ...] = ()


def plan(
    states: Mapping[str, str],
    processes: Mapping[str, InstanceProcess],
    now: float,
    grace_seconds: float,
    reboot_requests: Iterable[str] = (),
) -> Plan:
    """Decide from instance states, process records and RebootInstances' requests (pure: no calls).

    A reboot (requested, or asked for on the instance) goes to a running instance the runner is neither
    stopping nor powering off, and that is not powering itself off; one already under way absorbs another
    request. Its end is not a power-off (a ``shutdown`` its ending processes run is ignored): the instance
    boots again once its processes are gone, unless an image-backed instance's init had begun a power-off.
    """
    requested = set(reboot_requests)
    start, stop, shut_down, kill, reclaim, reboot, boot, hard = [], [], [], [], [], [], [], []
    for instance_id, state in sorted(states.items()):
        record = processes.get(instance_id)
        if record is None:
            if state in RUNNING_STATES:
                start.append(instance_id)
            continue
        running = state in RUNNING_STATES
        ending = record.term_sent_at is not None or record.shutdown_requested
        if running and record.reclaim_at is not None and now >= record.reclaim_at and not record.reclaimed:
            reclaim.append(instance_id)
        if not running and record.alive and record.term_sent_at is None:
            stop.append(instance_id)
        elif not running or ending:
            continue
        elif record.rebooting:
            if not record.alive:
                (shut_down if record.shut_down_while_rebooting else boot).append(instance_id)
        elif record.reboot_requested or (instance_id in requested and not record.powering_off):
            reboot.append(instance_id)
        elif record.powered_off:
            shut_down.append(instance_id)
    for instance_id, record in sorted(processes.items()):
        if record.term_sent_at is not None and record.alive and now - record.term_sent_at >= grace_seconds:
            kill.append(instance_id)
        elif (
            record.term_sent_at is None
            and record.rebooting
            and record.alive
            and now - record.reboot_sent_at >= grace_seconds
        ):
            hard.append(instance_id)
    return Plan(
        tuple(start),
        tuple(stop),
        tuple(shut_down),
        tuple(kill),
        tuple(reclaim),
        tuple(reboot),
        tuple(boot),
        tuple(hard),
    )


def read_reboot_requests(path: Path, offset: int) -> tuple[list[str], int]:
    """The instance ids appended to ``path`` (server.py's reboot requests) since ``offset``, and the
    offset to read from next time: complete lines only (a line still being written waits)."""
    try:
        with open(path, "rb") as requests:
            requests.seek(offset)
            data = requests.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    ids = [line.strip() for line in complete.decode("utf-8", errors="replace").splitlines()]
    return [instance_id for instance_id in ids if instance_id], offset + len(complete)


def per_boot_scripts(directory: Path) -> list[Path]:
    """What cloud-init runs at every boot: the executable files of ``directory``, in name order."""
    try:
        entries = sorted(directory.iterdir(), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [entry for entry in entries if entry.is_file() and os.access(entry, os.X_OK)]


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(record: InstanceProcess, signum: int) -> None:
    if record.process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(record.process.pid, signum)


class InstanceRunner:
    """Runs the local cloud's instances as process groups; ``start()`` polls in a thread."""

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        work_dir: Path,
        *,
        env: Mapping[str, str],
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        package_index_url: str | None = None,
        reachability_file: Path | None = None,
        image_cache: Path | None = None,
    ):
        self.endpoint_url = endpoint_url
        self.image_cache = image_cache
        self._image_flavours: dict[str, str | None] = {}
        self.package_index_url = package_index_url
        self.reachability_file = ReachabilityFile(reachability_file or Path(work_dir) / "reachability.json")
        self._reachability: dict[str, Reachability] = {}
        self.blackhole = Blackhole()
        self.region = region
        self.work_dir = Path(work_dir)
        self.cloud_env = dict(env)
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self._processes: dict[str, InstanceProcess] = {}
        self.reboot_requests_file = self.work_dir / REBOOT_REQUESTS_FILE
        self._reboot_requests_offset = 0
        self._lock = threading.Lock()
        self._poll_lock = threading.RLock()
        self._interruption_rate = 0.0  # per instance-hour
        self._interruption_notice = SPOT_NOTICE_SECONDS
        self._random = random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ec2, self._iam, self._sts = (
            boto3.client(
                service,
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                config=Config(retries={"mode": "standard"}),
            )
            for service in ("ec2", "iam", "sts")
        )

    # Lifecycle

    def start(self) -> None:
        check = subprocess.run([*DEFAULT_SIGNALS, "true"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(
                f"the instance runner starts instances with `{' '.join(DEFAULT_SIGNALS)}` (GNU coreutils "
                f"8.31 or newer), which this machine's env refuses: {check.stderr.strip()}"
            )
        self._thread = threading.Thread(target=self._run, name="ec2cluster-instance-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, then SIGTERM every live process group, SIGKILL what outlives the grace period."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            records = list(self._processes.values())
        self.stop_processes(records)
        for record in records:
            if record.metadata is not None:
                record.metadata.close()
            if record.rootfs is not None:
                record.rootfs.close()
        self.blackhole.close()

    def stop_processes(self, records: Iterable[InstanceProcess]) -> None:
        records = [r for r in records if r.process is not None]
        for record in records:
            if record.alive:
                self._terminate(record)
        deadline = time.monotonic() + self.grace_seconds
        while any(record.alive for record in records) and time.monotonic() < deadline:
            time.sleep(0.05)
        for record in records:
            # Also ends whatever the script left in its group after exiting.
            record.killed = record.killed or record.alive
            signal_group(record, signal.SIGKILL)
            record.process.wait()
        # SIGKILL is not instantaneous: return once the groups are gone, so that nothing outlives stop().
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while any(group_exists(r.process.pid) for r in records) and time.monotonic() < deadline:
            time.sleep(0.02)

    def processes(self) -> dict[str, dict]:
        with self._lock:
            return {instance_id: record.info() for instance_id, record in self._processes.items()}

    # Polling

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # keep running: the next poll retries; the failure is logged
                log.exception("instance runner poll failed")
            self._stop.wait(self.poll_seconds)

    def poll_once(self) -> Plan:
        with self._poll_lock:  # one poll at a time, whichever thread asks (tests poll too)
            requests, self._reboot_requests_offset = read_reboot_requests(
                self.reboot_requests_file, self._reboot_requests_offset
            )
            instances = self.describe_instances()
            states = {instance_id: instance["State"]["Name"] for instance_id, instance in instances.items()}
            with self._lock:
                decided = plan(states, self._processes, time.monotonic(), self.grace_seconds, requests)
            network = self.describe_network() if decided.start else None
            for instance_id in decided.start:
                if self._stop.is_set():
                    break
                record = self._launch(instances[instance_id], network)
                record.spot = instances[instance_id].get("InstanceLifecycle") == "spot"
                with self._lock:
                    self._processes[instance_id] = record
            self._draw_interruptions(states)
            if decided.reclaim:
                log.info(
                    "spot instances reclaimed at the end of their notice: %s", ", ".join(decided.reclaim)
                )
                self._ec2.terminate_instances(InstanceIds=list(decided.reclaim))
                for instance_id in decided.reclaim:
                    self._processes[instance_id].reclaimed = True
            for instance_id in decided.stop:
                self._terminate(self._processes[instance_id])
            for instance_id in decided.kill:
                record = self._processes[instance_id]
                signal_group(record, signal.SIGKILL)
                record.killed = True
            for instance_id in decided.shut_down:
                self._shut_down(self._processes[instance_id])
            for instance_id in decided.reboot:
                self._reboot(self._processes[instance_id])
            for instance_id in decided.hard_reboot:
                log.info("instance %s: its processes outlived the grace period: hard reboot", instance_id)
                signal_group(self._processes[instance_id], signal.SIGKILL)
            for instance_id in decided.boot:
                if self._stop.is_set():
                    break
                self._boot_again(self._processes[instance_id])
            with self._lock:
                records = list(self._processes.items())
            for instance_id, record in records:
                # Its metadata answers until its processes are gone (a stopping worker still writes its
                # status).
                gone = states.get(instance_id) not in RUNNING_STATES and not record.alive
                if record.metadata is not None and gone:
                    record.metadata.close()
                    record.metadata = None
                if record.rootfs is not None and gone:
                    record.rootfs.close()
            return decided

    def describe_instances(self) -> dict[str, dict]:
        paginator = self._ec2.get_paginator("describe_instances")
        return {
            instance["InstanceId"]: instance
            for page in paginator.paginate()
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        }

    def describe_network(self) -> Network:
        """The region's VPC state, as the network model reads it (one call per Describe*)."""

        def every(operation: str, key: str) -> list[dict]:
            if self._ec2.can_paginate(operation):
                pages = self._ec2.get_paginator(operation).paginate()
                return [item for page in pages for item in page.get(key, [])]
            return getattr(self._ec2, operation)().get(key, [])

        return Network(
            region=self.region,
            vpcs=every("describe_vpcs", "Vpcs"),
            subnets=every("describe_subnets", "Subnets"),
            route_tables=every("describe_route_tables", "RouteTables"),
            internet_gateways=every("describe_internet_gateways", "InternetGateways"),
            nat_gateways=every("describe_nat_gateways", "NatGateways"),
            vpc_endpoints=every("describe_vpc_endpoints", "VpcEndpoints"),
            security_groups=every("describe_security_groups", "SecurityGroups"),
        )

    # Injected events

    def inject_spot_interruption(self, instance_id: str, notice_seconds: float = SPOT_NOTICE_SECONDS) -> None:
        """Post a spot interruption notice; the instance is terminated when ``notice_seconds`` have passed."""
        record = self._record_with_metadata(instance_id)
        record.spot_action_time = time.time() + notice_seconds
        record.metadata.inject_spot_interruption(record.spot_action_time)
        record.reclaim_at = time.monotonic() + notice_seconds
        log.info("instance %s: spot interruption notice, reclaimed in %.0f s", instance_id, notice_seconds)

    def set_spot_interruptions(
        self, rate_per_hour: float, notice_seconds: float = SPOT_NOTICE_SECONDS, seed: int | None = None
    ) -> None:
        """Interrupt running spot instances at random: ``rate_per_hour`` per instance-hour (0: never;
        math.inf: each at the next poll), each with a notice of ``notice_seconds``; ``seed``: repeatable."""
        if rate_per_hour < 0 or notice_seconds < 0:
            raise ValueError("rate_per_hour and notice_seconds must be 0 or more")
        with self._lock:
            self._interruption_rate = float(rate_per_hour)
            self._interruption_notice = float(notice_seconds)
            self._random = random.Random(seed)
            now = time.monotonic()
            for record in self._processes.values():
                record.interruption_drawn_at = now  # the rate applies from now on

    def spot_interruptions(self) -> dict[str, float]:
        with self._lock:
            return {"rate_per_hour": self._interruption_rate, "notice_seconds": self._interruption_notice}

    def _draw_interruptions(self, states: Mapping[str, str]) -> None:
        """At random, a notice to running spot instances (EC2 reclaiming capacity)."""
        with self._lock:
            rate, notice = self._interruption_rate, self._interruption_notice
            records = [
                r
                for r in self._processes.values()
                if r.spot and states.get(r.instance_id) == "running" and r.reclaim_at is None
            ]
        now = time.monotonic()
        for record in records:
            last, record.interruption_drawn_at = record.interruption_drawn_at, now
            if rate <= 0 or record.metadata is None or record.rebooting:
                continue
            elapsed = now - (last if last is not None else record.started_at)
            chance = 1.0 if math.isinf(rate) else 1.0 - math.exp(-rate * max(0.0, elapsed) / 3600.0)
            if self._random.random() < chance:
                log.info("instance %s: random spot interruption", record.instance_id)
                self.inject_spot_interruption(record.instance_id, notice)

    def inject_rebalance_recommendation(self, instance_id: str) -> None:
        record = self._record_with_metadata(instance_id)
        record.metadata.inject_rebalance_recommendation()
        record.rebalance_recommended = True
        log.info("instance %s: rebalance recommendation", instance_id)

    def _record_with_metadata(self, instance_id: str) -> InstanceProcess:
        with self._lock:
            record = self._processes.get(instance_id)
        if record is None or record.metadata is None:
            raise KeyError(f"{instance_id}: no running instance of the local cloud has this id")
        return record

    # Actions

    def _launch(self, instance: dict, network: Network | None = None) -> InstanceProcess:
        instance_id = instance["InstanceId"]
        verdicts = reachability(instance, network or self.describe_network())
        log.info("instance %s: %s", instance_id, verdicts.summary())
        with self._lock:
            self._reachability[instance_id] = verdicts
            table = dict(self._reachability)
        self.reachability_file.write(table)  # before the instance runs: the server enforces it too
        home = self.work_dir / "instances" / instance_id
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / "logs" / f"{instance_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        script = self._user_data(instance_id)
        behavior = self._ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
        )["InstanceInitiatedShutdownBehavior"]["Value"]
        flavour = self.image_flavour(instance["ImageId"])
        if flavour is not None:
            return self._boot_rootfs(instance, flavour, home, log_path, script, behavior, verdicts)
        facts = self.instance_facts(instance)
        metadata = InstanceMetadataService(facts, self._issue_credentials)
        metadata.start()
        if not script.strip():
            log.info("instance %s has no user data: nothing to run", instance_id)
            return InstanceProcess(
                instance_id,
                home,
                log_path,
                behavior,
                None,
                metadata=metadata,
                reachability=verdicts,
                facts=facts,
            )
        script_path = home / "user-data.sh"
        script_path.write_text(script, encoding="utf-8")
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [*DEFAULT_SIGNALS, "bash", str(script_path)],
                cwd=home,
                env=self.instance_env(home, metadata.url, verdicts),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGTERM/SIGKILL reach all it started
            )
        log.info("instance %s: started pid %s, log %s", instance_id, process.pid, log_path)
        return InstanceProcess(
            instance_id,
            home,
            log_path,
            behavior,
            process,
            metadata=metadata,
            reachability=verdicts,
            facts=facts,
        )

    def image_flavour(self, image_id: str) -> str | None:
        """The root filesystem flavour an AMI is backed by (its ROOTFS_TAG), None for a process-backed one."""
        if image_id not in self._image_flavours:
            try:
                images = self._ec2.describe_images(ImageIds=[image_id])["Images"]
            except self._ec2.exceptions.ClientError:
                images = []
            tags = {tag["Key"]: tag["Value"] for image in images for tag in image.get("Tags", [])}
            self._image_flavours[image_id] = tags.get(ROOTFS_TAG)
        return self._image_flavours[image_id]

    def _boot_rootfs(
        self,
        instance: dict,
        flavour: str,
        home: Path,
        log_path: Path,
        script: str,
        behavior: str,
        verdicts: Reachability,
    ) -> InstanceProcess:
        """An image-backed instance: its own root and namespaces (ec2cluster_localcloud.rootfs_instance)."""
        instance_id = instance["InstanceId"]
        rootfs = RootfsInstance(instance_id, flavour, ensure_rootfs(flavour, self.image_cache), home, script)
        facts = self.instance_facts(instance)
        record = InstanceProcess(
            instance_id, home, log_path, behavior, None, reachability=verdicts, rootfs=rootfs, facts=facts
        )
        self._boot_rootfs_record(record)
        return record

    def _boot_rootfs_record(self, record: InstanceProcess, again: bool = False) -> None:
        """Boot an image-backed instance's root (``again``, after a reboot: the same layer, a new metadata
        service with the same facts and notices, new listeners). A failed boot powers it off."""
        metadata = InstanceMetadataService(record.facts, self._issue_credentials)
        if record.spot_action_time is not None:
            metadata.inject_spot_interruption(record.spot_action_time)
        if record.rebalance_recommended:
            metadata.inject_rebalance_recommendation()
        rootfs = record.rootfs
        try:
            record.process = rootfs.boot(
                record.log_path, metadata, self.network_env(record.reachability), self.blackhole.url
            )
        except Exception as error:
            if not again and not isinstance(error, RootfsInstanceError):
                metadata.close()
                raise  # the next poll launches it again
            # Like a failed boot: said on its console; it powers off once its processes are gone (no retry).
            log.error("instance %s: %s", record.instance_id, error)
            self._console(record, f"ec2cluster-localcloud: boot failed: {error}")
            metadata.close()
            record.process, record.metadata, record.boot_failed = rootfs.process, None, True
            return
        except BaseException:
            metadata.close()
            raise
        record.metadata = metadata

    def instance_facts(self, instance: dict) -> InstanceFacts:
        """What the instance's metadata says: from DescribeInstances and its instance profile's role."""
        profile = instance.get("IamInstanceProfile") or {}
        role_name = role_arn = None
        if profile.get("Arn"):
            roles = self._iam.get_instance_profile(InstanceProfileName=profile["Arn"].rsplit("/", 1)[-1])[
                "InstanceProfile"
            ]["Roles"]
            if roles:
                role_name, role_arn = roles[0]["RoleName"], roles[0]["Arn"]
        return InstanceFacts(
            instance_id=instance["InstanceId"],
            instance_type=instance["InstanceType"],
            availability_zone=instance["Placement"]["AvailabilityZone"],
            region=self.region,
            image_id=instance["ImageId"],
            instance_profile_arn=profile.get("Arn"),
            instance_profile_id=profile.get("Id"),
            role_name=role_name,
            role_arn=role_arn,
            lifecycle="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
        )

    def _issue_credentials(self, facts: InstanceFacts) -> dict:
        """The role's temporary credentials, from the local cloud's STS, as EC2 gets them for an instance."""
        return self._sts.assume_role(
            RoleArn=facts.role_arn, RoleSessionName=facts.instance_id, DurationSeconds=CREDENTIAL_SECONDS
        )["Credentials"]

    def _user_data(self, instance_id: str) -> str:
        answer = self._ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        encoded = (answer.get("UserData") or {}).get("Value") or ""
        return cloud_init_text(base64.b64decode(encoded)) if encoded else ""

    def instance_env(
        self, home: Path, metadata_url: str, verdicts: Reachability | None = None
    ) -> dict[str, str]:
        """A process-backed instance's environment: its metadata service, its network's endpoints, the
        host's basics, and its own disk (``EC2CLUSTER_HOME``, ``EC2CLUSTER_CLOUD_DIR``: it shares the
        host's filesystem) and power commands (``shutdown``, ``poweroff``, ``halt`` first on PATH: they
        power the instance off, not the host). Nothing of the host's Python environment: the bootstrap
        installs the worker and the user's code from the cluster's bundle, as on EC2.

        ``verdicts`` None: the instance reaches everything (no network model).
        """
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        power_dir = install_power_commands(home)
        env.update(
            {
                "HOME": str(home),  # no shared AWS config or credentials files of the host's user
                "PATH": os.pathsep.join([str(power_dir), env.get("PATH", os.defpath)]),
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata_url,
                "EC2CLUSTER_HOME": str(home / "ec2cluster"),
                "EC2CLUSTER_CLOUD_DIR": str(home / "cloud"),
                "PYTHONUNBUFFERED": "1",
                **self.network_env(verdicts),
            }
        )
        return env

    def network_env(self, verdicts: Reachability | None) -> dict[str, str]:
        """The endpoint variables: the local cloud's endpoint where the network goes, else the blackhole."""
        endpoint, blackhole = self.cloud_env["AWS_ENDPOINT_URL"], self.blackhole.url

        def route(destination: str, url: str) -> str:
            return url if verdicts is None or verdicts.reaches(destination) else blackhole

        env = {variable: route(service, endpoint) for service, variable in SERVICE_ENDPOINT_VARIABLES.items()}
        env["AWS_ENDPOINT_URL"] = route(INTERNET, endpoint)
        # Without a package index there is no internet to install from: pip never leaves loopback.
        env["PIP_INDEX_URL"] = (
            route(INTERNET, self.package_index_url) if self.package_index_url else blackhole
        )
        return env

    def _terminate(self, record: InstanceProcess) -> None:
        log.info("instance %s: SIGTERM to process group %s", record.instance_id, record.process.pid)
        record.term_sent_at = time.monotonic()
        signal_group(record, signal.SIGTERM)

    def _console(self, record: InstanceProcess, line: str) -> None:
        with open(record.log_path, "a", encoding="utf-8") as console:
            console.write(line + "\n")

    def _reboot(self, record: InstanceProcess) -> None:
        """Begin a reboot: its processes end (an image-backed instance's init stops them all); the
        instance boots again once they are gone (``_boot_again``), never powers off."""
        inside = record.reboot_requested
        log.info("instance %s: reboot (%s)", record.instance_id, "on the instance" if inside else "requested")
        self._console(record, CONSOLE_REBOOT_LINE)
        record.reboot_sent_at = time.monotonic()
        (record.home / REBOOT_MARKER).unlink(missing_ok=True)
        if record.rootfs is not None and record.rootfs.request_reboot():
            return
        if record.alive:  # (an init that cannot be asked: its group, as for a process-backed instance)
            signal_group(record, signal.SIGTERM)

    def _boot_again(self, record: InstanceProcess) -> None:
        """Its processes are gone: boot it again (per-boot scripts; never the user data again)."""
        if record.process is not None:
            record.process.wait()  # reaped already, or about to be: its group is gone
        record.boots += 1
        record.reboot_sent_at = None
        record.started_at = time.monotonic()
        (record.home / REBOOT_MARKER).unlink(missing_ok=True)
        if record.rootfs is not None:
            if record.metadata is not None:
                record.metadata.close()
                record.metadata = None
            record.rootfs.close()
            self._boot_rootfs_record(record, again=True)
        else:
            self._run_per_boot(record)
        if record.boot_failed:
            return
        log.info(
            "instance %s: booted again (boot %d, pid %s)",
            record.instance_id,
            record.boots,
            record.process.pid if record.process else None,
        )

    def _run_per_boot(self, record: InstanceProcess) -> None:
        """A process-backed instance's later boot: a new process group running its per-boot scripts, in its
        environment, on its console; none: it idles (no process), running, as on EC2."""
        (record.home / POWER_OFF_MARKER).unlink(missing_ok=True)  # a shutdown while it rebooted: ignored
        env = self.instance_env(record.home, record.metadata.url, record.reachability)
        scripts = per_boot_scripts(Path(env["EC2CLUSTER_CLOUD_DIR"]) / "scripts" / "per-boot")
        if not scripts:
            log.info("instance %s: no per-boot scripts: it idles", record.instance_id)
            record.process = None
            return
        with open(record.log_path, "ab") as log_file:
            record.process = subprocess.Popen(
                [*DEFAULT_SIGNALS, "bash", "-c", PER_BOOT_COMMAND, "ec2cluster-per-boot", *map(str, scripts)],
                cwd=record.home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _shut_down(self, record: InstanceProcess) -> None:
        """The script exited: power off, as EC2 does on `shutdown -h now`."""
        record.shutdown_requested = True
        record.reboot_sent_at = None  # a power-off that came first ends a reboot, too
        signal_group(record, signal.SIGKILL)  # whatever the script left running
        returncode = record.process.returncode if record.process is not None else None
        reservations = self._ec2.describe_instances(InstanceIds=[record.instance_id])["Reservations"]
        state = next((i["State"]["Name"] for r in reservations for i in r["Instances"]), None)
        if state in ("stopping", "stopped"):
            # StopInstances shut the OS down (its worker exited, its script ran `shutdown`): on EC2 that
            # completes the stop; InstanceInitiatedShutdownBehavior is for a shutdown the OS starts itself.
            log.info(
                "instance %s: exited (%s) while %s: it stays stopped", record.instance_id, returncode, state
            )
            return
        if record.shutdown_behavior == "terminate":
            log.info("instance %s: exited (%s), terminating it", record.instance_id, returncode)
            self._ec2.terminate_instances(InstanceIds=[record.instance_id])
        else:
            log.info("instance %s: exited (%s), stopping it", record.instance_id, returncode)
            self._ec2.stop_instances(InstanceIds=[record.instance_id])


def install_power_commands(home: Path) -> Path:
    """The instance's shutdown, poweroff, halt and reboot (a directory put first on its PATH)."""
    power_dir = home / "sbin"
    power_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        name: POWER_COMMAND.format(marker=home / POWER_OFF_MARKER)
        for name in ("shutdown", "poweroff", "halt")
    }
    commands["reboot"] = REBOOT_COMMAND.format(marker=home / REBOOT_MARKER)
    for name, text in commands.items():
        command = power_dir / name
        command.write_text(text, encoding="utf-8")
        command.chmod(0o755)
    return power_dir


def cloud_init_text(data: bytes) -> str:
    """User data as cloud-init reads it: gunzipped when gzip-compressed."""
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    return data.decode("utf-8")
