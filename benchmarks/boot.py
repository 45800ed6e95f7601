"""Boot to first task on the Debian 12 image, and the cluster's bundle: its size and build time.

``boot-time``: instances of the local cloud's Debian 12 image (a real root filesystem, namespaces of its own)
boot from the project's real user data, in a private subnet with VPC endpoints (DynamoDB, S3: gateway; SQS:
interface) and no route to the internet, with IAM enforced (the project's worker policy). Each instance
runs the example handler on a queue of its own, holding a few tasks: an instance's first task cannot be
taken by another's worker, and once its tasks are done it idles, so it does not slow the others down. The
phases, per instance, from its console (``<work_dir>/logs/<instance id>.log``):

- (a) OS start: RunInstances returned (this process's clock) -> the boot loader's first console line (the
  local cloud's runner picks the instance up at its next poll, every 0.4 s, and boots its namespaces and
  init; the user data writes its files, start.sh starts the watchdog and picks the image's python; the
  boot loader starts and reads instance metadata: its id and the instance profile's credentials);
- (b) install: the boot loader's first line ("booting: fetching bundle") -> environment ready (its
  "booting: starting worker" line, written as soon as the venv is made): the bundle from S3 through the
  gateway endpoint, its SHA-256, unpacking, the venv;
- (c) worker start: environment ready -> the worker's ``worker.running`` event (its ``ts``): the boot
  loader's last status item, the venv's Python, the worker's imports, its start-up checks and status item;
- (d) first task: ``worker.running`` -> its first ``task.done`` event.

Rounds (BOOT_ROUNDS), each terminated before the next: at full size one instance alone (the run's first
boot: the reference), two rounds of three launched back to back (the medians), one instance with the heavy
bundle; at tiny, one instance.

The boot loader's lines carry their time (``ec2cluster: boot: <text> (t=<epoch seconds>)``) and the worker's
events their ``ts``; the instances share the host's clock. The line start.sh prints when it has chosen the
interpreter (``ec2cluster: python ...``) has no time: this process polls the consoles and notes when it
appears (to within POLL_SECONDS), to split (a).

``bundle-size``: ``build_bundle`` for the example job (no code, no requirements: the worker, boto3 and
botocore; the launch's default target, pure-Python wheels) and for a job with a heavy requirement (pandas,
with numpy, for Python 3.11 on x86_64): cold (a fresh cache directory: pip runs) and warm (the same
directory again: a cache hit, no pip), and with the user's code changed (the site tree cached, the zip
written again). pip's own cache (its HTTP cache and the index it is configured with) is not ours to clear:
the details say what it held.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cloud
from .result import Result

# -- boot-time ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    name: str
    requirements: tuple[str, ...]
    python_version: str | None  # the bundle's target (None: pure-Python wheels, the launch's default)


EXAMPLE_JOB = Job("example job (no code, no requirements; pure-Python wheels)", (), None)
HEAVY_JOB = Job("pandas (Python 3.11, x86_64)", ("pandas",), "3.11")

IMAGE_FLAVOUR = "debian-12"
# Rounds of (instances launched at once, their job). At full size a single instance first (the run's first
# boot, reported apart), two rounds of three (the medians), then one instance with the heavy bundle.
BOOT_ROUNDS = {
    "tiny": ((1, EXAMPLE_JOB),),
    "full": ((1, EXAMPLE_JOB), (3, EXAMPLE_JOB), (3, EXAMPLE_JOB), (1, HEAVY_JOB)),
}
TASKS_PER_INSTANCE = 5
INSTALL_TARGET_SECONDS = 20.0  # the issue's: install + worker start, from the bundle, without internet
POLL_SECONDS = 0.02
ROUND_TIMEOUT_SECONDS = 300
HANDLER = {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"}
BUCKET = "ec2cluster-bench-bundles"  # within the project policies' default bundle bucket pattern

BOOT_LINE = re.compile(r"^ec2cluster: boot: (?P<text>.*) \(t=(?P<t>\d+\.\d+)\)$")
PYTHON_LINE = "ec2cluster: python "
FAILURE_PREFIX = "ec2cluster: startup-failed: "


@dataclass
class Boot:
    """One instance's boot, its times in epoch seconds."""

    instance_id: str
    round: int
    job: Job
    launched: float  # RunInstances returned
    python_seen: float | None = None  # start.sh's "ec2cluster: python" line, as polled
    boot_lines: dict[str, float] = field(default_factory=dict)  # the boot loader's steps -> t
    first_boot_line: float | None = None
    events: dict[str, float] = field(default_factory=dict)  # the worker's first event of each name -> ts

    @property
    def complete(self) -> bool:
        return "task.done" in self.events

    def phases(self) -> dict[str, float]:
        steps, events = self.boot_lines, self.events
        ready = steps["booting: starting worker"]
        return {
            "os_start": self.first_boot_line - self.launched,
            "os_to_python": self.python_seen - self.launched,
            "python_to_boot_loader": self.first_boot_line - self.python_seen,
            "install": ready - self.first_boot_line,
            "fetch": steps["booting: unpacking bundle"] - steps["booting: fetching bundle"],
            "unpack": steps["booting: creating environment"] - steps["booting: unpacking bundle"],
            "venv": ready - steps["booting: creating environment"],
            "worker_start": events["worker.running"] - ready,
            "to_worker_starting": events["worker.starting"] - ready,
            "starting_to_running": events["worker.running"] - events["worker.starting"],
            "first_task": events["task.done"] - events["worker.running"],
            "install_and_worker_start": events["worker.running"] - self.first_boot_line,
            "total": events["task.done"] - self.launched,
        }


