"""One drain round (read -> decide -> act), written once for the sync sensor and the async trigger.

``drain_round`` is a generator: it yields each AWS call it needs as a :class:`Call` (a method name of
:class:`~airflow_ec2cluster.hooks.ec2cluster.EC2ClusterHook` /
:class:`~airflow_ec2cluster.hooks.async_io.AsyncClusterIO` and its arguments) and is sent the result.
``run_sync`` drives it with the hook (a poke); ``run_async`` awaits the same calls on aiobotocore clients
(the trigger). So both paths share the snapshot, :func:`decide`, the acting and the summary, and differ only
in how a call is made (both build their requests with the same builders: ``tests/plugin/test_io_parity.py``).
The cluster's state between rounds is its META item, read as a :class:`~airflow_ec2cluster.meta.ClusterMeta`.

Acting is safe to repeat (a triggerer restart, two triggerers, a poke retried): terminating is idempotent,
and a replacement launch is first *claimed* in the META item with a conditional write (only the round that
read the current replacement generation, with no launch pending, wins), then launched with a ClientToken
and a tag derived from that generation, then recorded. A round that finds a claimed launch not yet
recorded finishes it: it looks for instances with the launch's tag first and launches only if there are
none (the ClientToken gives the same guarantee on AWS), so the cluster never grows past its size.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, replace
from typing import Any

from ec2cluster_worker import records
from ec2cluster_worker.reachability import failure_from_console
from ec2cluster_worker.status import STARTUP_FAILED

from airflow_ec2cluster.aws.fleet import LaunchOutcome
from airflow_ec2cluster.aws.logs import LogCursor, failure_text, next_failures
from airflow_ec2cluster.calls import Call, call
from airflow_ec2cluster.capacity import (
    after_launch,
    last_errors_text,
    launch_retry_at,
    launch_workers,
    min_count_for,
    pools_to_avoid,
)
from airflow_ec2cluster.cluster import TAG_LAUNCH_TOKEN, launch_client_token
from airflow_ec2cluster.cost import (
    CostEstimate,
    InstanceUsage,
    cluster_usage,
    cost_summary,
    estimate_cost,
    newly_ended,
    seconds_by_pool,
    spot_pools,
    stale_spot_pools,
)
from airflow_ec2cluster.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CAPACITY_TIMEOUT,
    DEFAULT_DEAD_LETTER_SAMPLE,
    DEFAULT_DRAINED_CHECKS,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LAUNCH_BACKOFF,
    DEFAULT_LAUNCH_BACKOFF_MAX,
    DEFAULT_MAX_TASK_SECONDS,
    DEFAULT_REPEATED_FAILURE_LIMIT,
    DEFAULT_STATE_TABLE,
)
from airflow_ec2cluster.drain.decisions import (
    ENDED_STATES,
    LIVE_STATES,
    MAX_CONSOLES_PER_ROUND,
    REASON_NEVER_REPORTED,
    WORKER_BOOTING,
    Decision,
    InstanceInfo,
    Policy,
    QueueCounts,
    Snapshot,
    WorkerStatus,
    boot_failure_statuses,
    boot_failures_shown,
    console_tail,
    decide,
    unexplained_ends,
)
from airflow_ec2cluster.meta import ClusterMeta, MetaUpdate, PendingLaunch
from airflow_ec2cluster.pricing.table import on_demand_table
from airflow_ec2cluster.tasklog import dead_letter_errors, messages_finished, tasks_finished

# Dead-lettered task ids whose last error is looked up for the summary (BatchGetItem, 100 a call).
MAX_DEAD_LETTER_ERRORS = 100


@dataclass(frozen=True)
class DrainSettings:
    """The sensor's thresholds: everything a round needs besides the cluster id (JSON-safe)."""

    state_table: str = DEFAULT_STATE_TABLE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    max_task_seconds: float = DEFAULT_MAX_TASK_SECONDS
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    drained_checks: int = DEFAULT_DRAINED_CHECKS
    replace_reaped: bool = True
    cluster_size: int | None = None
    max_replacements: int | None = None
    dead_letter_sample: int = DEFAULT_DEAD_LETTER_SAMPLE
    exact_summary: bool = True
    repeated_failure_limit: int = DEFAULT_REPEATED_FAILURE_LIMIT
    capacity_timeout: float = DEFAULT_CAPACITY_TIMEOUT
    launch_backoff: float = DEFAULT_LAUNCH_BACKOFF
    launch_backoff_max: float = DEFAULT_LAUNCH_BACKOFF_MAX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrainSettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})

    def policy(self, meta: ClusterMeta) -> Policy:
        size = (
            self.cluster_size if self.cluster_size is not None else meta.max_workers or meta.num_workers or 0
        )
        return Policy(
            idle_timeout=float(self.idle_timeout),
            heartbeat_timeout=float(self.heartbeat_timeout),
            max_task_seconds=float(self.max_task_seconds),
            boot_timeout=float(self.boot_timeout),
            drained_checks=int(self.drained_checks),
            cluster_size=int(size),
            replace_reaped=bool(self.replace_reaped) and meta.launch_spec is not None,
            max_replacements=None if self.max_replacements is None else int(self.max_replacements),
            repeated_failure_limit=int(self.repeated_failure_limit),
            capacity_timeout=float(self.capacity_timeout),
        )


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended: drained (with the summary), failed (with the reason), or keep waiting."""

    drained: bool = False
    failure: str | None = None
    summary: dict[str, Any] | None = None
    progress: str = ""
    decision: Decision | None = None
    launched: tuple[str, ...] = ()


Round = Generator[Call, Any, RoundOutcome]


def missing_meta_message(cluster_id: str, table: str) -> str:
    return (
        f"cluster {cluster_id} has no META item in {table}: run the enqueue and launch operators with the "
        "same cluster_id and state_table first"
    )


def drain_round(
    cluster_id: str, settings: DrainSettings, log: logging.Logger | Any, now: float | None = None
) -> Round:
    """One poke: read the cluster, decide, reap, replace, record; see the module docstring."""
    table = settings.state_table
    meta: ClusterMeta | None = yield call("get_meta", table, cluster_id)
    if meta is None or not meta.queue_url:
        return RoundOutcome(failure=missing_meta_message(cluster_id, table))
    shards = meta.log_shards
    finished_pending: list[str] = []
    if meta.pending_launch is not None:
        # A launch claimed by an earlier (or concurrent) round and not recorded: finish it, launch no more.
        finished_pending = yield from finish_launch(
            cluster_id, table, meta, meta.pending_launch, None, log, now or time.time()
        )

    counts = yield call("queue_counts", meta.queue_url, meta.dlq_url)
    # Every state: an ended instance's billed time is part of the cost (EC2 lists it for about an hour).
    described = yield call("list_cluster_instances", cluster_id, None)
    instances = [i for i in described if i["State"]["Name"] in LIVE_STATES]
    workers = yield call("worker_statuses", table, cluster_id)
    costing = yield from cost_round(meta, described, now or time.time())
    logs_cursor = yield from show_failed_tasks(cluster_id, meta, workers, log, now or time.time())
    new_failures = yield from explain_ends(meta, instances, workers, now or time.time())
    log_boot_failures(new_failures, "ended before its worker wrote a status item", log)
    if new_failures:
        meta = replace(meta, boot_failures={**meta.boot_failures, **new_failures})
    snapshot = build_snapshot(
        meta,
        counts,
        instances,
        workers,
        settings.policy(meta),
        now or time.time(),
        settings,
        costing.estimate,
    )
    decision = decide(snapshot)
    exact: dict[str, int] | None = None
    if decision.needs_exact_count:
        exact = yield call("count_task_log", table, cluster_id, shards)
        log.info("Queue empty; exact task-log count: %s", exact)
        snapshot = replace(
            snapshot, exact_finished=messages_finished(exact), exact_tasks_finished=tasks_finished(exact)
        )
        decision = decide(snapshot)

    for worker_id, reason in decision.stops:
        # Once per worker (recorded below), even when its instance was gone before any round saw it.
        emit = log.warning if reason.startswith(STARTUP_FAILED) else log.info
        emit("Worker %s stopped: %s", worker_id, reason)
    for reap in decision.reap:
        log.warning("Reaping %s: %s (%s)", reap.instance_id, reap.reason, reap.detail)
    if decision.reap:
        yield call("terminate_instances", [r.instance_id for r in decision.reap], wait=False)
    never_booted = yield from read_consoles(
        [r.instance_id for r in decision.reap if r.reason == REASON_NEVER_REPORTED], now or time.time()
    )
    log_boot_failures(never_booted, "was reaped before its worker wrote a status item", log)
    if never_booted:
        new_failures = {**new_failures, **never_booted}
        meta = replace(meta, boot_failures={**meta.boot_failures, **never_booted})
    launched: list[str] = []
    if decision.launch > 0 and not decision.failure and not finished_pending:
        avoid = pools_to_avoid(snapshot.workers, meta.launch_spec, snapshot.now)
        if avoid:
            log.info("Replacements avoid the pools of workers EC2 recommended to rebalance: %s", avoid)
        launched = yield from launch_replacements(
            cluster_id, table, meta, decision.launch, decision.stats["capacity"], log, snapshot.now, avoid
        )
    yield from record(
        cluster_id,
        table,
        meta,
        decision,
        exact_count=exact is not None,
        boot_failures=bool(new_failures),
        costing=costing,
        logs_cursor=logs_cursor,
    )
    log.info("Cluster %s: %s", cluster_id, decision.progress)

    outcome = RoundOutcome(
        progress=decision.progress, decision=decision, launched=tuple(finished_pending or launched)
    )
    if decision.failure:
        consoles = boot_failures_text(meta.boot_failures)
        return replace(outcome, failure=f"cluster {cluster_id}: {decision.failure}{consoles}")
    if not decision.drained:
        return outcome
    summary = yield from build_summary(cluster_id, settings, meta, snapshot, shards, exact)
    summary.update(cost_summary(costing.estimate, meta.max_cost, on_demand_table().as_of))
    log.info("Cluster %s drained: %s", cluster_id, json.dumps(summary))
    return replace(outcome, drained=True, summary=summary)


@dataclass(frozen=True)
class Costing:
    """A round's cost: the estimate, and what META should learn (ended instances, spot prices looked up)."""

    estimate: CostEstimate
    ended: dict[str, InstanceUsage]
    spot_prices: dict[str, dict[str, Any]]


