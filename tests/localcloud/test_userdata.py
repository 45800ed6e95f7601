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
    minify_python,
    parse_user_data,
    render_user_data,
    worker_source_files,
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


def test_embedded_user_data_is_gzip_and_within_the_ec2_limit():
    data = render_user_data(CONFIG)
    assert data[:2] == b"\x1f\x8b"
    assert len(data) <= USER_DATA_LIMIT_BYTES
    assert gzip.decompress(data).decode() == parse_user_data(data)


def test_rendering_is_deterministic():
    assert render_user_data(CONFIG) == render_user_data(dict(reversed(list(CONFIG.items()))))


def test_round_trip_gives_back_the_config():
    script = parse_user_data(render_user_data(CONFIG, requirements=["requests==2.32.3"]))
    assert config_from_script(script) == CONFIG


def test_parse_accepts_plain_text():
    assert parse_user_data(b"#!/bin/bash\necho hi\n") == "#!/bin/bash\necho hi\n"


def test_too_large_user_data_names_size_limit_and_fix():
    requirements = [f"package-{i:05d}-{os.urandom(8).hex()}==1.0" for i in range(800)]
    with pytest.raises(UserDataTooLarge) as raised:
        render_user_data(CONFIG, requirements=requirements)
    message = str(raised.value)
    assert "16,384" in message and "fewer requirements" in message and 'worker_source="pip:' in message
    assert re.search(r"user data is [\d,]+ bytes", message)
    assert isinstance(raised.value, ValueError)


def test_pip_worker_source_fits_where_embedding_does_not_need_to():
    data = render_user_data(CONFIG, worker_source="pip:ec2cluster-worker==0.1.0")
    script = parse_user_data(data)
    assert "pip install --quiet ec2cluster-worker==0.1.0" in script
    assert "src/ec2cluster_worker" not in script
    assert len(data) < 2_000


@pytest.mark.parametrize("worker_source", ["pip:", "wheel.whl", "pip:\n"])
def test_bad_worker_source_is_refused(worker_source):
    with pytest.raises(ValueError, match="worker_source"):
        render_user_data(CONFIG, worker_source=worker_source)


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
        render_user_data({**CONFIG, **config_change})


def test_script_carries_no_credential_looking_string():
    script = parse_user_data(render_user_data(CONFIG))
    assert not ACCESS_KEY_PATTERN.search(script)
    assert "aws_secret_access_key" not in script.lower()


def test_script_is_valid_bash():
    for data in (render_user_data(CONFIG), render_user_data(CONFIG, worker_source="pip:ec2cluster-worker")):
        result = subprocess.run(["bash", "-n"], input=parse_user_data(data), text=True, capture_output=True)
        assert result.returncode == 0, result.stderr


def test_minified_worker_has_the_same_code():
    import ast

    for _, text in worker_source_files(minify=False):
        minified = minify_python(text)
        assert len(minified) <= len(text)
        compile(minified, "<minified>", "exec")

        # Same names defined at module level.
        def names(source: str) -> set[str]:
            return {
                node.name
                for node in ast.parse(source).body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            }

        assert names(minified) == names(text)


def test_running_the_script_materialises_a_worker_that_imports(tmp_path: Path):
    script_path = tmp_path / "user-data.sh"
    script_path.write_text(parse_user_data(render_user_data(CONFIG)))
    home = tmp_path / "home"
    # A fake interpreter on PATH stands in for "python3": it records the worker's command line and checks
    # that the materialised package (not the installed one) imports and validates the config.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, ec2cluster_worker, ec2cluster_worker.config as c\n"
        "args = sys.argv[1:]\n"
        "assert args[:3] == ['-m', 'ec2cluster_worker', '--config'], args\n"
        "c.WorkerConfig.from_dict(json.load(open(args[3])))\n"
        "print('worker-file', ec2cluster_worker.__file__)\n"
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
        "PYTHONPATH": "",
    }
    result = subprocess.run(["bash", str(script_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"worker-file {home}/src/ec2cluster_worker/__init__.py" in result.stdout
    package = home / "src" / "ec2cluster_worker"
    expected = sorted(Path(path).name for path, _ in worker_source_files())
    assert sorted(p.name for p in package.glob("*.py")) == expected
    # The materialised worker imports on its own (not shadowed by the installed package).
    check = subprocess.run(
        [sys.executable, "-c", "import ec2cluster_worker.__main__, ec2cluster_worker.loop; print('ok')"],
        env={**env, "PYTHONPATH": str(home / "src")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr
    assert (home / "config.json").exists()


def test_worker_exit_status_is_the_script_status_and_no_shutdown_is_honoured(tmp_path: Path):
    script_path = tmp_path / "user-data.sh"
    script_path.write_text(parse_user_data(render_user_data(CONFIG)))
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
