"""Sensors of the EC2 cluster provider."""

from __future__ import annotations

from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor

__all__ = ["QueueDrainedSensor"]