def cluster_cost(
    meta: ClusterMeta, described: list[dict[str, Any]], now: float, spot_prices: dict[str, Any] | None = None
) -> Costing:
    """The cluster's cost so far from EC2's listing (every state), META's record of ended instances and the
    spot prices (META's cache, updated by ``spot_prices``). Pure."""
    recorded = {iid: InstanceUsage.from_dict(iid, data) for iid, data in meta.instance_usage.items()}
    ended = newly_ended(described, meta.instance_usage, now)
    usage = cluster_usage(described, {**recorded, **ended}, now)
    prices = {**meta.spot_prices, **(spot_prices or {})}
    estimate = estimate_cost(seconds_by_pool(usage, now), on_demand_table().for_region(meta.region), prices)
    return Costing(estimate, ended, dict(spot_prices or {}))


def spot_pools_in_use(meta: ClusterMeta, described: list[dict[str, Any]], now: float) -> set[str]:
    """The spot pools ("type/zone") of the cluster's instances, listed or recorded in META."""
    recorded = {iid: InstanceUsage.from_dict(iid, data) for iid, data in meta.instance_usage.items()}
    return spot_pools(cluster_usage(described, recorded, now))


def cost_round(
    meta: ClusterMeta, described: list[dict[str, Any]], now: float
) -> Generator[Call, Any, Costing]:
    """The round's cost; one DescribeSpotPriceHistory only when a spot pool in use has no price younger than
    an hour in META (so at most once per pool per hour, whatever the job's size)."""
    stale = stale_spot_pools(spot_pools_in_use(meta, described, now), meta.spot_prices, now)
    looked_up: dict[str, dict[str, Any]] = {}
    if stale:
        found = yield call("current_spot_prices", sorted({pool.split("/")[0] for pool in stale}), now)
        # A pool EC2 gave no price for is recorded without one: not asked again for an hour.
        looked_up = {pool: found.get(pool) or {"price": None, "at": now} for pool in stale}
    return cluster_cost(meta, described, now, looked_up)