def read_console(path: Path, boot: Boot, now: float) -> str:
    """Note what the console shows so far on ``boot``; its text."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    for line in text.splitlines():
        if line.startswith(PYTHON_LINE) and boot.python_seen is None:
            boot.python_seen = now
        elif (match := BOOT_LINE.match(line)) is not None:
            t = float(match["t"])
            boot.first_boot_line = boot.first_boot_line or t
            boot.boot_lines.setdefault(match["text"], t)
        elif line.startswith("{"):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                event = json.loads(line)
                boot.events.setdefault(event["event"], float(event["ts"]))
    return text


def tasks_body(count: int) -> str:
    from airflow_ec2cluster.packing import PendingTask, pack_tasks

    tasks = [
        PendingTask(cloud.task_id(n), {"id": n, "text": ":) " * (n % 7)}, f"item {n}") for n in range(count)
    ]
    (message,) = pack_tasks(tasks, 10)
    return message.body


def worker_config(cluster_id: str, region: str, queue_url: str, table: str) -> dict[str, Any]:
    """The launch's configuration (its defaults), the example handler."""
    return {
        "cluster_id": cluster_id,
        "region": region,
        "queue_url": queue_url,
        "state_table": table,
        "handler": HANDLER,
    }


def measure_boots(size: str) -> dict[str, Any]:
    from ec2cluster_localcloud import LocalCloud, images
    from ec2cluster_localcloud.project import apply_project_policies
    from ec2cluster_worker import records

    from airflow_ec2cluster.aws.s3 import bundle_object_key
    from airflow_ec2cluster.bundle import Target, build_bundle
    from airflow_ec2cluster.cluster import task_queue_name
    from airflow_ec2cluster.defaults import DEFAULT_BUNDLE_PREFIX
    from airflow_ec2cluster.userdata import render_user_data
    from tests.network_layouts import add_endpoints, private_vpc

    image_cache_warm = (images.rootfs_path(IMAGE_FLAVOUR) / images.COMPLETE_MARKER).exists()
    bundles = {  # as the launch builds them: the default cache
        job: build_bundle([], list(job.requirements), Target(python_version=job.python_version))
        for job in dict.fromkeys(job for _, job in BOOT_ROUNDS[size])
    }
    boots: list[Boot] = []
    teardown: list[float] = []  # per round: TerminateInstances -> every instance of the round gone
    with LocalCloud(grace_seconds=10) as local:
        table = cloud.unique("ec2cluster-boot-state")
        apply_project_policies(local, "--state-table", table)  # IAM enforced: the worker role's policy
        started = time.monotonic()
        image_id = local.register_rootfs_image(IMAGE_FLAVOUR)
        register_seconds = time.monotonic() - started
        ec2, sqs, s3 = local.client("ec2"), local.client("sqs"), local.client("s3")
        dynamodb = local.client("dynamodb")
        dynamodb.create_table(TableName=table, **records.STATE_TABLE_SCHEMA)
        s3.create_bucket(Bucket=BUCKET)
        layout = private_vpc(ec2)
        add_endpoints(ec2, layout, local.region, services=("dynamodb", "sqs", "s3"))
        logs = local.work_dir / "logs"
        for round_number, (count, job) in enumerate(BOOT_ROUNDS[size]):
            bundle, launches = bundles[job], []
            for _ in range(count):  # everything ready before the first launch: they go out back to back
                cluster_id = cloud.unique("boot")
                queue_url = sqs.create_queue(
                    QueueName=task_queue_name(cluster_id), Attributes={"VisibilityTimeout": "120"}
                )["QueueUrl"]
                sqs.send_message(QueueUrl=queue_url, MessageBody=tasks_body(TASKS_PER_INSTANCE))
                key = bundle_object_key(DEFAULT_BUNDLE_PREFIX, cluster_id, bundle.sha256)
                s3.upload_file(str(bundle.path), BUCKET, key)
                location = {
                    "sha256": bundle.sha256,
                    "size": bundle.size,
                    "s3": {"bucket": BUCKET, "key": key},
                }
                config = worker_config(cluster_id, local.region, queue_url, table)
                launches.append(render_user_data(config, bundle=location, python_version=job.python_version))
            round_boots = []
            for user_data in launches:
                answer = ec2.run_instances(
                    ImageId=image_id,
                    InstanceType="t3.micro",
                    MinCount=1,
                    MaxCount=1,
                    UserData=user_data,
                    InstanceInitiatedShutdownBehavior="terminate",
                    IamInstanceProfile={"Name": local.instance_profile_name},
                    MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
                    NetworkInterfaces=[
                        {
                            "DeviceIndex": 0,
                            "SubnetId": layout.private_subnet,
                            "AssociatePublicIpAddress": False,
                            "DeleteOnTermination": True,
                        }
                    ],
                )
                instance_id = answer["Instances"][0]["InstanceId"]
                round_boots.append(Boot(instance_id, round_number, job, time.time()))
            wait_for_first_tasks(round_boots, logs)
            check_network(local, round_boots)
            stopping = time.monotonic()
            ec2.terminate_instances(InstanceIds=[boot.instance_id for boot in round_boots])
            wait_stopped(local, round_boots)
            teardown.append(time.monotonic() - stopping)
            boots.extend(round_boots)
    return {
        "boots": boots,
        "image_cache_warm": image_cache_warm,
        "register_seconds": register_seconds,
        "bundles": bundles,
        "teardown": teardown,
    }


