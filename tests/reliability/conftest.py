"""One local cloud for the whole reliability suite (its start-up costs seconds); a job per test.

Its grace period (SIGTERM to SIGKILL) is shorter than the default, so that a process that ignores SIGTERM
does not hold a test up for long, and still several times what a worker needs to stop (about 1.5 s).
"""

from __future__ import annotations

import pytest
from ec2cluster_localcloud import LocalCloud


@pytest.fixture(scope="session")
def cloud(tmp_path_factory):
    with LocalCloud(work_dir=tmp_path_factory.mktemp("reliability-cloud"), grace_seconds=10) as started:
        yield started


@pytest.fixture
def cloud_env(cloud, monkeypatch):
    """Point boto3 and the Airflow connection ``aws_default`` at the local cloud."""
    for name, value in {**cloud.env(), **cloud.airflow_conn_env()}.items():
        monkeypatch.setenv(name, value)
    return cloud
