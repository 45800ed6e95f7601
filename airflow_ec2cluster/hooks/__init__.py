"""Hooks of the EC2 cluster provider."""

from __future__ import annotations

from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

__all__ = ["EC2ClusterHook"]
