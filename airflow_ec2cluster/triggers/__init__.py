from __future__ import annotations

from airflow_ec2cluster.triggers.ec2cluster import QueueDrainedTrigger

__all__ = ["QueueDrainedTrigger"]
