"""QueueDrainedSensor: wait for the cluster's queue to drain, looking after the workers meanwhile."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.sensors.base_aws import AwsBaseSensor
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.providers.common.compat.sdk import AirflowFailException, PokeReturnValue
from ec2cluster_worker import records

from airflow_ec2cluster.cluster import (
    DEFAULT_STATE_TABLE,
    META_CONSECUTIVE_EMPTY,
    META_DLQ_URL,
    META_ENQUEUE_COMPLETE,
    META_ENQUEUED,
    META_INSTANCE_IDS,
    META_LAUNCH_SPEC,
    META_LAUNCHED_AT,
    META_LOG_SHARDS,
    META_NUM_WORKERS,
    META_QUEUE_URL,
    META_REAPED,
    META_REPLACEMENT_GENERATION,
    META_REPLACEMENTS,
    LaunchSpec,
    cluster_id_from_context,
    launch_client_token,
)
from airflow_ec2cluster.decisions import (
    Decision,
    InstanceInfo,
    Policy,
    Snapshot,
    WorkerStatus,
    decide,
)
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

if TYPE_CHECKING:
    from airflow.sdk import Context


class QueueDrainedSensor(AwsBaseSensor[EC2ClusterHook]):
    """Succeed when the cluster's queue is drained; reap stuck workers and replace them meanwhile.

    Each poke makes the same handful of calls whatever the number of tasks: the META item (GetItem), queue
    and dead-letter counts (two GetQueueAttributes), the cluster's instances (DescribeInstances by tag), the
    worker status items (one Query); then :func:`airflow_ec2cluster.decisions.decide`, TerminateInstances for
    reaped workers, one RunInstances for replacements, one UpdateItem of the META item, and a progress line.
    Only at the end, when the queue has read empty ``drained_checks`` times and the workers' counters fall
    short of the enqueued count, is the task log counted exactly (see ``decisions``). Everything the sensor
    remembers between pokes lives in the META item, so reschedule mode and retries work.

    Reaping: a worker idle longer than ``idle_timeout``, silent longer than ``heartbeat_timeout``, busy on one
    task longer than ``max_task_seconds``, an instance with no status ``boot_timeout`` after launch, a worker
    that reported itself stopped while its instance still runs, and an instance stopped in EC2. While work
    remains (in-flight messages count) and ``replace_reaped`` is on, missing workers are replaced up to the
    cluster size (``cluster_size``, default the launched count), at most ``max_replacements`` over the job
    (default twice the cluster size). The sensor fails at once (no retry) when work remains and no worker can
    run it.

    Returns (XCom) ``{cluster_id, enqueued, tasks_done, tasks_failed, dead_lettered, dead_lettered_task_ids,
    workers_used, instance_seconds, replacements_launched, reaped, elapsed_seconds, counts_exact}``.
    ``tasks_done``/``tasks_failed`` are distinct task ids in the task log when ``exact_summary`` (one count at
    the end), else the workers' counters.
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields(
        "cluster_id",
        "state_table",
        "idle_timeout",
        "heartbeat_timeout",
        "max_task_seconds",
        "boot_timeout",
        "drained_checks",
        "cluster_size",
        "max_replacements",
    )
    ui_color = "#b3e5fc"

    def __init__(
        self,
        *,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        idle_timeout: float = 600,
        heartbeat_timeout: float = 120,
        max_task_seconds: float = 3600,
        boot_timeout: float = 600,
        drained_checks: int = 3,
        replace_reaped: bool = True,
        cluster_size: int | None = None,
        max_replacements: int | None = None,
        dead_letter_sample: int = 100,
        exact_summary: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.idle_timeout = idle_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.max_task_seconds = max_task_seconds
        self.boot_timeout = boot_timeout
        self.drained_checks = drained_checks
        self.replace_reaped = replace_reaped
        self.cluster_size = cluster_size
        self.max_replacements = max_replacements
        self.dead_letter_sample = dead_letter_sample
        self.exact_summary = exact_summary

    def poke(self, context: Context) -> bool | PokeReturnValue:
        try:
            cluster_id = cluster_id_from_context(self.cluster_id, context)
        except ValueError as error:
            raise AirflowFailException(str(error)) from error
        hook = self.hook
        meta = hook.get_meta(self.state_table, cluster_id)
        if not meta or not meta.get(META_QUEUE_URL):
            raise AirflowFailException(
                f"cluster {cluster_id} has no META item in {self.state_table}: run the enqueue and launch "
                "operators with the same cluster_id and state_table first"
            )
        shards = int(meta.get(META_LOG_SHARDS) or records.DEFAULT_LOG_SHARDS)
        snapshot = self.snapshot(hook, cluster_id, meta)
        decision = decide(snapshot)
        if decision.needs_exact_count:
            exact = hook.count_task_log(self.state_table, cluster_id, shards)
            self.log.info("Queue empty; exact task-log count: %s", exact)
            snapshot = replace(snapshot, exact_finished=sum(exact.values()))
            decision = decide(snapshot)

        for reap in decision.reap:
            self.log.warning("Reaping %s: %s (%s)", reap.instance_id, reap.reason, reap.detail)
        if decision.reap:
            hook.terminate_instances([r.instance_id for r in decision.reap], wait=False)
        launched = self.launch_replacements(hook, cluster_id, meta, decision)
        self.record(hook, cluster_id, meta, decision, launched)
        self.log.info("Cluster %s: %s", cluster_id, decision.progress)

        if decision.failure:
            raise AirflowFailException(f"cluster {cluster_id}: {decision.failure}")
        if not decision.drained:
            return False
        summary = self.summary(hook, cluster_id, meta, snapshot, shards)
        self.log.info("Cluster %s drained: %s", cluster_id, json.dumps(summary))
        return PokeReturnValue(is_done=True, xcom_value=summary)

    def policy(self, meta: dict[str, Any]) -> Policy:
        size = self.cluster_size if self.cluster_size is not None else meta.get(META_NUM_WORKERS) or 0
        return Policy(
            idle_timeout=float(self.idle_timeout),
            heartbeat_timeout=float(self.heartbeat_timeout),
            max_task_seconds=float(self.max_task_seconds),
            boot_timeout=float(self.boot_timeout),
            drained_checks=int(self.drained_checks),
            cluster_size=int(size),
            replace_reaped=bool(self.replace_reaped) and bool(meta.get(META_LAUNCH_SPEC)),
            max_replacements=None if self.max_replacements is None else int(self.max_replacements),
        )

    def snapshot(self, hook: EC2ClusterHook, cluster_id: str, meta: dict[str, Any]) -> Snapshot:
        counts = hook.queue_counts(meta[META_QUEUE_URL], meta[META_DLQ_URL])
        instances = tuple(
            InstanceInfo(i["InstanceId"], i["State"]["Name"], i["LaunchTime"].timestamp())
            for i in hook.list_cluster_instances(cluster_id)
        )
        workers = tuple(
            WorkerStatus.from_item(item) for item in hook.worker_statuses(self.state_table, cluster_id)
        )
        enqueued = meta.get(META_ENQUEUED)
        return Snapshot(
            counts=counts,
            instances=instances,
            workers=workers,
            now=time.time(),
            policy=self.policy(meta),
            enqueued=None if enqueued is None else int(enqueued),
            enqueue_complete=bool(meta.get(META_ENQUEUE_COMPLETE, enqueued is None)),
            consecutive_empty=int(meta.get(META_CONSECUTIVE_EMPTY) or 0),
            replacements_launched=int(meta.get(META_REPLACEMENTS) or 0),
            reaped_total=int(meta.get(META_REAPED) or 0),
            started_at=meta.get(META_LAUNCHED_AT),
        )

    def launch_replacements(
        self, hook: EC2ClusterHook, cluster_id: str, meta: dict[str, Any], decision: Decision
    ) -> list[str]:
        if decision.launch <= 0 or decision.failure:
            return []
        generation = int(meta.get(META_REPLACEMENT_GENERATION) or 0)
        spec = LaunchSpec.from_dict(json.loads(meta[META_LAUNCH_SPEC]))
        instances = hook.run_instances(
            cluster_id=cluster_id,
            spec=spec,
            count=decision.launch,
            client_token=launch_client_token(cluster_id, generation, decision.launch),
        )
        ids = [i["InstanceId"] for i in instances]
        self.log.info("Launched %d replacement(s): %s", len(ids), ", ".join(ids))
        return ids

    def record(
        self,
        hook: EC2ClusterHook,
        cluster_id: str,
        meta: dict[str, Any],
        decision: Decision,
        launched: list[str],
    ) -> None:
        """Write what the next poke must know to the META item, in one UpdateItem (none when unchanged)."""
        set_values: dict[str, Any] = {}
        add_values: dict[str, int] = {}
        if decision.consecutive_empty != int(meta.get(META_CONSECUTIVE_EMPTY) or 0):
            set_values[META_CONSECUTIVE_EMPTY] = decision.consecutive_empty
        if decision.reap:
            add_values[META_REAPED] = len(decision.reap)
        if launched:
            set_values[META_INSTANCE_IDS] = [*(meta.get(META_INSTANCE_IDS) or []), *launched]
            add_values[META_REPLACEMENTS] = len(launched)
            add_values[META_REPLACEMENT_GENERATION] = 1
        if set_values or add_values:
            hook.update_meta(self.state_table, cluster_id, set_values=set_values, add_values=add_values)

    def summary(
        self, hook: EC2ClusterHook, cluster_id: str, meta: dict[str, Any], snapshot: Snapshot, shards: int
    ) -> dict[str, Any]:
        if self.exact_summary:
            exact = hook.count_task_log(self.state_table, cluster_id, shards)
            done, failed = exact.get(records.TASK_DONE, 0), exact.get(records.TASK_FAILED, 0)
        else:
            done = sum(w.tasks_done for w in snapshot.workers)
            failed = sum(w.tasks_failed for w in snapshot.workers)
        dead_ids = (
            hook.peek_dead_letters(meta[META_DLQ_URL], self.dead_letter_sample)
            if snapshot.counts.dead_lettered
            else []
        )
        launched = set(meta.get(META_INSTANCE_IDS) or []) | {w.worker_id for w in snapshot.workers}
        started_at = snapshot.started_at
        return {
            "cluster_id": cluster_id,
            "enqueued": snapshot.enqueued,
            "tasks_done": done,
            "tasks_failed": failed,
            "dead_lettered": snapshot.counts.dead_lettered,
            "dead_lettered_task_ids": dead_ids,
            "workers_used": len(launched),
            "instance_seconds": instance_seconds(snapshot),
            "replacements_launched": snapshot.replacements_launched,
            "reaped": snapshot.reaped_total,
            "elapsed_seconds": None if not started_at else round(snapshot.now - started_at, 1),
            "counts_exact": bool(self.exact_summary),
        }


def instance_seconds(snapshot: Snapshot) -> float:
    """Approximate instance time: per instance from launch (or the worker's start) to now or its last beat.

    Live instances count from their EC2 launch time to now; instances already gone count from their
    worker's start to its last heartbeat (their boot time and final seconds are not recorded anywhere).
    """
    live = {i.instance_id: i for i in snapshot.instances}
    total = sum(snapshot.now - i.launch_time for i in live.values())
    total += sum(max(0.0, w.heartbeat_at - w.started_at) for w in snapshot.workers if w.worker_id not in live)
    return round(total, 1)