def wait_for_first_tasks(boots: list[Boot], logs: Path) -> None:
    deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
    while True:
        now = time.time()
        for boot in boots:
            text = read_console(logs / f"{boot.instance_id}.log", boot, now)
            failed = [line for line in text.splitlines() if line.startswith(FAILURE_PREFIX)]
            if failed:
                raise RuntimeError(f"{boot.instance_id} failed to start: {failed[0]}\n{text[-3000:]}")
        if all(boot.complete for boot in boots):
            return
        if time.monotonic() > deadline:
            tails = {
                b.instance_id: (logs / f"{b.instance_id}.log").read_text(errors="replace")[-1500:]
                for b in boots
            }
            raise RuntimeError(f"no first task within {ROUND_TIMEOUT_SECONDS} s: {tails}")
        time.sleep(POLL_SECONDS)


def check_network(local, boots: list[Boot]) -> None:
    """The instances ran without internet, on the Debian 12 image."""
    processes = local.worker_processes()
    for boot in boots:
        info = processes[boot.instance_id]
        if "internet" in info["reachable"] or info["image"]["flavour"] != IMAGE_FLAVOUR:
            raise RuntimeError(f"{boot.instance_id}: not a private Debian 12 instance: {info}")


def wait_stopped(local, boots: list[Boot], timeout: float = 120) -> None:
    """Every instance of the round gone before the next round boots (their stops take CPU too)."""
    ids = {boot.instance_id for boot in boots}
    deadline = time.monotonic() + timeout
    while any(info["alive"] for iid, info in local.worker_processes().items() if iid in ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"instances still running {timeout} s after termination")
        time.sleep(0.2)


