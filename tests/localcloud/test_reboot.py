"""Reboots, as EC2 and cloud-init do them (ec2cluster_localcloud.runner, rootfs_instance, server).

RebootInstances (or ``reboot`` run on the instance) restarts the instance's OS: every process ends, the disk
stays, the instance stays running with its id and metadata, and cloud-init runs the per-boot scripts again
(``scripts/per-boot/``, in name order), never the user data. Each instance here is a stand-in for the
project's bootstrap: its user data writes a line, registers a per-boot "worker" (appends to a boots file,
says so on the console with its instance id from its metadata, loops on ``sleep``, and runs ``shutdown -h
now`` when it exits, as the bootstrap's start.sh does) and starts it. The tests drive it through files the
worker watches (``please-reboot``: it runs ``reboot``; ``please-shutdown``: ``shutdown -h now``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.rootfs_instance import REBOOT_EXIT_STATUS, STOP_WAIT_SECONDS, pids_in_namespace
from ec2cluster_localcloud.runner import (
    CONSOLE_REBOOT_LINE,
    POWER_OFF_MARKER,
    REBOOT_MARKER,
    InstanceProcess,
    per_boot_scripts,
    plan,
    read_reboot_requests,
)

from .helpers import (
    instance_left_behind,
    instance_log,
    launch_instance,
    pid_alive,
    processes_in_groups,
    wait_for,
    wait_for_log_line,
)

WHOAMI = """\
import os, urllib.request
base = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
token = urllib.request.urlopen(urllib.request.Request(base + "/latest/api/token", method="PUT", headers=ttl),
                               timeout=5).read()
headers = {"X-aws-ec2-metadata-token": token}
request = urllib.request.Request(base + "/latest/meta-data/instance-id", headers=headers)
print(urllib.request.urlopen(request, timeout=5).read().decode())
"""
# @ROOT@: where the instance keeps its files (a process-backed instance's home; /root on an image);
# @CLOUD@: its cloud-init directory; @PYTHON@: an interpreter of its image.
USER_DATA = """#!/bin/bash
echo "user data" >> "@ROOT@/user-data-runs"
cat > "@ROOT@/whoami.py" <<'PY'
@WHOAMI@PY
per_boot="@CLOUD@/scripts/per-boot"
mkdir -p "$per_boot"
cat > "$per_boot/10-first.sh" <<'EOF'
#!/bin/bash
echo first >> "@ROOT@/order"
EOF
cat > "$per_boot/50-worker.sh" <<'EOF'
#!/bin/bash
trap 'shutdown -h now' EXIT
echo worker >> "@ROOT@/order"
echo boot >> "@ROOT@/boots"
echo "worker: up $(wc -l < "@ROOT@/boots") $(@PYTHON@ "@ROOT@/whoami.py")"
while :; do
  if [ -e "@ROOT@/please-reboot" ]; then rm -f "@ROOT@/please-reboot"; reboot; fi
  if [ -e "@ROOT@/please-shutdown" ]; then shutdown -h now; fi
  sleep 0.1
