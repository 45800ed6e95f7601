"""Three distributions, one direction of dependence: provider and worker never need the local cloud."""

from __future__ import annotations

import ast
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ONLY = {"moto", "ec2cluster_localcloud"}


def imported_top_levels(package_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def runtime_requirements(distribution: str) -> set[str]:
    """What a plain install brings: requirements without an extra (or any other marker)."""
    found = set()
    for text in requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None:
            found.add(requirement.name.lower())
    return found


def test_installing_the_provider_brings_no_moto_and_no_local_cloud():
    assert not {"moto", "ec2cluster-localcloud"} & runtime_requirements("airflow-ec2cluster")
    assert not LOCAL_ONLY & imported_top_levels(ROOT / "airflow_ec2cluster")


def test_the_worker_needs_boto3_only_and_never_airflow():
    assert runtime_requirements("ec2cluster-worker") == {"boto3"}
    assert not {"airflow", "moto", "airflow_ec2cluster", "ec2cluster_localcloud"} & imported_top_levels(
        ROOT / "worker" / "ec2cluster_worker"
    )


def test_the_local_cloud_stands_for_aws_and_needs_no_provider_to_run():
    # The demo drives Airflow and project.py sets up the project's identities from its `iam-policy`, but the
    # cloud itself (server, runner, metadata, IAM) must not import the provider.
    for path in (ROOT / "localcloud" / "ec2cluster_localcloud").rglob("*.py"):
        if path.name in {"demo.py", "deployment.py", "project.py"}:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("airflow"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("airflow") for a in node.names), path.name
