"""The instance bootstrap script: size, no credentials, round trip, valid bash, and a worker that imports."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_ec2cluster.userdata import (
    USER_DATA_LIMIT_BYTES,
    CredentialsInUserData,
    UserDataTooLarge,
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
BUNDLE_SHA256 = "ab" * 32
PIP_WORKER = "pip:ec2cluster-worker==0.1.0"


def render(config: dict, **kwargs) -> bytes:
    """User data in the launch's default mode: a loader for the worker bundle in the state table."""
    return render_user_data(config, bundle_sha256=BUNDLE_SHA256, **kwargs)


def test_user_data_is_gzip_and_small():
    data = render(CONFIG)
    assert data[:2] == b"\x1f\x8b"
    assert len(data) <= USER_DATA_LIMIT_BYTES // 4
    assert gzip.decompress(data).decode() == parse_user_data(data)


def test_rendering_is_deterministic():
    assert render(CONFIG) == render(dict(reversed(list(CONFIG.items()))))


def test_round_trip_gives_back_the_config():
    script = parse_user_data(render(CONFIG, requirements=["requests==2.32.3"]))
    assert config_from_script(script) == CONFIG


def test_parse_accepts_plain_text():
    assert parse_user_data(b"#!/bin/bash\necho hi\n") == "#!/bin/bash\necho hi\n"


def test_too_large_user_data_names_size_limit_and_fix():
    requirements = [f"package-{i:05d}-{os.urandom(8).hex()}==1.0" for i in range(2000)]
    with pytest.raises(UserDataTooLarge) as raised:
        render(CONFIG, requirements=requirements)
    message = str(raised.value)
    assert "16,384" in message and "fewer requirements" in message and 'worker_source="pip:' in message
    assert re.search(r"user data is [\d,]+ bytes", message)
    assert isinstance(raised.value, ValueError)


def test_pip_worker_source_installs_the_worker():
    data = render_user_data(CONFIG, worker_source=PIP_WORKER)
    script = parse_user_data(data)
    assert "pip install --quiet --timeout 10 --retries 2 ec2cluster-worker==0.1.0" in script
    assert "src/ec2cluster_worker" not in script
    assert len(data) < 2_000


@pytest.mark.parametrize("worker_source", ["pip:", "wheel.whl", "pip:\n"])
def test_bad_worker_source_is_refused(worker_source):
    with pytest.raises(ValueError, match="worker_source"):
        render_user_data(CONFIG, worker_source=worker_source)


def test_the_removed_embedded_mode_says_what_to_use_instead():
    with pytest.raises(ValueError, match=r'"embedded" is no longer offered.*16 KB.*use "table"'):
        render_user_data(CONFIG, worker_source="embedded")


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
    script = parse_user_data(render(CONFIG))
    assert not ACCESS_KEY_PATTERN.search(script)
    assert "aws_secret_access_key" not in script.lower()


def test_script_is_valid_bash():
    for data in (render(CONFIG), render_user_data(CONFIG, worker_source="pip:ec2cluster-worker")):
        result = subprocess.run(["bash", "-n"], input=parse_user_data(data), text=True, capture_output=True)
        assert result.returncode == 0, result.stderr


def test_running_the_script_writes_the_config_and_runs_the_worker(tmp_path: Path):
    # pip mode with installs skipped: the worker comes from PYTHONPATH (the table mode's loader has its own
    # tests in tests/test_workerbundle.py).
    script_path = tmp_path / "user-data.sh"
    script_path.write_text(parse_user_data(render_user_data(CONFIG, worker_source=PIP_WORKER)))
    home = tmp_path / "home"
    # A fake interpreter on PATH stands in for "python3": it records the worker's command line and checks
    # that the written configuration validates.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, ec2cluster_worker.config as c\n"
        "args = sys.argv[1:]\n"
        "assert args[:3] == ['-m', 'ec2cluster_worker', '--config'], args\n"
        "c.WorkerConfig.from_dict(json.load(open(args[3])))\n"
        "print('worker-config', args[3])\n"
    )
    fake_python = tmp_path / "fakepython"
    fake_python.write_text(f'#!/bin/bash\nexec {sys.executable} {probe} "$@"\n')
    fake_python.chmod(0o755)
    env = {
        **os.environ,
        "EC2CLUSTER_HOME": str(home),
        "EC2CLUSTER_SKIP_INSTALL": "1",
        "EC2CLUSTER_NO_SHUTDOWN": "1",
        "EC2CLUSTER_PYTHON": str(fake_python),
    }
    result = subprocess.run(["bash", str(script_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"worker-config {home}/config.json" in result.stdout
    assert config_from_script(script_path.read_text()) == CONFIG


def test_worker_exit_status_is_the_script_status_and_no_shutdown_is_honoured(tmp_path: Path):
    script_path = tmp_path / "user-data.sh"
    script_path.write_text(parse_user_data(render_user_data(CONFIG, worker_source=PIP_WORKER)))
    fake_python = tmp_path / "fakepython"
    fake_python.write_text("#!/bin/bash\nexit 7\n")
    fake_python.chmod(0o755)
    env = {
        **os.environ,
        "EC2CLUSTER_HOME": str(tmp_path / "home"),
        "EC2CLUSTER_SKIP_INSTALL": "1",
        "EC2CLUSTER_NO_SHUTDOWN": "1",
        "EC2CLUSTER_PYTHON": str(fake_python),
    }
    result = subprocess.run(["bash", str(script_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 7
    assert "bootstrap finished with status 7" in result.stderr
