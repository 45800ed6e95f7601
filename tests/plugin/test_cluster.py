"""Cluster ids, names and the descriptor."""

from __future__ import annotations

import pytest

from airflow_ec2cluster.cluster import (
    MAX_CLUSTER_ID_LENGTH,
    ClusterDescriptor,
    LaunchSpec,
    cluster_id_for,
    cluster_tags,
    dead_letter_queue_name,
    task_queue_name,
    validate_cluster_id,
)


@pytest.mark.parametrize(
    ("dag_id", "run_id"),
    [
        ("ec2_cluster_example", "manual__2024-01-01T00:00:00+00:00"),
        ("A" * 250, "scheduled__2024"),
        ("___", "x"),
        ("Ünïcode.DAG", "r"),
    ],
)
def test_cluster_id_is_safe_short_and_deterministic(dag_id, run_id):
    cid = cluster_id_for(dag_id, run_id)
    assert len(cid) <= MAX_CLUSTER_ID_LENGTH
    assert validate_cluster_id(cid) == cid
    assert cid == cluster_id_for(dag_id, run_id)
    assert len(task_queue_name(cid)) <= 80 and len(dead_letter_queue_name(cid)) <= 80


def test_cluster_ids_differ_when_slugs_collide():
    assert cluster_id_for("my_dag", "run1") != cluster_id_for("my-dag", "run1")
    assert cluster_id_for("my_dag", "run1") != cluster_id_for("my_dag", "run2")
    assert cluster_id_for("my_dag", "run1").startswith("my-dag-")


@pytest.mark.parametrize("bad", ["", "UPPER", "-lead", "trail-", "a" * 41, "under_score"])
def test_invalid_cluster_ids_are_refused(bad):
    with pytest.raises(ValueError, match="cluster_id"):
        validate_cluster_id(bad)


def test_tags_keep_cluster_keys():
    tags = cluster_tags("c1", {"ec2cluster:cluster-id": "spoof", "team": "x"})
    assert tags["ec2cluster:cluster-id"] == "c1" and tags["team"] == "x" and tags["Name"] == "c1-worker"


def test_descriptor_round_trip():
    spec = LaunchSpec(
        image_id="ami-1", instance_type="t3.micro", user_data_b64="eA==", security_group_ids=["sg-1"]
    )
    descriptor = ClusterDescriptor("c1", "us-east-1", "q", "d", "tbl", ["i-1"], 12.5, 1, spec)
    assert ClusterDescriptor.from_dict(descriptor.to_dict()) == descriptor
