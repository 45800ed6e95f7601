"""Operators of the EC2 cluster provider."""

from __future__ import annotations

from airflow_ec2cluster.operators.ec2cluster import (
    EC2ClusterEnqueueOperator,
    EC2ClusterLaunchOperator,
    EC2ClusterRedriveOperator,
    EC2ClusterTeardownOperator,
)

__all__ = [
    "EC2ClusterEnqueueOperator",
    "EC2ClusterLaunchOperator",
    "EC2ClusterRedriveOperator",
    "EC2ClusterTeardownOperator",
]
