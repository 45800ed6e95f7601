"""The cluster's META item (pk = C#<cluster>, sk = META): its typed record, and every request on it.

Everything the controller remembers about a cluster between tasks and pokes is in this one DynamoDB item:
the queues and the enqueue's resume point (enqueue operator), the launch spec and the instances (launch
operator), the drain's counters and a replacement launch in progress (sensor / trigger), the teardown. This
module is the only one that knows the item's attribute names: readers get a :class:`ClusterMeta`, writers
describe a change with a :class:`MetaUpdate`, and the requests (GetItem, UpdateItem, the conditional
writes of a replacement launch) are built here, for the hook and AsyncClusterIO alike.

The attribute names are the field names of :class:`ClusterMeta` (``tests/plugin/test_meta.py`` checks that
no other module of the provider spells one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ec2cluster_worker import records

from airflow_ec2cluster.aws.dynamodb import deserialize_item, serialize_item
from airflow_ec2cluster.cluster import ClusterDescriptor, LaunchSpec
from airflow_ec2cluster.defaults import DEFAULT_LOG_SHARDS, DEFAULT_RETENTION_SECONDS

# Written by every UpdateItem: the item's cluster id, and its first write's time (kept afterwards).
CLUSTER_ID = "cluster_id"
CREATED_AT = "created_at"
# Counted by the ADD of a round that reaped instances.
REAPED_TOTAL = "reaped_total"
# Written only by the conditional updates of a replacement launch.
PENDING_LAUNCH = "pending_launch"
REPLACEMENT_GENERATION = "replacement_generation"
REPLACEMENTS_LAUNCHED = "replacements_launched"
INSTANCE_IDS = "instance_ids"
# The launch generation a launch try starts (conditional on the one it read).
LAUNCH_GENERATION = "launch_generation"


@dataclass(frozen=True)
class PendingLaunch:
    """A replacement launch claimed and not yet recorded: launch ``generation`` of ``count`` instances."""

    generation: int
    count: int
    token: str  # the RunInstances ClientToken, also tagged on the instances it starts

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "count": self.count, "token": self.token}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingLaunch:
        return cls(generation=int(data["generation"]), count=int(data["count"]), token=str(data["token"]))


@dataclass(frozen=True)
class ClusterMeta:
    """The META item as read: one field per attribute; an attribute not (yet) written has the default.

    Written by the enqueue: ``queue_url`` .. ``enqueue_complete``. By the launch: ``region`` ..
    ``launched_at`` (and the queues again). By the drain: ``consecutive_empty`` .. ``pending_launch``. By the
    teardown: ``torn_down_at``, ``terminated_at_teardown``. By every write: ``cluster_id``, ``created_at``
    (the first write's time) and ``expires_at`` (the TTL, refreshed).
    """

    cluster_id: str = ""
    region: str | None = None
    queue_url: str | None = None
    dlq_url: str | None = None
    enqueued: int | None = None  # tasks
    enqueued_messages: int | None = None  # messages (one task or a group each): the resume point
    tasks_per_message: int | None = None
    enqueue_complete: bool | None = None
    num_workers: int | None = None
    log_shards: int = DEFAULT_LOG_SHARDS
    launch_spec: LaunchSpec | None = None  # stored as JSON text
    instance_ids: list[str] = field(default_factory=list)  # every instance ever launched for the cluster
    launched_at: float | None = None
    # Launch generations: each run of the launch operator that finds no live instance starts one (a re-run
    # after a fix); ``launch_generation`` is the one started (claimed before RunInstances, with its
    # ``launch_count``), ``launched_generation`` the one whose instances are recorded. 0: none yet (a META
    # item of an older version with a launch spec reads as generation 1: see ``current_generation``).
    launch_generation: int = 0
    launched_generation: int = 0
    launch_count: int | None = None
    # Instances of the generations before the current one: their workers' stops are history, not a
    # reason to stop the current generation early.
    retired_instance_ids: list[str] = field(default_factory=list)
    # Workers whose stop (and its reason) a drain round has already logged: each is logged once.
    stops_reported: list[str] = field(default_factory=list)
    # Instances that ended (or were reaped) without ever writing a status item: instance id -> {"at": when a
    # round saw it, "reason": the start-up failure its console named ("" when none), "console": its last
    # lines}. Each console is read once.
    boot_failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    consecutive_empty: int = 0
    replacements_launched: int = 0
    replacement_generation: int = 0
    reaped_total: int = 0
    # The highest finished-task count a round reported (from an exact count): progress never goes back.
    progress_finished: int = 0
    pending_launch: PendingLaunch | None = None
    # The cluster's ceiling for the drain's launches (the launch's max_workers; None: num_workers).
    max_workers: int | None = None
    # Launches and capacity (airflow_ec2cluster.capacity): the last launches ({"at", "requested",
    # "launched", "pools", "released", "errors"}), "pool: error code" -> launches that met it, launches
    # short of what they asked in a row and when the last one was, and since when launches have failed
    # while the cluster had no worker (0: they have not).
    launch_history: list[dict[str, Any]] = field(default_factory=list)
    launch_errors_total: dict[str, int] = field(default_factory=dict)
    launch_failures: int = 0
    launch_failed_at: float = 0.0
    capacity_wait_since: float = 0.0
    # Cost (airflow_ec2cluster.cost): the launch's cap on the estimate (USD; None: none), each ended
    # instance's billed time as EC2 stated it (instance id -> InstanceUsage.to_dict(); EC2 forgets a
    # terminated instance within the hour), and the spot prices looked up ("type/zone" -> {"price", "at"}).
    max_cost: float | None = None
    instance_usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    spot_prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The drain's reading of failed tasks in the workers' log group (aws.logs.LogCursor): from this time
    # (ms) on, less the events already shown (event id -> their time), and how many it has shown.
    logs_read_from: int = 0
    logs_shown: dict[str, int] = field(default_factory=dict)
    logs_failures_shown: int = 0
    torn_down_at: float | None = None
    terminated_at_teardown: list[str] = field(default_factory=list)
    created_at: float | None = None
    expires_at: int | None = None

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> ClusterMeta:
        """From the item with plain values (:func:`~airflow_ec2cluster.aws.dynamodb.deserialize_item`)."""

        def number(name: str, kind: type = int) -> Any:
            value = item.get(name)
            return None if value is None else kind(value)

        spec = item.get("launch_spec")
        pending = item.get(PENDING_LAUNCH)
        return cls(
            cluster_id=str(item.get(CLUSTER_ID) or ""),
            region=item.get("region"),
            queue_url=item.get("queue_url"),
            dlq_url=item.get("dlq_url"),
            enqueued=number("enqueued"),
            enqueued_messages=number("enqueued_messages"),
            tasks_per_message=number("tasks_per_message"),
            enqueue_complete=None if item.get("enqueue_complete") is None else bool(item["enqueue_complete"]),
            num_workers=number("num_workers"),
            log_shards=int(item.get("log_shards") or DEFAULT_LOG_SHARDS),
            launch_spec=LaunchSpec.from_dict(json.loads(spec)) if spec else None,
            instance_ids=list(item.get(INSTANCE_IDS) or []),
            launched_at=number("launched_at", float),
            launch_generation=int(item.get(LAUNCH_GENERATION) or 0),
            launched_generation=int(item.get("launched_generation") or 0),
            launch_count=number("launch_count"),
            retired_instance_ids=list(item.get("retired_instance_ids") or []),
            stops_reported=list(item.get("stops_reported") or []),
            boot_failures={
                str(iid): {
                    "at": float(v.get("at") or 0),
                    "reason": str(v.get("reason") or ""),
                    "console": [str(line) for line in v.get("console") or []],
                }
                for iid, v in dict(item.get("boot_failures") or {}).items()
            },
            consecutive_empty=int(item.get("consecutive_empty") or 0),
            replacements_launched=int(item.get(REPLACEMENTS_LAUNCHED) or 0),
            replacement_generation=int(item.get(REPLACEMENT_GENERATION) or 0),
            reaped_total=int(item.get(REAPED_TOTAL) or 0),
            progress_finished=int(item.get("progress_finished") or 0),
            pending_launch=PendingLaunch.from_dict(pending) if pending else None,
            max_workers=number("max_workers"),
            launch_history=[dict(entry) for entry in item.get("launch_history") or []],
            launch_errors_total={
                str(k): int(v) for k, v in dict(item.get("launch_errors_total") or {}).items()
            },
            launch_failures=int(item.get("launch_failures") or 0),
            launch_failed_at=float(item.get("launch_failed_at") or 0.0),
            capacity_wait_since=float(item.get("capacity_wait_since") or 0.0),
            max_cost=number("max_cost", float) or None,  # 0: a launch without a cap
            instance_usage={str(k): dict(v) for k, v in dict(item.get("instance_usage") or {}).items()},
            spot_prices={
                str(k): {
                    "price": None if v.get("price") is None else float(v["price"]),
                    "at": float(v.get("at") or 0.0),
                }
                for k, v in dict(item.get("spot_prices") or {}).items()
            },
            logs_read_from=int(item.get("logs_read_from") or 0),
            logs_shown={str(k): int(v) for k, v in dict(item.get("logs_shown") or {}).items()},
            logs_failures_shown=int(item.get("logs_failures_shown") or 0),
            torn_down_at=number("torn_down_at", float),
            terminated_at_teardown=list(item.get("terminated_at_teardown") or []),
            created_at=number(CREATED_AT, float),
            expires_at=number(records.TTL_ATTRIBUTE),
        )

    @property
    def current_generation(self) -> int:
        """The launch generation last started (an older version's launch, with its spec, is generation 1)."""
        return self.launch_generation or (1 if self.launch_spec is not None else 0)

    @property
    def recorded_generation(self) -> int:
        """The launch generation whose instances are recorded (an older version's: 1 once ids are)."""
        return self.launched_generation or (1 if self.instance_ids else 0)

    @property
    def enqueue_finished(self) -> bool:
        """Whether the enqueue finished (a META item no enqueue wrote counts as finished)."""
        return self.enqueue_complete if self.enqueue_complete is not None else self.enqueued is None

    def descriptor(self, state_table: str) -> ClusterDescriptor:
        """The descriptor of the launched cluster (the launch operator's XCom)."""
        if self.launch_spec is None:
            raise ValueError(f"cluster {self.cluster_id} has no launch record in its META item")
        return ClusterDescriptor(
            cluster_id=self.cluster_id,
            region=str(self.region),
            queue_url=str(self.queue_url),
            dlq_url=str(self.dlq_url),
            state_table=state_table,
            instance_ids=list(self.instance_ids),
            launch_time=float(self.launched_at or 0.0),
            num_workers=int(self.num_workers or 0),
            launch_spec=self.launch_spec,
        )


@dataclass(frozen=True)
class MetaUpdate:
    """One UpdateItem of the META item: the fields to SET (None: left as they are) and the counters to ADD.

    The field names are :class:`ClusterMeta`'s; the order of the fields is the order of the SET clauses.
    """

    region: str | None = None
    queue_url: str | None = None
    dlq_url: str | None = None
    enqueued: int | None = None
    enqueued_messages: int | None = None
    tasks_per_message: int | None = None
    enqueue_complete: bool | None = None
    num_workers: int | None = None
    log_shards: int | None = None
    launch_spec: LaunchSpec | None = None
    instance_ids: list[str] | None = None
    launched_at: float | None = None
    launch_generation: int | None = None
    launched_generation: int | None = None
    launch_count: int | None = None
    retired_instance_ids: list[str] | None = None
    stops_reported: list[str] | None = None
    boot_failures: dict[str, dict[str, Any]] | None = None
    consecutive_empty: int | None = None
    # SET to 0 by a new launch generation: a fresh replacement budget (claims ADD to it).
    replacements_launched: int | None = None
    progress_finished: int | None = None
    max_workers: int | None = None
    launch_history: list[dict[str, Any]] | None = None
    launch_errors_total: dict[str, int] | None = None
    launch_failures: int | None = None
    launch_failed_at: float | None = None
    capacity_wait_since: float | None = None
    max_cost: float | None = None  # 0: no cap (a launch generation's arguments replace the last one's)
    instance_usage: dict[str, dict[str, Any]] | None = None
    spot_prices: dict[str, dict[str, Any]] | None = None
    logs_read_from: int | None = None
    logs_shown: dict[str, int] | None = None
    logs_failures_shown: int | None = None
    torn_down_at: float | None = None
    terminated_at_teardown: list[str] | None = None
    # ADD to reaped_total.
    add_reaped: int = 0

    def __bool__(self) -> bool:
        return bool(self.set_values() or self.add_values())

    def set_values(self) -> dict[str, Any]:
        """Attribute -> value to SET, as stored (the launch spec as JSON text)."""
        values = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "add_reaped" or value is None:
                continue
            values[spec.name] = json.dumps(value.to_dict()) if isinstance(value, LaunchSpec) else value
        return values

    def add_values(self) -> dict[str, int]:
        return {REAPED_TOTAL: self.add_reaped} if self.add_reaped else {}


# -- requests ----------------------------------------------------------------------------------------------


def meta_key(cluster_id: str) -> dict[str, Any]:
    return serialize_item({records.PK: records.cluster_pk(cluster_id), records.SK: records.META_SK})


def get_meta_params(table: str, cluster_id: str) -> dict[str, Any]:
    """GetItem arguments: the META item, strongly consistent."""
    return {"TableName": table, "Key": meta_key(cluster_id), "ConsistentRead": True}


def update_meta_params(
    table: str, cluster_id: str, update: MetaUpdate, retention_seconds: int = DEFAULT_RETENTION_SECONDS
) -> dict[str, Any]:
    """UpdateItem arguments: SET and ADD ``update``, keep ``created_at``, refresh the TTL; the item after."""
    now = time.time()
    set_values = {
        CLUSTER_ID: cluster_id,
        records.TTL_ATTRIBUTE: int(now + retention_seconds),
        **update.set_values(),
    }
    names: dict[str, str] = {"#created": CREATED_AT}
    values: dict[str, Any] = {":created": now}
    set_parts, add_parts = [], []
    for index, (key, value) in enumerate(set_values.items()):
        names[f"#s{index}"] = key
        values[f":s{index}"] = value
        set_parts.append(f"#s{index} = :s{index}")
    set_parts.append("#created = if_not_exists(#created, :created)")
    for index, (key, value) in enumerate(update.add_values().items()):
        names[f"#a{index}"] = key
        values[f":a{index}"] = value
        add_parts.append(f"#a{index} :a{index}")
    expression = "SET " + ", ".join(set_parts)
    if add_parts:
        expression += " ADD " + ", ".join(add_parts)
    return {
        "TableName": table,
        "Key": meta_key(cluster_id),
        "UpdateExpression": expression,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": serialize_item(values),
        "ReturnValues": "ALL_NEW",
    }


def start_generation_params(
    table: str,
    cluster_id: str,
    read_generation: int,
    update: MetaUpdate,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
) -> dict[str, Any]:
    """UpdateItem arguments that start a launch generation: ``update`` (which sets the new generation), only
    if the item still holds generation ``read_generation`` (two launch tries cannot both start the next),
    and drop a replacement launch an earlier generation claimed and never recorded."""
    params = update_meta_params(table, cluster_id, update, retention_seconds)
    params["UpdateExpression"] += " REMOVE #pending"
    params["ConditionExpression"] = "attribute_not_exists(#gen) OR #gen = :read_gen"
    params["ExpressionAttributeNames"].update({"#pending": PENDING_LAUNCH, "#gen": LAUNCH_GENERATION})
    params["ExpressionAttributeValues"].update(serialize_item({":read_gen": read_generation}))
    return params


def claim_launch_params(table: str, cluster_id: str, pending: PendingLaunch) -> dict[str, Any]:
    """One conditional UpdateItem: only the round that read generation ``pending.generation``, with no launch
    pending, may record the intent; it counts the replacements against the budget at once."""
    return {
        "TableName": table,
        "Key": meta_key(cluster_id),
        "UpdateExpression": "SET #p = :p ADD #g :one, #r :n",
        "ConditionExpression": "attribute_not_exists(#p) AND (attribute_not_exists(#g) OR #g = :g)",
        "ExpressionAttributeNames": {
            "#p": PENDING_LAUNCH,
            "#g": REPLACEMENT_GENERATION,
            "#r": REPLACEMENTS_LAUNCHED,
        },
        "ExpressionAttributeValues": serialize_item(
            {
                ":p": pending.to_dict(),
                ":one": 1,
                ":n": pending.count,
                ":g": pending.generation,
            }
        ),
    }


def finish_launch_params(
    table: str,
    cluster_id: str,
    generation: int,
    instance_ids: list[str],
    update: MetaUpdate | None = None,
    refund: int = 0,
) -> dict[str, Any]:
    """Conditional UpdateItem, if generation's launch is pending: append the launched ids, clear the
    intent, SET ``update`` (the launch's outcome) and give back to the replacement budget the ``refund``
    instances the claim counted and EC2 did not start."""
    names = {"#ids": INSTANCE_IDS, "#p": PENDING_LAUNCH, "#gen": "generation"}
    values: dict[str, Any] = {":empty": [], ":ids": list(instance_ids), ":g": generation}
    sets = ["#ids = list_append(if_not_exists(#ids, :empty), :ids)"]
    for index, (key, value) in enumerate((update.set_values() if update else {}).items()):
        names[f"#s{index}"] = key
        values[f":s{index}"] = value
        sets.append(f"#s{index} = :s{index}")
    expression = "SET " + ", ".join(sets) + " REMOVE #p"
    if refund:
        names["#r"] = REPLACEMENTS_LAUNCHED
        values[":refund"] = -int(refund)
        expression += " ADD #r :refund"
    return {
        "TableName": table,
        "Key": meta_key(cluster_id),
        "UpdateExpression": expression,
        "ConditionExpression": "#p.#gen = :g",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": serialize_item(values),
    }


def meta_of(raw: dict[str, Any] | None) -> ClusterMeta | None:
    """The record in a GetItem (``Item``) or UpdateItem (``Attributes``) answer; None without an item."""
    return ClusterMeta.from_item(deserialize_item(raw)) if raw else None