def show_failed_tasks(
    cluster_id: str, meta: ClusterMeta, worker_items: list[dict[str, Any]], log: Any, now: float
) -> Generator[Call, Any, LogCursor | None]:
    """Log the errors of tasks that failed since the last round, from the workers' log group (one
    FilterLogEvents, a few at most; the oldest first); the cursor after them, None when nothing new was
    shown. Only while the workers' status items count more failed tasks than were shown: a round
    without a new failure makes no call (a worker that overstates its count costs one call a round, no
    more). The lines a worker wrote are shown only: no decision about the cluster reads them."""
    log_group = meta.launch_spec.log_group if meta.launch_spec else None
    failed = sum(int(item.get("tasks_failed") or 0) for item in worker_items)
    if not log_group or failed <= meta.logs_failures_shown:
        return None
    cursor = LogCursor(
        meta.logs_read_from or int((meta.launched_at or 0) * 1000), meta.logs_shown, meta.logs_failures_shown
    )
    read = yield call("failed_task_events", log_group, cursor)
    if read.error:
        log.warning("Cannot read failed tasks' errors from %s: %s", log_group, read.error)
    shown, after, more = next_failures(read.events, cursor, int(now * 1000))
    for event in shown:
        log.warning("%s", failure_text(event))
    if more:
        log.warning(
            "More tasks failed; every worker's log: ec2cluster logs %s (CloudWatch Logs group %s)",
            cluster_id,
            log_group,
        )
    return after if shown else None


