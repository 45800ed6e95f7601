"""The local cloud: a moto server plus an instance runner, so a whole cluster runs on one machine.

Importing this package changes nothing in moto: the SQS speed-up is applied only inside the server
process (``ec2cluster_localcloud.server``).
"""

from __future__ import annotations

from ec2cluster_localcloud.cloud import AMI_NAME, INSTANCE_PROFILE_NAME, LocalCloud, LocalCloudError

__all__ = ["AMI_NAME", "INSTANCE_PROFILE_NAME", "LocalCloud", "LocalCloudError"]
