"""The worker's code as one zip, for instances to fetch from the cluster's state table at boot.

The worker's source (about 85 KB, 22 KB gzipped) does not fit in EC2's 16 KB of user data, so the launch
stores it as a binary attribute of one item in the state table the cluster already uses, and the user data
carries only a loader, the configuration and the bundle's SHA-256. Nothing new to provision: the instance
profile already reaches that table.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import ec2cluster_worker
from ec2cluster_worker import records

WORKER_SK = "WORKER"
BUNDLE_ATTRIBUTE = "bundle"
# A fixed timestamp makes the zip (and so its SHA-256) depend on the source alone.
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
# DynamoDB items are at most 400 KB; leave room for the key and attribute names.
MAX_BUNDLE_BYTES = 390_000


@dataclass(frozen=True)
class WorkerBundle:
    data: bytes
    sha256: str


def worker_source_files() -> list[Path]:
    package_dir = Path(ec2cluster_worker.__file__).resolve().parent
    return sorted(package_dir.glob("*.py"))


def build_worker_bundle() -> WorkerBundle:
    """A deterministic zip of the ``ec2cluster_worker`` package (paths ``ec2cluster_worker/<file>.py``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in worker_source_files():
            info = zipfile.ZipInfo(f"ec2cluster_worker/{path.name}", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(
            f"the worker bundle is {len(data)} bytes, over the {MAX_BUNDLE_BYTES} a DynamoDB item holds; "
            "install the worker from a pip spec instead (worker_source='pip:ec2cluster-worker==...')"
        )
    return WorkerBundle(data=data, sha256=hashlib.sha256(data).hexdigest())


def bundle_key(cluster_id: str) -> dict[str, str]:
    """The state-table key of the cluster's worker bundle item."""
    return {records.PK: records.cluster_pk(cluster_id), records.SK: WORKER_SK}