def explain_ends(
    meta: ClusterMeta, instances: list[dict[str, Any]], worker_items: list[dict[str, Any]], now: float
) -> Generator[Call, Any, dict[str, dict[str, Any]]]:
    """Instances that ended without a status item: why, from their consoles (once each; see
    :func:`~airflow_ec2cluster.drain.decisions.unexplained_ends`). A round without such instances makes no
    call here."""
    candidates = unexplained_ends(
        meta.instance_ids,
        live=[i["InstanceId"] for i in instances],
        reported=[
            str(item.get("worker_id") or item.get("sk"))
            for item in worker_items
            if item.get("state") != WORKER_BOOTING
        ],
        explained=meta.boot_failures,
        retired=meta.retired_instance_ids,
    )
    if not candidates:
        return {}
    states = yield call("instance_states", candidates)
    # Not yet visible (EC2 is eventually consistent) or still booting: a later round looks again.
    ended = [i for i in candidates if states.get(i, "terminated") in ENDED_STATES]
    return (yield from read_consoles(ended, now))


def read_consoles(instance_ids: list[str], now: float) -> Generator[Call, Any, dict[str, dict[str, Any]]]:
    """Each instance's boot failure from its console: the cause it names ("" when none) and its last lines."""
    found = {}
    for instance_id in instance_ids[:MAX_CONSOLES_PER_ROUND]:
        console = yield call("console_output", instance_id)
        found[instance_id] = {
            "at": now,
            "reason": failure_from_console(console) or "",
            "console": console_tail(console),
        }
    return found


def boot_failures_text(boot_failures: dict[str, dict[str, Any]], shown: int = 3) -> str:
    """For a failure message: the consoles of the last instances that did not boot (none: '')."""
    newest = boot_failures_shown(boot_failures)[-shown:]
    if not newest:
        return ""
    parts = [
        f"\n  {f['instance_id']}: " + (" | ".join(f["console"][-2:]) or "(empty console)") for f in newest
    ]
    return "\nInstances that did not boot, the last lines of their consoles:" + "".join(parts)


def log_boot_failures(failures: dict[str, dict[str, Any]], what: str, log: Any) -> None:
    """Once per instance: why it did not boot, as its console says (a named cause is also logged as a
    worker's stop, with the other stops)."""
    for instance_id, failure in failures.items():
        tail = "\n    ".join(failure["console"]) or "(empty: EC2 may publish it later)"
        log.warning("Instance %s %s; the last lines of its console:\n    %s", instance_id, what, tail)


