"""Operators of the EC2 cluster provider, one module each."""

from __future__ import annotations

from airflow_ec2cluster.operators.enqueue import EC2ClusterEnqueueOperator
from airflow_ec2cluster.operators.launch import EC2ClusterLaunchOperator
from airflow_ec2cluster.operators.redrive import EC2ClusterRedriveOperator
from airflow_ec2cluster.operators.teardown import EC2ClusterTeardownOperator

__all__ = [
    "EC2ClusterEnqueueOperator",
    "EC2ClusterLaunchOperator",
    "EC2ClusterRedriveOperator",
    "EC2ClusterTeardownOperator",
]
