"""The instance bootstrap script: size, no credentials, round trip, valid bash, and what it runs, in order.

The script's logic is run here with stand-ins for the image's commands (interpreters that report a version,
a ``shutdown`` that records it); the real boot loader and worker run on the local cloud's instances (tests in
tests/reliability and tests/localcloud/test_image_bootstrap.py).
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from pathlib import Path

import pytest

from airflow_ec2cluster.userdata import (
    USER_DATA_LIMIT_BYTES,
    CredentialsInUserData,
    UserDataTooLarge,
    boot_loader_source,
    config_from_script,
    parse_user_data,
    render_user_data,
)

CONFIG = {
    "cluster_id": "userdata-test",
    "region": "us-east-1",
    "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/userdata-test-tasks",
    "handler": {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
    "idle_shutdown_seconds": 60,
    "output": {"type": "s3", "bucket": "results-bucket", "prefix": "runs/ü", "per": "task"},
}
EXAMPLE_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example
ACCESS_KEY_PATTERN = re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}")
BUNDLE = {"sha256": "ab" * 32, "size": 1234, "s3": {"bucket": "b", "key": "ec2cluster/bundles/c/x.zip"}}


def render(config: dict = CONFIG, **kwargs) -> bytes:
    return render_user_data(config, bundle=BUNDLE, **kwargs)


def test_user_data_is_gzip_and_fits_with_room_to_spare():
    data = render()
    assert data[:2] == b"\x1f\x8b"
    assert len(data) <= USER_DATA_LIMIT_BYTES - 6_000  # room for a handler's options
    assert gzip.decompress(data).decode() == parse_user_data(data)


def test_rendering_is_deterministic():
    assert render(CONFIG) == render(dict(reversed(list(CONFIG.items()))))


def test_round_trip_gives_back_the_config_and_carries_the_boot_loader():
    script = parse_user_data(render())
    assert config_from_script(script) == CONFIG
    assert boot_loader_source() in script


def test_parse_accepts_plain_text():
    assert parse_user_data(b"#!/bin/bash\necho hi\n") == "#!/bin/bash\necho hi\n"


def test_too_large_user_data_names_the_limit_and_the_fix():
    big = {
        **CONFIG,
        "output": {"type": "custom", "target": "m:C", "options": {"blob": os.urandom(20_000).hex()}},
    }
    with pytest.raises(UserDataTooLarge) as raised:
        render(big)
    message = str(raised.value)
    assert "16,384" in message and "worker_options" in message
    assert re.search(r"user data is [\d,]+ bytes", message)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"python": ["python3; rm -rf /"]}, "python"),
        ({"python": []}, "python"),
        ({"python_version": "3"}, "python_version"),
        ({"python_version": "3.11; true"}, "python_version"),
        ({"min_python_version": "3.10 && true"}, "min_python_version"),
    ],
)
def test_bad_python_choices_are_refused_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        render(**change)


def test_a_bundle_needs_its_sha256():
    with pytest.raises(ValueError, match="SHA-256"):
        render_user_data(CONFIG, bundle={**BUNDLE, "sha256": "nope"})


@pytest.mark.parametrize(
    "config_change",
    [
        {"queue_url": "https://example.com/?k=AKIAIOSFODNN7EXAMPLE"},
        {"output": {"type": "custom", "target": "m:C", "options": {"key": "ASIAQWERTYUIOPASDFGH"}}},
        {"output": {"type": "custom", "target": "m:C", "options": {"aws_secret_access_key": "x"}}},
        {"output": {"type": "custom", "target": "m:C", "options": {"token": EXAMPLE_SECRET_KEY}}},
    ],
)
def test_credentials_in_config_are_refused(config_change):
    with pytest.raises(CredentialsInUserData):
        render({**CONFIG, **config_change})


def test_script_carries_no_credential_looking_string():
    script = parse_user_data(render())
    assert not ACCESS_KEY_PATTERN.search(script)
    assert "aws_secret_access_key" not in script.lower()


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n"], input=parse_user_data(render()), text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


# Running the script with stand-ins for the image's commands.

FAKE_PYTHON = """#!/bin/bash
# A stand-in interpreter of version {version}: answers the bootstrap's version checks; "runs" boot.py by
# recording it and making the venv's python (which records the worker's command line).
log={log}
case "$1" in
  -c)
    case "$2" in
      *print*) echo {version} ;;
    esac ;;
  *boot.py)
    echo "boot {name} $*" >> "$log"
    [ -e {fail_venv} ] && {{ rm {fail_venv}; exit 4; }}
    mkdir -p "$EC2CLUSTER_HOME/venv/bin"
    venv_python="$EC2CLUSTER_HOME/venv/bin/python"
    printf '#!/bin/bash\\necho "worker $*" >> %s\\nexit {worker_status}\\n' "$log" > "$venv_python"
    chmod 755 "$venv_python"
    exit {boot_status} ;;