def build_snapshot(
    meta: ClusterMeta,
    counts: QueueCounts,
    instances: list[dict[str, Any]],
    worker_items: list[dict[str, Any]],
    policy: Policy,
    now: float,
    settings: DrainSettings | None = None,
    cost: CostEstimate | None = None,
) -> Snapshot:
    settings = settings or DrainSettings()
    return Snapshot(
        counts=counts,
        instances=tuple(
            InstanceInfo(i["InstanceId"], i["State"]["Name"], i["LaunchTime"].timestamp()) for i in instances
        ),
        workers=tuple(WorkerStatus.from_item(item) for item in worker_items)
        + boot_failure_statuses(meta.boot_failures),
        now=now,
        policy=policy,
        enqueued=meta.enqueued,
        enqueued_messages=meta.enqueued_messages,
        enqueue_complete=meta.enqueue_finished,
        consecutive_empty=meta.consecutive_empty,
        finished_before=meta.progress_finished,
        replacements_launched=meta.replacements_launched,
        reaped_total=meta.reaped_total,
        started_at=meta.launched_at,
        retired_workers=frozenset(meta.retired_instance_ids),
        stops_reported=frozenset(meta.stops_reported),
        launch_retry_at=launch_retry_at(meta, settings.launch_backoff, settings.launch_backoff_max),
        launch_failures=meta.launch_failures,
        launch_failed_at=meta.launch_failed_at,
        launch_errors=last_errors_text(meta),
        capacity_wait_since=meta.capacity_wait_since,
        cost=cost,
        max_cost=meta.max_cost,
    )


def launch_replacements(
    cluster_id: str,
    table: str,
    meta: ClusterMeta,
    count: int,
    capacity: int,
    log: Any,
    now: float,
    avoid: list[str] | None = None,
) -> Generator[Call, Any, list[str]]:
    generation = meta.replacement_generation
    pending = PendingLaunch(generation, count, launch_client_token(cluster_id, generation, count))
    claimed = yield call("claim_replacement_launch", table, cluster_id, pending)
    if not claimed:
        log.info("Replacement launch %d was claimed by another drain round; not launching", generation)
        return []
    return (yield from finish_launch(cluster_id, table, meta, pending, capacity, log, now, avoid))


def finish_launch(
    cluster_id: str,
    table: str,
    meta: ClusterMeta,
    pending: PendingLaunch,
    capacity: int | None,
    log: Any,
    now: float,
    avoid: list[str] | None = None,
) -> Generator[Call, Any, list[str]]:
    """Launch a claimed replacement batch unless it already exists, then record its ids and outcome.

    Capacity errors never escape: the outcome (what started, each pool's error) is recorded with the
    claim's release, the instances EC2 did not start go back to the replacement budget, and a launch
    short of what it asked makes the next one wait (``capacity.launch_retry_at``).
    """
    generation, count, token = pending.generation, pending.count, pending.token
    ids = yield call("instances_with_launch_token", cluster_id, token)
    update = None
    if ids:
        log.info("Replacement launch %d already started %s", generation, ", ".join(ids))
    else:
        spec = meta.launch_spec
        if not spec.launch_template_id:  # recorded by a version that launched with RunInstances
            spec = replace(spec, launch_template_id=(yield call("ensure_launch_template", cluster_id, spec)))
        outcome = yield from launch_workers(
            cluster_id,
            spec,
            count,
            token,
            min_count=min_count_for(spec, count, capacity or 0),
            extra_tags={TAG_LAUNCH_TOKEN: token},
            avoid=avoid or (),
        )
        ids = outcome.instance_ids
        log_launch(outcome, "replacement", log)
        update = after_launch(meta, outcome, now, capacity)
    yield call(
        "finish_replacement_launch", table, cluster_id, generation, ids, update, max(0, count - len(ids))
    )
    return list(ids)


def log_launch(outcome: LaunchOutcome, what: str, log: Any) -> None:
    """One line per launch: what started where, and each pool EC2 could not use."""
    pools = ", ".join(f"{pool}: {n}" for pool, n in outcome.by_pool().items()) or "none"
    emit = log.warning if outcome.short else log.info
    kind = f"{what} worker(s)" if what else "worker(s)"
    emit("Launched %d of %d %s (%s)", len(outcome.instances), outcome.requested, kind, pools)
    for error in outcome.errors:
        log.warning("  %s: %s: %s", error.pool, error.code, error.message[:300])
    if outcome.released:
        log.warning(
            "  fewer than the launch's minimum started: terminated %s (the next launch tries again)",
            ", ".join(outcome.released),
        )


