"""LocalCloud and its instance runner: start, instances as process groups, shutdown, nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud, cli
from ec2cluster_localcloud.runner import POWER_OFF_MARKER, InstanceProcess, plan

from .helpers import pid_alive, processes_in_groups, wait_for

SLEEPER = "trap 'echo term > \"$HOME/got-term\"; exit 0' TERM\nwhile true; do sleep 0.1; done\n"
STUBBORN = "trap '' TERM\nwhile true; do sleep 0.1; done\n"


def launch(ec2, ami_id: str, user_data: str, behavior: str | None = "terminate") -> str:
    extra = {"InstanceInitiatedShutdownBehavior": behavior} if behavior else {}
    answer = ec2.run_instances(ImageId=ami_id, MinCount=1, MaxCount=1, UserData=user_data, **extra)
    return answer["Instances"][0]["InstanceId"]


def state(ec2, instance_id: str) -> str:
    answer = ec2.describe_instances(InstanceIds=[instance_id])
    return answer["Reservations"][0]["Instances"][0]["State"]["Name"]


def test_local_cloud_lifecycle(tmp_path: Path):
    class Boom(Exception):
        pass

    server_pid = None
    groups: set[int] = set()
    with pytest.raises(Boom), LocalCloud(work_dir=tmp_path, grace_seconds=2) as cloud:
        server_pid = cloud._server.pid
        assert cloud.endpoint_url.startswith("http://127.0.0.1:")
        env = cloud.env()
        assert env["AWS_ENDPOINT_URL"] == cloud.endpoint_url and env["AWS_EC2_METADATA_DISABLED"] == "true"
        connection = json.loads(cloud.airflow_conn_env()["AIRFLOW_CONN_AWS_DEFAULT"])
        assert connection["conn_type"] == "aws"
        assert connection["extra"] == {"endpoint_url": cloud.endpoint_url, "region_name": "us-east-1"}
        assert "AIRFLOW_CONN_MY_AWS" in cloud.airflow_conn_env("my_aws")

        iam, ec2 = cloud.client("iam"), cloud.client("ec2")
        profile = iam.get_instance_profile(InstanceProfileName=cloud.instance_profile_name)["InstanceProfile"]
        assert [role["RoleName"] for role in profile["Roles"]] == ["ec2cluster-worker"]
        assert ec2.describe_images(ImageIds=[cloud.ami_id])["Images"][0]["Name"] == "ec2cluster-local-worker"

        sleeper = launch(ec2, cloud.ami_id, SLEEPER)
        stubborn = launch(ec2, cloud.ami_id, STUBBORN)
        exits_terminate = launch(ec2, cloud.ami_id, "echo bye; shutdown -h now\n")
        exits_stop = launch(ec2, cloud.ami_id, "poweroff\n", behavior=None)  # EC2's default: stop
        exits_only = launch(ec2, cloud.ami_id, "echo done; exit 0\n")
        left_running = launch(ec2, cloud.ami_id, SLEEPER)

        # An instance that shuts itself down ends the way EC2 says (InstanceInitiatedShutdownBehavior).
        wait_for(
            lambda: state(ec2, exits_terminate) == "terminated", 15, "the shut down instance to terminate"
        )
        wait_for(lambda: state(ec2, exits_stop) in ("stopping", "stopped"), 15, "the powered off one to stop")
        assert (tmp_path / "logs" / f"{exits_terminate}.log").read_text().strip() == "bye"
        # One whose script merely exits keeps running (and billing), as on EC2.
        wait_for(lambda: cloud.worker_processes()[exits_only]["returncode"] == 0, 15, "the script to exit")
        cloud._runner.poll_once()  # a poll that sees the exited script
        assert state(ec2, exits_only) == "running"

        # Each instance runs in its own process group, with its own identity and home.
        for instance_id in (sleeper, stubborn, left_running):
            wait_for(lambda i=instance_id: cloud.worker_processes().get(i, {}).get("alive"), 15, "a process")
        processes = cloud.worker_processes()
        groups = {info["pgid"] for info in processes.values() if info["pgid"]}
        assert len(groups) == 6

        # Terminating an instance sends SIGTERM to its group, then SIGKILL after the grace period.
        ec2.terminate_instances(InstanceIds=[sleeper, stubborn])
        wait_for(lambda: not cloud.worker_processes()[sleeper]["alive"], 10, "the sleeper to exit")
        assert (Path(processes[sleeper]["home"]) / "got-term").read_text().strip() == "term"
        wait_for(lambda: not cloud.worker_processes()[stubborn]["alive"], 10, "the stubborn process to die")
        assert cloud.worker_processes()[stubborn]["killed"]
        assert cloud.worker_processes()[left_running]["alive"]
        raise Boom  # an exception inside the block still stops everything

    assert server_pid is not None and not pid_alive(server_pid)
    assert processes_in_groups(groups) == []


def test_plan_is_a_pure_decision(tmp_path: Path):
    class Exited:
        returncode = 0
        pid = 999_999_999  # no such process group

        def poll(self):
            return 0

    class Running:
        pid = 123

        def poll(self):
            return None

    def record(process, term_sent_at=None, powered_off=False):
        home = tmp_path / str(id(process))
        home.mkdir()
        if powered_off:  # what its shutdown command leaves
            (home / POWER_OFF_MARKER).touch()
        return InstanceProcess("i", home, tmp_path / "log", "terminate", process, term_sent_at=term_sent_at)

    states = {
        "i-new": "pending",
        "i-old": "terminated",
        "i-exited": "running",
        "i-script-ended": "running",
        "i-gone": "stopped",
    }
    processes = {
        "i-exited": record(Exited(), powered_off=True),
        "i-script-ended": record(Exited()),  # exited without shutting down: keeps running, as on EC2
        "i-gone": record(Running()),
        "i-old": record(Running(), term_sent_at=100.0),
    }
    decided = plan(states, processes, now=105.0, grace_seconds=10)
    assert decided.start == ("i-new",) and decided.stop == ("i-gone",) and decided.shut_down == ("i-exited",)
    assert decided.kill == ()
    assert plan(states, processes, now=111.0, grace_seconds=10).kill == ("i-old",)
    # A spot notice whose period has ended: reclaimed once, while the instance runs.
    noticed = record(Running())
    noticed.reclaim_at = 200.0
    spot = {"i-spot": "running"}
    assert plan(spot, {"i-spot": noticed}, now=199.0, grace_seconds=10).reclaim == ()
    assert plan(spot, {"i-spot": noticed}, now=200.0, grace_seconds=10).reclaim == ("i-spot",)
    noticed.reclaimed = True
    assert plan(spot, {"i-spot": noticed}, now=201.0, grace_seconds=10).reclaim == ()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_cli_runs_until_stopped_and_leaves_nothing(tmp_path: Path, stop_signal: int):
    process = subprocess.Popen(
        [sys.executable, "-m", "ec2cluster_localcloud.cli", "--work-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Running until Ctrl-C"):
                break
        output = "".join(lines)
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in output
        assert "export AIRFLOW_CONN_AWS_DEFAULT=" in output
        children = [pid for pid, _ in _children(process.pid)]
        assert children, "the server runs as a child process"
        process.send_signal(stop_signal)
        assert process.wait(timeout=30) == 0
        assert "Local cloud stopped." in process.stdout.read()
        assert not [pid for pid in children if pid_alive(pid)]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _children(parent: int) -> list[tuple[int, int]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append((int(entry.name), int(fields[2])))
    return found


def test_cli_parser_takes_port_and_region():
    args = cli.build_parser().parse_args(["--port", "4599", "--region", "eu-west-1"])
    assert (args.port, args.region) == (4599, "eu-west-1")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--port", "not-a-port"])


def test_instances_start_with_every_signal_at_its_default_whatever_the_local_cloud_inherited(tmp_path: Path):
    # A local cloud started in the background (`&`, nohup) inherits SIGINT, SIGQUIT and SIGHUP ignored; an
    # instance is a booted machine: nothing ignored (a shell cannot trap a signal ignored on entry, so an
    # image's init would miss its reboot signal, as a CI run did).
    ignored = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignored}
    try:
        with LocalCloud(work_dir=tmp_path, grace_seconds=2) as cloud:
            ec2 = cloud.client("ec2")
            instance_id = launch(ec2, cloud.ami_id, 'grep SigIgn /proc/self/status > "$HOME/ignored"\n')
            home = wait_for(
                lambda: cloud.worker_processes().get(instance_id, {}).get("home"), 30, "the instance"
            )
            ignored_file = Path(home) / "ignored"
            wait_for(lambda: ignored_file.exists() and ignored_file.read_text().strip(), 30, "its user data")
            label, mask = ignored_file.read_text().split()
            # The standard signals (1-31); glibc keeps 32 and 33 to itself, and no program can reset them.
            ignored_signals = [n for n in range(1, 32) if int(mask, 16) & (1 << (n - 1))]
            assert label == "SigIgn:" and ignored_signals == []
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
