"""One local cloud for the whole reliability suite (its start-up costs seconds); a job per test.

IAM is enforced: the controller (the Airflow connection) is a user holding exactly ``ec2cluster iam-policy
--side controller`` and the workers' role holds exactly ``--side worker``; the tests' own inspection of the
account (boto3's default session) uses the root key. Each job has a state table of its own (rel-state-*),
which the policies name with ``--state-table``.

Its grace period (SIGTERM to SIGKILL) is shorter than the default, so that a process that ignores SIGTERM
does not hold a test up for long, and still several times what a worker needs to stop (about 1.5 s).
"""

from __future__ import annotations

import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.project import apply_project_policies

OUTPUT_TABLE = "ec2cluster-test-results"  # the output table the policies name (--output-table)


@pytest.fixture(scope="session")
def cloud(tmp_path_factory):
    with LocalCloud(work_dir=tmp_path_factory.mktemp("reliability-cloud"), grace_seconds=10) as started:
        started.controller_credentials = apply_project_policies(
            started, "--state-table", "rel-state-*", "--output-table", OUTPUT_TABLE
        )
        yield started


@pytest.fixture
def cloud_env(cloud, monkeypatch):
    """Point boto3 (as the root) and the Airflow connection ``aws_default`` (as the controller) at it."""
    for name, value in {
        **cloud.env(),
        **cloud.airflow_conn_env(credentials=cloud.controller_credentials),
    }.items():
        monkeypatch.setenv(name, value)
    return cloud
