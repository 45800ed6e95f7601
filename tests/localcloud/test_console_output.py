"""GetConsoleOutput answers with the instance's console (its user data's output): the latest 64 KB,
base64-encoded as EC2 sends it, also once the instance is terminated."""

from __future__ import annotations

import base64
from pathlib import Path

from botocore.handlers import decode_console_output
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.server import CONSOLE_OUTPUT_BYTES, console_output

from .helpers import launch_instance, wait_for

# About 100 KB of numbered lines, then a last line: only the end fits in the 64 KB EC2 gives.
NOISY = 'for i in $(seq 1 2000); do printf "line %05d %s\\n" "$i" "$(printf x%.0s $(seq 1 40))"; done\n'
NOISY += 'echo "boot failed: no route to the queue" >&2\nshutdown -h now\n'


def test_console_output_is_the_tail_of_a_file(tmp_path: Path):
    log = tmp_path / "i-1.log"
    assert console_output(log) == b""
    log.write_bytes(b"a" * 10 + b"b" * CONSOLE_OUTPUT_BYTES)
    assert console_output(log) == b"b" * CONSOLE_OUTPUT_BYTES
    assert console_output(log, limit=4) == b"bbbb"


def test_get_console_output_reads_the_instance_log(tmp_path: Path):
    with LocalCloud(
        work_dir=tmp_path / "cloud", wheel_cache=tmp_path / "wheels", package_upstream=None
    ) as cloud:
        ec2 = cloud.client("ec2")
        raw = cloud.client("ec2")  # sees the wire's base64: botocore's decoding handler removed
        raw.meta.events.unregister("after-call.ec2.GetConsoleOutput", decode_console_output)
        noisy = launch_instance(cloud, NOISY)
        silent = launch_instance(cloud, "")

        def state(instance_id: str) -> str:
            answer = ec2.describe_instances(InstanceIds=[instance_id])
            return answer["Reservations"][0]["Instances"][0]["State"]["Name"]

        wait_for(lambda: state(noisy) == "terminated", 30, "the noisy instance to shut down and terminate")
        answer = ec2.get_console_output(InstanceId=noisy)
        assert answer["InstanceId"] == noisy and answer["Timestamp"]
        text = answer["Output"]
        assert text.endswith("boot failed: no route to the queue\n")
        assert "line 02000" in text and "line 00001" not in text
        log = (tmp_path / "cloud" / "logs" / f"{noisy}.log").read_bytes()
        assert len(log) > CONSOLE_OUTPUT_BYTES
        encoded = raw.get_console_output(InstanceId=noisy)["Output"]
        assert base64.b64decode(encoded) == log[-CONSOLE_OUTPUT_BYTES:]

        # An instance that wrote nothing has no output yet, as on EC2.
        wait_for(lambda: silent in cloud.worker_processes(), 15, "the silent instance to boot")
        assert "Output" not in ec2.get_console_output(InstanceId=silent)