PHASE_ROWS = (
    ("(a) OS start: RunInstances returned -> boot loader's first line", "os_start"),
    ("    of which: -> start.sh's python line (polled)", "os_to_python"),
    ("    of which: python line -> boot loader's first line", "python_to_boot_loader"),
    ("(b) install: boot loader's first line -> environment ready", "install"),
    ("    fetch bundle from S3 + SHA-256", "fetch"),
    ("    unpack", "unpack"),
    ("    venv", "venv"),
    ("(c) worker start: environment ready -> worker.running", "worker_start"),
    ("    -> worker.starting (status item, python, imports)", "to_worker_starting"),
    ("    worker.starting -> worker.running (checks, status)", "starting_to_running"),
    ("(d) first task: worker.running -> first task.done", "first_task"),
    ("boot to first task: RunInstances returned -> first task.done", "total"),
)


def median_of(boots: list[Boot], phase: str) -> float:
    return round(statistics.median(boot.phases()[phase] for boot in boots), 2)


def boot_time(size: str) -> Result:
    run = measure_boots(size)
    boots: list[Boot] = run["boots"]
    rounds = BOOT_ROUNDS[size]
    result = Result("boot-time", size)
    example = [b for b in boots if b.job == EXAMPLE_JOB]
    several = [b for b in example if rounds[b.round][0] > 1]
    if several:  # the run's first, single boot apart; the medians over the rounds of several at once
        measured, reference = several, [b for b in example if b.round == 0]
        at_once = sorted({rounds[b.round][0] for b in several})
        label = f"median of {len(several)} ({len({b.round for b in several})} rounds of {at_once[0]} at once)"
    else:
        measured, label, reference = example, f"{len(example)} instance", []
    key = median_of(measured, "install_and_worker_start")
    result.add(
        f"install + worker start, s, {label}",
        key,
        median_of(reference, "install_and_worker_start") if reference else None,
        f"< {INSTALL_TARGET_SECONDS:g}",
        key < INSTALL_TARGET_SECONDS,
    )
    worst = max(boot.phases()["install_and_worker_start"] for boot in measured)
    result.add("  the slowest instance's install + worker start, s", round(worst, 2))
    for what, phase in PHASE_ROWS:
        result.add(
            f"  {what}, s", median_of(measured, phase), median_of(reference, phase) if reference else None
        )
    bundles = run["bundles"]
    heavy = [b for b in boots if b.job != EXAMPLE_JOB]
    if heavy:
        job = heavy[0].job
        value = median_of(heavy, "install_and_worker_start")
        result.add(
            f"install + worker start, s, {job.name} bundle ({bundles[job].size / 1e6:.0f} MB), "
            f"{len(heavy)} instance alone",
            value,
            None,
            f"< {INSTALL_TARGET_SECONDS:g}",
            value < INSTALL_TARGET_SECONDS,
        )
        for what, phase in PHASE_ROWS[3:7]:
            result.add(f"  {what}, s", median_of(heavy, phase))
    result.details = {
        "reference column": "the run's first boot, one instance alone" if reference else "-",
        "network": "private subnet, no NAT/internet; gateway endpoints S3+DynamoDB, interface endpoint SQS",
        "image cache": "warm (root filesystem already built)" if run["image_cache_warm"] else "cold (built)",
        "register image, s": round(run["register_seconds"], 2),
        "bundles (built before the launches, not timed in a boot)": "; ".join(
            f"{job.name}: {bundle.size / 1e6:.1f} MB, {'cache hit' if bundle.cached else 'built'} in "
            f"{bundle.build_seconds:.2f} s"
            for job, bundle in bundles.items()
        ),
        "teardown per round (terminate -> all gone), s": ", ".join(f"{t:.1f}" for t in run["teardown"]),
        "per instance (round: a / b / c / d, s)": "; ".join(
            f"{b.round}: "
            + " / ".join(
                f"{b.phases()[p]:.2f}" for p in ("os_start", "install", "worker_start", "first_task")
            )
            for b in boots
        ),
    }
    return result