done
EOF
echo 'echo README ran >> "@ROOT@/order"' > "$per_boot/README"
chmod 755 "$per_boot/10-first.sh" "$per_boot/50-worker.sh"
exec "$per_boot/50-worker.sh"
"""
PROCESS_USER_DATA = (
    USER_DATA.replace("@WHOAMI@", WHOAMI)
    .replace("@ROOT@", "$HOME")
    .replace("@CLOUD@", "$EC2CLUSTER_CLOUD_DIR")
    .replace("@PYTHON@", sys.executable)
)
IMAGE_USER_DATA = (
    USER_DATA.replace("@WHOAMI@", WHOAMI)
    .replace("@ROOT@", "/root")
    .replace("@CLOUD@", "/var/lib/cloud")
    .replace("@PYTHON@", "python3")
)
IDLE_USER_DATA = '#!/bin/bash\necho "user data" >> "$HOME/user-data-runs"\n'
STUBBORN_USER_DATA = "#!/bin/bash\ntrap '' TERM\necho up > \"$HOME/up\"\nwhile :; do sleep 0.1; done\n"


def state(ec2, instance_id: str) -> str:
    answer = ec2.describe_instances(InstanceIds=[instance_id])
    return answer["Reservations"][0]["Instances"][0]["State"]["Name"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def worker_up(cloud, instance_id: str, boot: int, timeout: float = 60) -> None:
    wait_for_log_line(cloud, instance_id, f"worker: up {boot} {instance_id}", timeout=timeout)


# Pure decisions


class Ended:
    pid = 999_999_999  # no such process group

    def __init__(self, returncode: int = 0):
        self.returncode = returncode

    def poll(self):
        return self.returncode


class Running:
    pid = 123  # never looked at: poll() says it runs
    returncode = None

    def poll(self):
        return None


def test_plan_reboots_running_instances_and_never_powers_them_off(tmp_path: Path):
    def record(process, **fields) -> InstanceProcess:
        home = tmp_path / str(len(list(tmp_path.iterdir())))
        home.mkdir()
        return InstanceProcess("i", home, home / "log", "terminate", process, **fields)

    running, idle, ending = record(Running()), record(None), record(Running(), term_sent_at=1.0)
    powered_off = record(Ended())
    (powered_off.home / POWER_OFF_MARKER).touch()
    states = {"i-run": "running", "i-idle": "running", "i-ending": "running", "i-off": "running"}
    states["i-gone"] = "terminated"
    processes = {"i-run": running, "i-idle": idle, "i-ending": ending, "i-off": powered_off}
    processes["i-gone"] = record(Ended())
    decided = plan(states, processes, 100.0, 10, reboot_requests=list(states) + ["i-unknown"])
    # RebootInstances: the running ones; not one being terminated, one powering off, or a terminated one.
    assert decided.reboot == ("i-idle", "i-run")
    assert decided.shut_down == ("i-off",) and decided.boot == () and decided.start == ()

    # Under way: its processes end (SIGKILL after the grace period), then it boots again; a second
    # request changes nothing; with no process (idle), or its script exited, it is not powered off.
    running.reboot_sent_at = idle.reboot_sent_at = 100.0
    later = plan(states, processes, 105.0, 10, reboot_requests=["i-run"])
    assert later.reboot == () and later.boot == ("i-idle",) and later.hard_reboot == ()
    assert plan(states, processes, 110.0, 10).hard_reboot == ("i-run",)
    running.process = Ended()
    (running.home / POWER_OFF_MARKER).touch()  # a shutdown its ending processes ran: ignored
    assert not running.powered_off
    assert plan(states, processes, 111.0, 10).boot == ("i-idle", "i-run")
    # Terminated while rebooting: stopped, never booted again.
    running.process = Running()
    stopped = plan({**states, "i-run": "shutting-down"}, processes, 111.0, 10)
    assert stopped.stop == ("i-run",) and "i-run" not in stopped.boot

    # `reboot` on a process-backed instance: its marker; it wins over the shutdown its processes then run.
    inside = record(Ended())
    (inside.home / REBOOT_MARKER).touch()
    (inside.home / POWER_OFF_MARKER).touch()
    decided = plan({"i-in": "running"}, {"i-in": inside}, 1.0, 10)
    assert decided.reboot == ("i-in",) and decided.shut_down == ()

    # An image-backed instance's init exits with REBOOT_EXIT_STATUS for `reboot`, 0 for a power-off.
    class Image:
        pass

    rebooted, off = record(Ended(REBOOT_EXIT_STATUS)), record(Ended(0))
    rebooted.rootfs = off.rootfs = Image()  # type: ignore[assignment]
    decided = plan({"i-a": "running", "i-b": "running"}, {"i-a": rebooted, "i-b": off}, 1.0, 10)
    assert decided.reboot == ("i-a",) and decided.shut_down == ("i-b",)

    # The first ending wins: a reboot requested while a shutdown is under way changes nothing (a
    # process-backed instance's marker is there, its processes are ending); an init that powered off
    # although asked to reboot (a shutdown reached it first) powers the instance off.
    shutting = record(Running())
    (shutting.home / POWER_OFF_MARKER).touch()
    decided = plan({"i-s": "running"}, {"i-s": shutting}, 1.0, 10, reboot_requests=["i-s"])
    assert decided.reboot == () and decided.shut_down == ()
    off.reboot_sent_at = rebooted.reboot_sent_at = 0.5
    decided = plan({"i-a": "running", "i-b": "running"}, {"i-a": rebooted, "i-b": off}, 1.0, 10)
    assert decided.boot == ("i-a",) and decided.shut_down == ("i-b",)

    # A root that failed to boot (again) powers off: never rebooted, even with no process at all.
    failed = record(None, boot_failed=True)
    failed.rootfs = Image()  # type: ignore[assignment]
    decided = plan({"i-f": "running"}, {"i-f": failed}, 1.0, 10, reboot_requests=["i-f"])
    assert decided.shut_down == ("i-f",) and decided.reboot == ()


def test_reboot_requests_are_read_once_and_whole_lines_only(tmp_path: Path):
    requests = tmp_path / "reboot-requests"
    assert read_reboot_requests(requests, 0) == ([], 0)
    requests.write_text("i-1\ni-2\ni-3")  # the last line is still being written
    ids, offset = read_reboot_requests(requests, 0)
    assert ids == ["i-1", "i-2"] and offset == len("i-1\ni-2\n")
    with open(requests, "a") as more:
        more.write("\ni-1\n")
    assert read_reboot_requests(requests, offset) == (["i-3", "i-1"], requests.stat().st_size)


def test_per_boot_scripts_are_the_executable_files_in_name_order(tmp_path: Path):
    assert per_boot_scripts(tmp_path / "missing") == []
    for name, mode in (("b.sh", 0o755), ("a.sh", 0o700), ("README", 0o644), ("c.sh", 0o755)):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(mode)
    (tmp_path / "d").mkdir()
    assert [path.name for path in per_boot_scripts(tmp_path)] == ["a.sh", "b.sh", "c.sh"]


# Process-backed instances


@pytest.mark.timeout(300)
def test_process_backed_instance_reboots(tmp_path: Path):
    with LocalCloud(work_dir=tmp_path, grace_seconds=10, package_upstream=None) as cloud:
        ec2 = cloud.client("ec2")
        instance_id = launch_instance(cloud, PROCESS_USER_DATA)
        worker_up(cloud, instance_id, 1)
        first = cloud.worker_processes()[instance_id]
        home = Path(first["home"])
        assert first["boots"] == 1 and processes_in_groups({first["pgid"]})

        # RebootInstances: the old processes end, the per-boot scripts run in name order, the user data
        # does not run again; the instance is still running, with the same metadata.
        ec2.reboot_instances(InstanceIds=[instance_id])
        worker_up(cloud, instance_id, 2)
        second = cloud.worker_processes()[instance_id]
        assert processes_in_groups({first["pgid"]}) == []
        assert second["boots"] == 2 and second["alive"] and second["pgid"] != first["pgid"]
        assert lines(home / "user-data-runs") == ["user data"]
        assert lines(home / "order") == ["worker", "first", "worker"]  # README is not executable
        assert state(ec2, instance_id) == "running"
        console = instance_log(cloud, instance_id)
        assert console.splitlines().count(CONSOLE_REBOOT_LINE) == 1
        assert "per-boot script 10-first.sh exited with status 0" in console
        # Its worker's shutdown, run as the reboot ended it, did not power it off.
        assert not (home / POWER_OFF_MARKER).exists() and second["metadata_url"] == first["metadata_url"]

        # `reboot` on the instance: the same.
        (home / "please-reboot").touch()
        worker_up(cloud, instance_id, 3)
        third = cloud.worker_processes()[instance_id]
        assert processes_in_groups({second["pgid"]}) == []
        assert third["boots"] == 3 and state(ec2, instance_id) == "running"
        assert lines(home / "user-data-runs") == ["user data"] and len(lines(home / "boots")) == 3
        assert instance_log(cloud, instance_id).splitlines().count(CONSOLE_REBOOT_LINE) == 2

        # After reboots, `shutdown -h now` still powers it off: terminated (its shutdown behaviour).
        (home / "please-shutdown").touch()
        wait_for(lambda: state(ec2, instance_id) == "terminated", 30, "the instance to terminate")
        wait_for(lambda: not processes_in_groups({third["pgid"]}), 15, "its processes to end")
        assert cloud.worker_processes()[instance_id]["boots"] == 3


@pytest.mark.timeout(300)
def test_a_rebooted_instance_without_per_boot_scripts_idles_running(tmp_path: Path):
    with LocalCloud(work_dir=tmp_path, grace_seconds=2, package_upstream=None) as cloud:
        ec2 = cloud.client("ec2")
        idle = launch_instance(cloud, IDLE_USER_DATA)
        stubborn = launch_instance(cloud, STUBBORN_USER_DATA)
        home = wait_for(lambda: cloud.worker_processes().get(idle, {}).get("home"), 30, "the instance")
        wait_for(lambda: lines(Path(home) / "user-data-runs"), 30, "its user data")
        wait_for(lambda: not cloud.worker_processes()[idle]["alive"], 30, "its user data to exit")
        ec2.reboot_instances(InstanceIds=[idle])
        wait_for(lambda: cloud.worker_processes()[idle]["boots"] == 2, 30, "the reboot")
        # Polls go on (another instance starts and ends): it still runs, with no process.
        other = launch_instance(cloud, "#!/bin/bash\nshutdown -h now\n")
        wait_for(lambda: state(ec2, other) == "terminated", 30, "the other instance to terminate")
        info = cloud.worker_processes()[idle]
        assert state(ec2, idle) == "running" and not info["alive"] and info["pid"] is None
        assert not info["rebooting"] and lines(Path(home) / "user-data-runs") == ["user data"]
        # Rebooting a terminated instance is ignored, as on AWS (moto would make it "running" again).
        ec2.reboot_instances(InstanceIds=[other])
        assert state(ec2, other) == "terminated"
        assert cloud.worker_processes()[other]["boots"] == 1

        # Processes that ignore SIGTERM: SIGKILL once the grace period is over (a hard reboot), then it boots.
        wait_for(
            lambda: lines(Path(cloud.worker_processes()[stubborn]["home"]) / "up"), 30, "the stubborn one"
        )
        group = cloud.worker_processes()[stubborn]["pgid"]
        ec2.reboot_instances(InstanceIds=[stubborn])
        wait_for(lambda: cloud.worker_processes()[stubborn]["boots"] == 2, 30, "the hard reboot")
        assert processes_in_groups({group}) == [] and state(ec2, stubborn) == "running"
        assert CONSOLE_REBOOT_LINE in instance_log(cloud, stubborn)

        ec2.terminate_instances(InstanceIds=[idle, stubborn])
        wait_for(lambda: state(ec2, idle) == "terminated", 30, "the idle instance to terminate")


# Image-backed instances (Debian 12)


def nothing_left(image: dict) -> bool:
    return not instance_left_behind(image)


def boot_processes(image: dict) -> set[int]:
    """The host's pids of one boot's processes (a namespace's id may be reused once it is gone: not pids
    this soon)."""
    return set(pids_in_namespace(image["pid_namespace"], "pid"))


def ended(pids: set[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_debian_12_instance_reboots(tmp_path: Path):
    # A grace period past the init's own wait for its processes (STOP_WAIT_SECONDS): on a busy machine the
    # soft path (every process told to stop, then the init's "stopped for a reboot") must not be cut short
    # by the runner's hard reboot, which this test does not mean to exercise.
    grace = STOP_WAIT_SECONDS + 15
    with LocalCloud(work_dir=tmp_path, grace_seconds=grace, package_upstream=None) as cloud:
        ec2 = cloud.client("ec2")
        ami_id = cloud.register_rootfs_image("debian-12")
        instance_id = launch_instance(cloud, IMAGE_USER_DATA, ami_id)
        worker_up(cloud, instance_id, 1)
        first = cloud.worker_processes()[instance_id]["image"]
        first_pids = boot_processes(first)
        assert first["init_pid"] in first_pids
        upper = Path(first["root"]).parent / "upper" / "root"  # its disk, as the host sees it

        # RebootInstances: its init stops every process; it boots again over the same disk, in new
        # namespaces, with its metadata (the same instance id); the per-boot scripts run, the user data not.
        ec2.reboot_instances(InstanceIds=[instance_id])
        worker_up(cloud, instance_id, 2)
        info = cloud.worker_processes()[instance_id]
        second = info["image"]
        assert info["boots"] == 2 and info["alive"] and state(ec2, instance_id) == "running"
        assert second["init_pid"] not in first_pids
        wait_for(lambda: ended(first_pids), 30, "nothing left of its first boot")
        assert lines(upper / "user-data-runs") == ["user data"]
        assert lines(upper / "order") == ["worker", "first", "worker"]
        console = instance_log(cloud, instance_id)
        assert console.splitlines().count(CONSOLE_REBOOT_LINE) == 1
        assert "ec2cluster-localcloud: stopped for a reboot" in console
        assert "ec2cluster-localcloud: power off" not in console

        # `reboot` on the instance (its worker runs it): the same.
        second_pids = boot_processes(second)
        (Path(f"/proc/{second['init_pid']}/root") / "root" / "please-reboot").touch()
        worker_up(cloud, instance_id, 3)
        info = cloud.worker_processes()[instance_id]
        third = info["image"]
        assert info["boots"] == 3 and state(ec2, instance_id) == "running"
        assert third["init_pid"] not in second_pids
        wait_for(lambda: ended(second_pids), 30, "nothing left of its second boot")
        assert lines(upper / "user-data-runs") == ["user data"] and len(lines(upper / "boots")) == 3
        assert instance_log(cloud, instance_id).splitlines().count(CONSOLE_REBOOT_LINE) == 2

        # After reboots, `shutdown -h now` still powers it off: terminated, and nothing of it is left.
        (Path(f"/proc/{third['init_pid']}/root") / "root" / "please-shutdown").touch()
        wait_for(lambda: state(ec2, instance_id) == "terminated", 30, "the instance to terminate")
        wait_for(lambda: nothing_left(third), 10, "nothing left of the instance")
        assert instance_log(cloud, instance_id).splitlines().count("ec2cluster-localcloud: power off") == 1
