"""The local cloud: a moto server plus an instance runner, so a whole cluster runs on one machine.

Importing this package changes nothing in moto: the SQS speed-up is applied only inside the server
process (``airflow_ec2cluster.localcloud.server``).
"""

from __future__ import annotations

from airflow_ec2cluster.localcloud.cloud import AMI_NAME, INSTANCE_PROFILE_NAME, LocalCloud, LocalCloudError

__all__ = ["AMI_NAME", "INSTANCE_PROFILE_NAME", "LocalCloud", "LocalCloudError"]