# -- bundle-size -------------------------------------------------------------------------------------------


BUNDLE_JOBS = {"tiny": (EXAMPLE_JOB,), "full": (EXAMPLE_JOB, HEAVY_JOB)}


def pip_cache() -> tuple[Path, int]:
    """pip's cache directory and its size in bytes (0 when absent)."""
    answer = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, timeout=60
    )
    path = Path(answer.stdout.strip() or Path.home() / ".cache" / "pip")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    return path, size


def unpacked(path: Path) -> tuple[int, int]:
    """(bytes unpacked, files) of a zip."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    return sum(info.file_size for info in infos), len(infos)


def measure_bundle(job: Job, with_code_change: bool) -> dict[str, Any]:
    from airflow_ec2cluster.bundle import Target, build_bundle

    target = Target(python_version=job.python_version, architecture="x86_64")
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as work:
        cache = Path(work) / "cache"
        _, pip_before = pip_cache()
        for kind in ("cold", "warm"):
            started = time.monotonic()
            bundle = build_bundle([], list(job.requirements), target, cache_dir=cache)
            runs[kind] = {"seconds": time.monotonic() - started, "bundle": bundle}
        if not runs["warm"]["bundle"].cached or runs["cold"]["bundle"].cached:
            raise RuntimeError(f"{job.name}: the warm build was not a cache hit, or the cold one was")
        runs["unpacked"] = unpacked(runs["cold"]["bundle"].path)
        if with_code_change:
            module = Path(work) / "mytasks.py"
            module.write_text("def run(payload, context):\n    return payload\n")
            started = time.monotonic()
            changed = build_bundle([module], list(job.requirements), target, cache_dir=cache)
            runs["code changed"] = {"seconds": time.monotonic() - started, "bundle": changed}
        pip_dir, pip_after = pip_cache()
        shutil.rmtree(cache, ignore_errors=True)
    runs["pip cache"] = (pip_dir, pip_before, pip_after)
    return runs


def bundle_size(size: str) -> Result:
    result = Result("bundle-size", size)
    for job in BUNDLE_JOBS[size]:
        runs = measure_bundle(job, with_code_change=size == "full")
        cold = runs["cold"]["bundle"]
        raw, files = runs["unpacked"]
        result.add(f"{job.name}: zip, MB", round(cold.size / 1e6, 2))
        result.add(f"  unpacked on the instance, MB ({files:,} files)", round(raw / 1e6, 2))
        result.add("  build, cold (fresh cache dir: pip runs), s", round(runs["cold"]["seconds"], 2))
        result.add("  build, warm (cache hit: no pip), s", round(runs["warm"]["seconds"], 3))
        if "code changed" in runs:
            result.add(
                "  build, code changed (site tree cached, zip written), s",
                round(runs["code changed"]["seconds"], 2),
            )
        pip_dir, before, after = runs["pip cache"]
        result.details[f"{job.name}: distributions"] = ", ".join(
            f"{name} {version}" for name, version in cold.manifest["distributions"].items()
        )
        result.details[f"{job.name}: pip's cache ({pip_dir})"] = (
            f"{before / 1e6:.1f} MB before the cold build, {after / 1e6:.1f} MB after"
        )
    return result