def meta_update(meta: ClusterMeta, decision: Decision, *, exact_count: bool = False) -> MetaUpdate:
    """The META item's change after a round; launches record themselves (claim and finish).

    A higher finished count is recorded after an exact count (the workers' counters lag behind it) or
    with a write the round makes anyway: never an extra call in a steady round.
    """
    changed = decision.consecutive_empty != meta.consecutive_empty
    update = MetaUpdate(
        consecutive_empty=decision.consecutive_empty if changed else None, add_reaped=len(decision.reap)
    )
    if decision.stops:
        reported = set(meta.stops_reported) | {worker_id for worker_id, _ in decision.stops}
        update = replace(update, stops_reported=sorted(reported))
    if decision.finished > meta.progress_finished and (exact_count or update):
        update = replace(update, progress_finished=decision.finished)
    return update


def record(
    cluster_id: str,
    table: str,
    meta: ClusterMeta,
    decision: Decision,
    *,
    exact_count: bool = False,
    boot_failures: bool = False,
    costing: Costing | None = None,
    logs_cursor: LogCursor | None = None,
) -> Generator[Call, Any, None]:
    """Write the round's change to META; ``boot_failures``: the round explained new ones (in ``meta``);
    ``costing``: instances seen ended and spot prices looked up, to keep; ``logs_cursor``: where the
    reading of failed tasks' errors is after the ones the round showed."""
    update = meta_update(meta, decision, exact_count=exact_count)
    if boot_failures:
        update = replace(update, boot_failures=dict(meta.boot_failures))
    if costing is not None and costing.ended:
        ended = {iid: usage.to_dict() for iid, usage in costing.ended.items()}
        update = replace(update, instance_usage={**meta.instance_usage, **ended})
    if costing is not None and costing.spot_prices:
        update = replace(update, spot_prices={**meta.spot_prices, **costing.spot_prices})
    if logs_cursor is not None:
        update = replace(
            update,
            logs_read_from=logs_cursor.read_from,
            logs_shown=dict(logs_cursor.shown),
            logs_failures_shown=logs_cursor.failures_shown,
        )
    if update:
        yield call("update_meta", table, cluster_id, update)


def build_summary(
    cluster_id: str,
    settings: DrainSettings,
    meta: ClusterMeta,
    snapshot: Snapshot,
    shards: int,
    exact: dict[str, int] | None = None,
) -> Generator[Call, Any, dict[str, Any]]:
    """The drained cluster's summary; ``exact`` is the round's own count of the task log, when it made one."""
    table = settings.state_table
    if settings.exact_summary:
        if exact is None:
            exact = yield call("count_task_log", table, cluster_id, shards)
        done, failed = exact.get(records.TASK_DONE, 0), exact.get(records.TASK_FAILED, 0)
    else:
        done = sum(w.tasks_done for w in snapshot.workers)
        failed = sum(w.tasks_failed for w in snapshot.workers)
    dead_ids: list[str] = []
    errors: dict[str, dict[str, Any]] = {}
    if snapshot.counts.dead_lettered:
        dead_ids = yield call("peek_dead_letters", meta.dlq_url, settings.dead_letter_sample)
        if dead_ids:
            errors = yield call(
                "task_log_items", table, cluster_id, dead_ids[:MAX_DEAD_LETTER_ERRORS], shards
            )
    dead_letters = dead_letter_errors(dead_ids, errors)
    launched = set(meta.instance_ids) | {w.worker_id for w in snapshot.workers}
    started_at = snapshot.started_at
    return {
        "cluster_id": cluster_id,
        "enqueued": snapshot.enqueued,
        "tasks_done": done,
        "tasks_failed": failed,
        "dead_lettered": snapshot.counts.dead_lettered,
        "dead_lettered_task_ids": [entry["task_id"] for entry in dead_letters],
        "dead_letters": dead_letters,
        "workers_used": len(launched),
        "replacements_launched": snapshot.replacements_launched,
        "reaped": snapshot.reaped_total,
        "elapsed_seconds": None if not started_at else round(snapshot.now - started_at, 1),
        "counts_exact": bool(settings.exact_summary),
        "failed_boots": boot_failures_shown(meta.boot_failures),
        # Launches: the last ones (what started in which pool, each pool's error), and how often each
        # pool met each error over the job.
        "launches": meta.launch_history[-5:],
        "launch_errors": dict(meta.launch_errors_total),
    }
