"""Names, tags and the cluster descriptor: what identifies one cluster's resources in AWS.

Every resource of a cluster is named after, or tagged with, its cluster id, so any task (or a human with
the AWS console) can find the whole cluster again from the id alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_ec2cluster.defaults import DEFAULT_INSTANCE_PROFILE, DEFAULT_METADATA_HOP_LIMIT

MAX_CLUSTER_ID_LENGTH = 40
HASH_LENGTH = 10
CLUSTER_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")

TAG_CLUSTER_ID = "ec2cluster:cluster-id"
TAG_ROLE = "ec2cluster:role"
# On replacement instances: the launch's client token, so a re-run finds what a launch started.
TAG_LAUNCH_TOKEN = "ec2cluster:launch-token"
ROLE_WORKER = "worker"

# Markets (EC2's fleet lifecycles) and the launch's ``capacity`` choices.
ON_DEMAND = "on-demand"
SPOT = "spot"
SPOT_THEN_ON_DEMAND = "spot-then-on-demand"
CAPACITY_CHOICES = (ON_DEMAND, SPOT, SPOT_THEN_ON_DEMAND)

# Queue names start with the project's prefix, so that an IAM policy can name this project's queues (and
# no one else's) by pattern: ec2cluster-<cluster id>-tasks. 11 + 40 + 6 characters, within SQS's 80.
QUEUE_NAME_PREFIX = "ec2cluster-"
TASK_QUEUE_SUFFIX = "-tasks"
DEAD_LETTER_QUEUE_SUFFIX = "-dlq"
# The workers' CloudWatch Logs group: /ec2cluster/<cluster>, a stream per worker (its instance id).
LOG_GROUP_PREFIX = "/ec2cluster/"


def cluster_id_for(dag_id: str, run_id: str) -> str:
    """A deterministic cluster id for one DAG run: a readable slug of the DAG id plus a hash of both.

    The hash covers the exact DAG id and run id, so two runs (or two DAGs whose slugs collide after
    lowercasing and truncation) get different ids; the same run always gets the same id, which is what lets
    a retried task find the cluster its first try made.
    """
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}".encode()).hexdigest()[:HASH_LENGTH]
    slug = re.sub(r"[^a-z0-9]+", "-", dag_id.lower()).strip("-")
    slug = slug[: MAX_CLUSTER_ID_LENGTH - HASH_LENGTH - 1].rstrip("-") or "cluster"
    return f"{slug}-{digest}"


def validate_cluster_id(cluster_id: str) -> str:
    if not isinstance(cluster_id, str) or not CLUSTER_ID_RE.match(cluster_id):
        raise ValueError(
            f"cluster_id {cluster_id!r} is invalid: use 1-{MAX_CLUSTER_ID_LENGTH} lowercase letters, digits "
            "and '-', starting and ending with a letter or digit (or leave it unset to derive it from the "
            "DAG run with cluster_id_for)"
        )
    return cluster_id


def task_queue_name(cluster_id: str) -> str:
    return f"{QUEUE_NAME_PREFIX}{cluster_id}{TASK_QUEUE_SUFFIX}"


def dead_letter_queue_name(cluster_id: str) -> str:
    return f"{QUEUE_NAME_PREFIX}{cluster_id}{DEAD_LETTER_QUEUE_SUFFIX}"


def log_group_name(cluster_id: str) -> str:
    return f"{LOG_GROUP_PREFIX}{cluster_id}"


def cluster_prefix_for(dag_id: str) -> str:
    """The prefix of every cluster id cluster_id_for gives a DAG's runs (for policies scoped to one DAG)."""
    return cluster_id_for(dag_id, "")[:-HASH_LENGTH]


def cluster_security_group_name(cluster_id: str) -> str:
    """The security group a launch creates for the cluster when it is given none."""
    return f"{QUEUE_NAME_PREFIX}{cluster_id}"


def worker_name(cluster_id: str) -> str:
    return f"{cluster_id}-worker"