esac
"""


def fake_image(tmp_path: Path, pythons: dict[str, str], *, boot_status=0, worker_status=0, fail_venv=False):
    """A PATH of stand-ins: interpreters named like ``pythons`` (name -> version), shutdown, apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    flag = tmp_path / "fail-venv"
    if fail_venv:
        flag.touch()
    for name, version in pythons.items():
        path = bin_dir / name
        path.write_text(
            FAKE_PYTHON.format(
                version=version,
                log=log,
                name=name,
                fail_venv=flag,
                boot_status=boot_status,
                worker_status=worker_status,
            )
        )
        path.chmod(0o755)
    for name, body in {
        "shutdown": 'echo "shutdown $*" >> {log}',
        "apt-get": 'echo "apt-get $*" >> {log}',
    }.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body.format(log=log) + "\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def run_script(tmp_path: Path, bin_dir: Path, **render_options) -> subprocess.CompletedProcess:
    script = tmp_path / "user-data.sh"
    script.write_text(parse_user_data(render(**render_options)))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "EC2CLUSTER_HOME": str(tmp_path / "home"),
        "EC2CLUSTER_CLOUD_DIR": str(tmp_path / "cloud"),
    }
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_the_script_picks_the_first_interpreter_of_the_bundles_version_then_runs_the_worker(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"python3": "3.9", "py311": "3.11", "py312": "3.12"})
    result = run_script(tmp_path, bin_dir, python=["python3", "py311", "py312"], python_version="3.11")
    lines = log.read_text().splitlines()
    home = tmp_path / "home"
    assert lines[0] == f"boot py311 {home}/boot.py {home}/boot.json", result.stderr
    assert lines[1] == f"worker -m ec2cluster_worker --config {home}/config.json"
    assert lines[2] == "shutdown -h now"  # the worker exited: the instance powers off
    assert config_from_script((tmp_path / "user-data.sh").read_text()) == CONFIG
    assert (home / "worker-started").exists()
    # Registered for every later boot (cloud-init's per-boot scripts).
    per_boot = tmp_path / "cloud" / "scripts" / "per-boot" / "ec2cluster.sh"
    assert str(home / "start.sh") in per_boot.read_text() and os.access(per_boot, os.X_OK)


def test_without_a_version_the_first_python_the_bundle_can_run_on_will_do_in_the_given_order(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"old": "3.8", "py39": "3.9", "python3": "3.12"})
    run_script(tmp_path, bin_dir, python=["missing", "old", "py39", "python3"])
    assert log.read_text().splitlines()[0].startswith("boot py39 ")  # the boot loader's own floor: 3.9


def test_the_bundles_minimum_python_passes_over_older_interpreters(tmp_path):
    # Today's boto3 needs 3.10: the manifest's min_python_version keeps a 3.9 image Python from being
    # chosen (it would fail at the worker's first import, with a traceback rather than a cause).
    bin_dir, log = fake_image(tmp_path, {"py39": "3.9", "py310": "3.10"})
    run_script(tmp_path, bin_dir, python=["py39", "py310"], min_python_version="3.10")
    assert log.read_text().splitlines()[0].startswith("boot py310 ")


def test_an_image_with_only_an_older_python_than_the_bundle_needs_says_so(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"python3": "3.9"})
    result = run_script(tmp_path, bin_dir, python=["python3"], min_python_version="3.10")
    assert "ec2cluster: startup-failed: no Python 3.10+ among: python3 (found: python3=3.9)" in result.stderr
    assert log.read_text().splitlines() == ["shutdown -h now"]


def test_no_suitable_interpreter_is_said_on_the_console_and_the_instance_powers_off(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"python3": "3.11"})
    result = run_script(tmp_path, bin_dir, python=["python3", "/opt/conda/bin/python"], python_version="3.12")
    assert "bootstrap finished with status 1" in result.stderr
    assert (
        "ec2cluster: startup-failed: no Python 3.12 among: python3 /opt/conda/bin/python "
        "(found: python3=3.11)" in result.stderr
    )
    assert log.read_text().splitlines() == ["shutdown -h now"]


def test_a_boot_loader_failure_powers_the_instance_off_without_running_the_worker(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"python3": "3.11"}, boot_status=1)
    result = run_script(tmp_path, bin_dir)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("boot python3") and lines[-1] == "shutdown -h now"
    assert not any(line.startswith("worker") for line in lines)
    assert "bootstrap finished with status 1" in result.stderr


def test_an_image_without_venv_support_gets_the_distributions_package_then_boots(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"python3": "3.11"}, fail_venv=True)
    run_script(tmp_path, bin_dir)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("boot python3")
    assert lines[1].startswith("apt-get") and "update" in lines[1]
    assert lines[2].startswith("apt-get") and "install -y --no-install-recommends python3.11-venv" in lines[2]
    assert "DPkg::Lock::Timeout=120" in lines[2]
    assert lines[3].startswith("boot python3") and lines[4].startswith("worker")


def test_the_worker_exit_status_is_said_on_the_console_then_the_power_goes(tmp_path):
    bin_dir, log = fake_image(tmp_path, {"python3": "3.11"}, worker_status=7)
    result = run_script(tmp_path, bin_dir)
    assert "bootstrap finished with status 7" in result.stderr
    assert log.read_text().splitlines()[-1] == "shutdown -h now"
