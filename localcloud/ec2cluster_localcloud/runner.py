"""The instance runner: every instance launched on the local cloud becomes a real process.

It polls the local cloud's EC2 (DescribeInstances) and, for each instance that reaches pending/running,
runs the instance's own user data (``bash <script>``) in a process group of its own, with the environment
an instance would give the worker: its instance id, credentials standing in for the instance profile's
role, the endpoint. When an instance is stopped or terminated its process group gets SIGTERM, then SIGKILL
after a grace period. When the script exits by itself the instance shuts down the way EC2 would: the
runner terminates it (or stops it, as InstanceInitiatedShutdownBehavior says).

Like cloud-init, it runs an instance's user data once, at its first boot.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)
GZIP_MAGIC = b"\x1f\x8b"

RUNNING_STATES = frozenset({"pending", "running"})
DEFAULT_POLL_SECONDS = 0.4
# SIGTERM to SIGKILL. EC2 gives a shutting-down instance's processes time to stop; a worker needs about 1.5 s
# when idle (ec2cluster_worker.receiver: it does not wait out its long poll) plus whatever is left of the
# task in hand, and writes its 'stopped' status item first. 30 s covers that with room for a busy machine.
DEFAULT_GRACE_SECONDS = 30.0
KILL_WAIT_SECONDS = 5.0
# Inherited variables that would point boto3 somewhere else than the local cloud's stand-in credentials.
DROPPED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@dataclass
class InstanceProcess:
    """One instance's process (None when its user data was empty) and what the runner did to it."""

    instance_id: str
    home: Path
    log_path: Path
    shutdown_behavior: str
    process: subprocess.Popen | None
    started_at: float = field(default_factory=time.monotonic)
    term_sent_at: float | None = None
    killed: bool = False
    shutdown_requested: bool = False

    @property
    def alive(self) -> bool:
        """The script, or anything it started in its process group, still runs."""
        if self.process is None:
            return False
        return self.process.poll() is None or group_exists(self.process.pid)

    @property
    def script_exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

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
        }


@dataclass(frozen=True)
class Plan:
    """What one poll decided: instances to start, process groups to stop, instances to shut down."""

    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    shut_down: tuple[str, ...] = ()
    kill: tuple[str, ...] = ()


def plan(
    states: Mapping[str, str], processes: Mapping[str, InstanceProcess], now: float, grace_seconds: float
) -> Plan:
    """Decide from instance states and process records (pure: no calls)."""
    start, stop, shut_down, kill = [], [], [], []
    for instance_id, state in sorted(states.items()):
        record = processes.get(instance_id)
        if record is None:
            if state in RUNNING_STATES:
                start.append(instance_id)
            continue
        if state not in RUNNING_STATES and record.alive and record.term_sent_at is None:
            stop.append(instance_id)
        elif (
            state in RUNNING_STATES
            and record.script_exited
            and record.term_sent_at is None
            and not record.shutdown_requested
        ):
            shut_down.append(instance_id)
    for instance_id, record in sorted(processes.items()):
        if record.term_sent_at is not None and record.alive and now - record.term_sent_at >= grace_seconds:
            kill.append(instance_id)
    return Plan(tuple(start), tuple(stop), tuple(shut_down), tuple(kill))


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
    ):
        self.endpoint_url = endpoint_url
        self.region = region
        self.work_dir = Path(work_dir)
        self.cloud_env = dict(env)
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self._processes: dict[str, InstanceProcess] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"mode": "standard"}),
        )

    # Lifecycle

    def start(self) -> None:
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
        states = self.instance_states()
        with self._lock:
            decided = plan(states, self._processes, time.monotonic(), self.grace_seconds)
        for instance_id in decided.start:
            if self._stop.is_set():
                break
            record = self._launch(instance_id)
            with self._lock:
                self._processes[instance_id] = record
        for instance_id in decided.stop:
            self._terminate(self._processes[instance_id])
        for instance_id in decided.kill:
            record = self._processes[instance_id]
            signal_group(record, signal.SIGKILL)
            record.killed = True
        for instance_id in decided.shut_down:
            self._shut_down(self._processes[instance_id])
        return decided

    def instance_states(self) -> dict[str, str]:
        paginator = self._ec2.get_paginator("describe_instances")
        return {
            instance["InstanceId"]: instance["State"]["Name"]
            for page in paginator.paginate()
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        }

    # Actions

    def _launch(self, instance_id: str) -> InstanceProcess:
        home = self.work_dir / "instances" / instance_id
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / "logs" / f"{instance_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        script = self._user_data(instance_id)
        behavior = self._ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
        )["InstanceInitiatedShutdownBehavior"]["Value"]
        if not script.strip():
            log.info("instance %s has no user data: nothing to run", instance_id)
            return InstanceProcess(instance_id, home, log_path, behavior, None)
        script_path = home / "user-data.sh"
        script_path.write_text(script, encoding="utf-8")
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                ["bash", str(script_path)],
                cwd=home,
                env=self.instance_env(instance_id, home),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: SIGTERM/SIGKILL reach all it started
            )
        log.info("instance %s: started pid %s, log %s", instance_id, process.pid, log_path)
        return InstanceProcess(instance_id, home, log_path, behavior, process)

    def _user_data(self, instance_id: str) -> str:
        answer = self._ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        encoded = (answer.get("UserData") or {}).get("Value") or ""
        return cloud_init_text(base64.b64decode(encoded)) if encoded else ""

    def instance_env(self, instance_id: str, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(self.cloud_env)
        # The project's own modules (user handlers) stay importable, as they are in this process.
        python_path = [p for p in (env.get("PYTHONPATH", ""), os.getcwd()) if p]
        env.update(
            {
                "EC2CLUSTER_WORKER_ID": instance_id,
                "EC2CLUSTER_HOME": str(home),
                "EC2CLUSTER_PYTHON": sys.executable,
                "EC2CLUSTER_SKIP_INSTALL": "1",
                "EC2CLUSTER_NO_SHUTDOWN": "1",
                "AWS_EC2_METADATA_DISABLED": "true",
                "PYTHONPATH": os.pathsep.join(python_path),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _terminate(self, record: InstanceProcess) -> None:
        log.info("instance %s: SIGTERM to process group %s", record.instance_id, record.process.pid)
        record.term_sent_at = time.monotonic()
        signal_group(record, signal.SIGTERM)

    def _shut_down(self, record: InstanceProcess) -> None:
        """The script exited: power off, as EC2 does on `shutdown -h now`."""
        record.shutdown_requested = True
        signal_group(record, signal.SIGKILL)  # whatever the script left running
        returncode = record.process.returncode
        if record.shutdown_behavior == "terminate":
            log.info("instance %s: exited (%s), terminating it", record.instance_id, returncode)
            self._ec2.terminate_instances(InstanceIds=[record.instance_id])
        else:
            log.info("instance %s: exited (%s), stopping it", record.instance_id, returncode)
            self._ec2.stop_instances(InstanceIds=[record.instance_id])


def cloud_init_text(data: bytes) -> str:
    """User data as cloud-init reads it: gunzipped when gzip-compressed."""
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    return data.decode("utf-8")