def cluster_tags(cluster_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Tags for instances and their volumes; the cluster's own keys win over user-supplied ones."""
    return {
        **(extra or {}),
        TAG_CLUSTER_ID: cluster_id,
        TAG_ROLE: ROLE_WORKER,
        "Name": worker_name(cluster_id),
    }


def launch_client_token(cluster_id: str, generation: int | None = None, count: int | None = None) -> str:
    """The RunInstances ClientToken (at most 64 ASCII characters): a retried call launches nothing new.

    The first launch uses ``<cluster>-launch``; replacement launch number ``generation`` of ``count``
    instances uses its own token, so a poke retried after RunInstances succeeded does not launch twice.
    """
    if generation is None:
        return f"{cluster_id}-launch"
    return f"{cluster_id}-r{generation}-n{count}"


@dataclass
class LaunchSpec:
    """What RunInstances needs to start one more worker exactly like the first ones."""

    image_id: str
    instance_type: str
    user_data_b64: str
    instance_profile: str | None = DEFAULT_INSTANCE_PROFILE
    # Launches spread over these (see subnet_for); empty: EC2 picks a default subnet.
    subnet_ids: list[str] = field(default_factory=list)
    security_group_ids: list[str] = field(default_factory=list)
    key_name: str | None = None
    spot: bool = False
    spot_max_price: str | None = None
    associate_public_ip: bool = False
    metadata_hop_limit: int = DEFAULT_METADATA_HOP_LIMIT
    root_device_name: str | None = None
    volume_size_gb: int | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    # Where the launch stored the cluster's bundle (airflow_ec2cluster.bundle): the teardown deletes it.
    bundle_bucket: str | None = None
    bundle_prefix: str | None = None
    # The fleet (airflow_ec2cluster.aws.fleet): every pool is one of these types in one of the subnets;
    # empty: ``instance_type`` alone.
    instance_types: list[str] = field(default_factory=list)
    # "on-demand", "spot", or "spot-then-on-demand" (on-demand for what spot could not start); a spec
    # recorded before capacity existed has only ``spot``.
    capacity: str | None = None
    on_demand_strategy: str = "lowest-price"
    spot_strategy: str = "price-capacity-optimized"
    # The launch template the fleet launches from (created by the launch, deleted by the teardown).
    launch_template_id: str | None = None
    # A launch that starts fewer workers than this (while the cluster has fewer) keeps none of them.
    min_workers: int = 1
    # Each subnet's availability zone (a pool's zone, for a worker that names only its zone).
    subnet_zones: dict[str, str] = field(default_factory=dict)
    # The CloudWatch Logs group the workers ship their lines to (made by the launch); None: no shipping.
    log_group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchSpec:
        known = {name for name in cls.__dataclass_fields__}
        fields = {key: value for key, value in data.items() if key in known}
        if data.get("subnet_id") and not fields.get("subnet_ids"):  # a spec recorded before subnet_ids
            fields["subnet_ids"] = [data["subnet_id"]]
        return cls(**fields)

    def types(self) -> list[str]:
        """The instance types a launch may use, in the order of preference given."""
        return list(self.instance_types) or [self.instance_type]

    def markets(self) -> list[str]:
        """The markets a launch tries, in order: spot first for "spot-then-on-demand"."""
        capacity = self.capacity or (SPOT if self.spot else ON_DEMAND)
        return [SPOT, ON_DEMAND] if capacity == SPOT_THEN_ON_DEMAND else [capacity]

    def subnet_for(self, client_token: str) -> str | None:
        """The subnet of one RunInstances call: spread over the subnets by the call's ClientToken, so that
        successive launches land in different zones while a retried call (same token) asks for the same
        subnet, as EC2's idempotency requires."""
        if not self.subnet_ids:
            return None
        digest = hashlib.sha256(client_token.encode()).digest()
        return self.subnet_ids[int.from_bytes(digest[:4], "big") % len(self.subnet_ids)]


@dataclass
class ClusterDescriptor:
    """One cluster, as passed between tasks through XCom (``to_dict``/``from_dict`` are JSON-safe)."""

    cluster_id: str
    region: str
    queue_url: str
    dlq_url: str
    state_table: str
    instance_ids: list[str]
    launch_time: float
    num_workers: int
    launch_spec: LaunchSpec

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["launch_spec"] = self.launch_spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterDescriptor:
        return cls(
            cluster_id=data["cluster_id"],
            region=data["region"],
            queue_url=data["queue_url"],
            dlq_url=data["dlq_url"],
            state_table=data["state_table"],
            instance_ids=list(data["instance_ids"]),
            launch_time=float(data["launch_time"]),
            num_workers=int(data["num_workers"]),
            launch_spec=LaunchSpec.from_dict(data["launch_spec"]),
        )


def cluster_id_from_context(explicit: str | None, context: Any) -> str:
    """The operator's ``cluster_id`` when given, else :func:`cluster_id_for` of the running DAG run."""
    if explicit:
        return validate_cluster_id(explicit)
    ti = context.get("ti")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
    run_id = context.get("run_id") or getattr(context.get("dag_run"), "run_id", None)
    if not dag_id or not run_id:
        raise ValueError("cluster_id is not set and the task context has no dag_id/run_id to derive it from")
    return cluster_id_for(dag_id, run_id)
