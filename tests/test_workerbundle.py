"""The worker bundle and the user-data loader that fetches it from the state table at boot."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
import zipfile
from io import BytesIO
from pathlib import Path

import boto3
import pytest
from ec2cluster_worker import records

from airflow_ec2cluster.userdata import USER_DATA_LIMIT_BYTES, parse_user_data, render_user_data
from airflow_ec2cluster.workerbundle import build_worker_bundle, worker_source_files


def config(cluster_id: str, table: str) -> dict:
    return {
        "cluster_id": cluster_id,
        "region": "us-east-1",
        "queue_url": "http://127.0.0.1:1/123456789012/q",
        "state_table": table,
        "handler": {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
    }


def test_bundle_is_deterministic_and_holds_every_worker_module():
    first, second = build_worker_bundle(), build_worker_bundle()
    assert first.data == second.data
    assert first.sha256 == hashlib.sha256(first.data).hexdigest()
    names = zipfile.ZipFile(BytesIO(first.data)).namelist()
    assert sorted(names) == sorted(f"ec2cluster_worker/{p.name}" for p in worker_source_files())


def test_table_mode_user_data_is_small_and_needs_the_checksum():
    data = render_user_data(config("c-1", "t"), worker_source="table", bundle_sha256="a" * 64)
    assert len(data) < USER_DATA_LIMIT_BYTES // 4
    with pytest.raises(ValueError, match="bundle_sha256"):
        render_user_data(config("c-1", "t"), worker_source="table")


def run_loader_script(tmp_path: Path, user_data: bytes, endpoint: str) -> subprocess.CompletedProcess:
    script = parse_user_data(user_data)
    # Only the bootstrap up to the worker's start: the test checks what the loader materialises.
    script = script.split('"$PY" -m ec2cluster_worker', 1)[0] + '\n"$PY" -c "import ec2cluster_worker.loop"\n'
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "EC2CLUSTER_HOME": str(tmp_path / "home"),
        "EC2CLUSTER_PYTHON": sys.executable,
        "EC2CLUSTER_SKIP_INSTALL": "1",
        "EC2CLUSTER_NO_SHUTDOWN": "1",
    }
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def state_table(moto_server):
    name = f"state-{uuid.uuid4().hex[:8]}"
    dynamodb = boto3.client("dynamodb", endpoint_url=moto_server, region_name="us-east-1")
    dynamodb.create_table(
        TableName=name,
        **records.STATE_TABLE_SCHEMA,
    )
    return dynamodb, name


def put_bundle(dynamodb, table: str, cluster_id: str, data: bytes) -> None:
    dynamodb.put_item(
        TableName=table,
        Item={"pk": {"S": f"C#{cluster_id}"}, "sk": {"S": "WORKER"}, "bundle": {"B": data}},
    )


def test_loader_fetches_the_bundle_and_the_worker_imports_from_it(tmp_path, moto_server, state_table):
    dynamodb, table = state_table
    bundle = build_worker_bundle()
    put_bundle(dynamodb, table, "c-load", bundle.data)
    user_data = render_user_data(config("c-load", table), worker_source="table", bundle_sha256=bundle.sha256)
    done = run_loader_script(tmp_path, user_data, moto_server)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "home" / "src" / "ec2cluster_worker" / "loop.py").is_file()


def test_loader_refuses_a_bundle_whose_checksum_differs(tmp_path, moto_server, state_table):
    dynamodb, table = state_table
    bundle = build_worker_bundle()
    put_bundle(dynamodb, table, "c-tampered", bundle.data + b"\0")
    user_data = render_user_data(
        config("c-tampered", table), worker_source="table", bundle_sha256=bundle.sha256
    )
    done = run_loader_script(tmp_path, user_data, moto_server)
    assert done.returncode != 0
    assert "SHA-256 differs" in done.stderr
    assert not (tmp_path / "home" / "src" / "ec2cluster_worker").exists()
