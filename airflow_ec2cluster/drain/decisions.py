"""What the drain sensor should do on one poke, as a pure function of what it observed.

``decide(snapshot)`` returns which instances to reap and why, how many replacements to launch, whether the
queue is drained, whether the job cannot finish, and a progress line. No I/O here: the sensor fetches the
snapshot (a fixed handful of API calls) and carries out the decision.

Worker ids are instance ids (the worker takes its id from instance metadata on EC2, and the local cloud sets
``EC2CLUSTER_WORKER_ID`` to the instance id), so a status item is matched to its instance by id.

Counting for the drained cross-check. The queue's counts are approximate, so "drained" needs all three counts
at zero on ``drained_checks`` consecutive pokes (default 2) *and* the messages accounted for: finished (done
or failed) + dead-lettered >= enqueued. The check counts messages, not tasks, because a message may carry a
group of tasks and the dead-letter queue counts messages (with one task per message the two are the same).
The second condition is what makes two reads enough: a stale zero while messages are still queued or held
cannot also show every enqueued message finished. Without an enqueued count (no cross-check possible) three
reads are required. Two sources for the finished messages:

- the sum of the workers' ``messages_done + messages_failed`` over their status items: free (the sensor reads
  the status items anyway), but it lags for a worker killed between heartbeats and counts a message twice
  when SQS delivered it twice;
- an exact count of the task log (one item per message, keyed by its first task id, so duplicates collapse):
  one Query per log shard, paginated, so its cost grows with the size of the job.

The sum is the fast path. Only when the queue has read empty ``drained_checks`` times in a row and the sum
falls short does the decision ask for the exact count (``needs_exact_count``); the sensor does that count
and decides again. It asks again only every ``drained_checks`` empty pokes, and gives up with a clear failure
when the queue has stayed empty for ``EXACT_COUNT_ROUNDS * drained_checks`` pokes and the exact count still
falls short (work lost outside the queue). So the per-poke calls stay flat in the number of tasks; the
exact count runs at most a few times per job, at its end. A sum that overcounts (duplicates) can only end the
wait early when the queue has already read empty ``drained_checks`` times, which is the documented check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ec2cluster_worker.status import STARTUP_FAILED

from airflow_ec2cluster.cost import CostEstimate, cap_reached, usd_text
from airflow_ec2cluster.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CAPACITY_TIMEOUT,
    DEFAULT_DRAINED_CHECKS,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_TASK_SECONDS,
    DEFAULT_REPEATED_FAILURE_LIMIT,
)

# EC2 instance states in which an instance can (or soon can) run the worker.
CAPACITY_STATES = frozenset({"pending", "running"})
# EC2 states in which an instance costs money or may come back: everything teardown must terminate.
LIVE_STATES = ("pending", "running", "stopping", "stopped")

WORKER_BOOTING = (
    "booting"  # written by the instance's boot loader (ec2cluster_worker.boot), before the worker
)
WORKER_STOPPING = "stopping"
WORKER_STOPPED = "stopped"

REASON_IDLE = "idle"
REASON_HUNG = "hung"
REASON_NEVER_REPORTED = "never-reported"
REASON_STOPPED = "worker-stopped"
REASON_INSTANCE_STOPPED = "instance-stopped"

# The exact task-log count is retried every ``drained_checks`` empty pokes, this many times at most.
EXACT_COUNT_ROUNDS = 3
# Lines of a repeated start-up error quoted in the failure message.
STOP_REASON_QUOTE_LINES = 5
# Without an enqueued count there is no cross-check: the queue counts alone must read empty this many times.
UNCHECKED_DRAINED_CHECKS = 3


@dataclass(frozen=True)
class QueueCounts:
    visible: int
    in_flight: int
    delayed: int
    dead_lettered: int

    @property
    def work(self) -> int:
        # In-flight messages are work: a worker holds them, or they come back when their visibility lapses.
        return self.visible + self.in_flight + self.delayed


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    state: str
    launch_time: float


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    state: str
    started_at: float
    heartbeat_at: float
    last_completion_at: float | None = None
    busy: bool = False  # any slot runs a task
    busy_slots: int = 0  # how many (a worker writing only ``busy``: 1 when busy)
    slots: int = 1
    busy_task_id: str | None = None
    busy_since: float | None = None
    idle_since: float | None = None
    tasks_done: int = 0
    tasks_failed: int = 0
    stop_reason: str | None = None
    # Messages (one task or a group) finished; None from a worker that counted only tasks.
    messages_done: int | None = None
    messages_failed: int | None = None
    step: str | None = None  # a booting instance's step under way
    # Where the worker runs, from its instance metadata (None from a worker that does not say).
    instance_type: str | None = None
    availability_zone: str | None = None
    lifecycle: str | None = None

    @property
    def booting(self) -> bool:
        return self.state == WORKER_BOOTING

    @property
    def messages_finished(self) -> int:
        if self.messages_done is None:
            return self.tasks_done + self.tasks_failed
        return self.messages_done + (self.messages_failed or 0)

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> WorkerStatus:
        """From a status item as the worker wrote it (numbers already plain ints/floats)."""

        def number(name: str) -> float | None:
            value = item.get(name)
            return None if value is None else float(value)

        started_at = number("started_at") or 0.0
        # A worker with slots writes busy_slots beside busy; an older one only busy. Either says busy when
        # any slot is.
        busy_slots = int(item.get("busy_slots") or 0)
        busy = bool(item.get("busy", False)) or busy_slots > 0
        return cls(
            worker_id=str(item.get("worker_id") or item.get("sk")),
            state=str(item.get("state", "")),
            started_at=started_at,
            heartbeat_at=number("heartbeat_at") or started_at,
            last_completion_at=number("last_completion_at"),
            busy=busy,
            busy_slots=max(busy_slots, 1) if busy else 0,
            slots=int(item.get("slots") or 1),
            busy_task_id=item.get("busy_task_id"),
            busy_since=number("busy_since"),
            idle_since=number("idle_since"),
            tasks_done=int(item.get("tasks_done") or 0),
            tasks_failed=int(item.get("tasks_failed") or 0),
            stop_reason=item.get("stop_reason"),
            messages_done=None if item.get("messages_done") is None else int(item["messages_done"]),
            messages_failed=None if item.get("messages_failed") is None else int(item["messages_failed"]),
            step=item.get("step"),
            instance_type=item.get("instance_type"),
            availability_zone=item.get("availability_zone"),
            lifecycle=item.get("lifecycle"),
        )

    @property
    def last_activity(self) -> float:
        return max(t for t in (self.started_at, self.idle_since, self.last_completion_at) if t is not None)


@dataclass(frozen=True)
class Policy:
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    max_task_seconds: float = DEFAULT_MAX_TASK_SECONDS
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    drained_checks: int = DEFAULT_DRAINED_CHECKS
    cluster_size: int = 1
    replace_reaped: bool = True
    # Replacement instances allowed per launch generation: a bound on churn when workers keep dying.
    max_replacements: int | None = None
    # Stop replacing (and fail) when this many workers in a row stopped at start with the same error.
    repeated_failure_limit: int = DEFAULT_REPEATED_FAILURE_LIMIT
    # Fail when the cluster has had no worker and every launch failed for this long (capacity, quotas).
    capacity_timeout: float = DEFAULT_CAPACITY_TIMEOUT

    @property
    def replacement_budget(self) -> int:
        return 2 * self.cluster_size if self.max_replacements is None else self.max_replacements


@dataclass(frozen=True)
class Snapshot:
    counts: QueueCounts
    instances: tuple[InstanceInfo, ...]
    workers: tuple[WorkerStatus, ...]
    now: float
    policy: Policy
    enqueued: int | None = None  # tasks
    # Messages sent (a message carries one task or a group); None when every message is one task.
    enqueued_messages: int | None = None
    enqueue_complete: bool = True
    consecutive_empty: int = 0
    replacements_launched: int = 0
    reaped_total: int = 0
    started_at: float | None = None
    # Messages finished (done + failed) by an exact count of the task log, when the sensor made one.
    exact_finished: int | None = None
    # Tasks finished (done + failed) by that exact count.
    exact_tasks_finished: int | None = None
    # The finished count an earlier round reported: progress never goes backwards.
    finished_before: int = 0
    # Workers of earlier launch generations (before a re-run): their stops do not count against this one.
    retired_workers: frozenset[str] = frozenset()
    # Workers whose stop an earlier round already logged.
    stops_reported: frozenset[str] = frozenset()
    # Launches (airflow_ec2cluster.capacity): no launch before ``launch_retry_at`` (a backoff after
    # launches short of what they asked: ``launch_failures`` in a row, the last one's errors in
    # ``launch_errors``, made at ``launch_failed_at``); since ``capacity_wait_since`` (0: not) launches
    # have failed with no worker left.
    launch_retry_at: float = 0.0
    launch_failures: int = 0
    launch_failed_at: float = 0.0
    launch_errors: str = ""
    capacity_wait_since: float = 0.0
    # The cluster's estimated cost so far (airflow_ec2cluster.cost; None: not estimated), and the launch's
    # cap on it (USD; None: none): once reached, no replacement and no growth is launched.
    cost: CostEstimate | None = None
    max_cost: float | None = None

    @property
    def cost_capped(self) -> bool:
        return cap_reached(self.cost, self.max_cost)

    @property
    def expected_messages(self) -> int | None:
        return self.enqueued if self.enqueued_messages is None else self.enqueued_messages


@dataclass(frozen=True)
class Reap:
    instance_id: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Decision:
    reap: tuple[Reap, ...]
    launch: int
    consecutive_empty: int
    drained: bool
    needs_exact_count: bool
    failure: str | None
    progress: str
    finished: int
    stats: dict[str, Any] = field(default_factory=dict)
    # Workers stopped since the last round that logged stops: (worker id, stop reason), to log once each.
    stops: tuple[tuple[str, str], ...] = ()


def reap_reason(
    instance: InstanceInfo, worker: WorkerStatus | None, now: float, policy: Policy
) -> Reap | None:
    """Why this instance should be terminated now, or None to keep it."""
    iid = instance.instance_id
    if instance.state not in CAPACITY_STATES:
        # Stopped (or stopping) by someone else: it can run nothing but its volumes still cost.
        return Reap(iid, REASON_INSTANCE_STOPPED, f"instance is {instance.state}")
    if worker is None:
        age = now - instance.launch_time
        if age > policy.boot_timeout:
            return Reap(iid, REASON_NEVER_REPORTED, f"no status {age:.0f}s after launch")
        return None
    if worker.booting:
        # The boot loader rewrites its item at every step and while a long download progresses: a long
        # install is kept while it moves; boot_timeout counts from its last sign of life.
        silent = now - worker.heartbeat_at
        if silent > policy.boot_timeout:
            return Reap(
                iid,
                REASON_NEVER_REPORTED,
                f"booting ({worker.step or 'no step'}), no sign of life for {silent:.0f}s",
            )
        return None
    if worker.state == WORKER_STOPPED:
        return Reap(iid, REASON_STOPPED, f"worker exited ({worker.stop_reason or 'no reason'})")
    silent = now - worker.heartbeat_at
    if silent > policy.heartbeat_timeout:
        return Reap(iid, REASON_HUNG, f"no heartbeat for {silent:.0f}s")
    if worker.busy and worker.busy_since is not None and now - worker.busy_since > policy.max_task_seconds:
        return Reap(
            iid, REASON_HUNG, f"busy on task {worker.busy_task_id} for {now - worker.busy_since:.0f}s"
        )
    if not worker.busy and now - worker.last_activity > policy.idle_timeout:
        return Reap(iid, REASON_IDLE, f"idle for {now - worker.last_activity:.0f}s")
    return None


def can_work(instance: InstanceInfo, worker: WorkerStatus | None) -> bool:
    """Whether an instance that is kept counts as capacity (booting counts; an exiting worker does not)."""
    if instance.state not in CAPACITY_STATES:
        return False
    return worker is None or worker.state not in (WORKER_STOPPING, WORKER_STOPPED)


def replacements_to_launch(snapshot: Snapshot, capacity: int) -> int:
    """New instances for remaining work, never above the cluster size nor the job's replacement budget."""
    policy = snapshot.policy
    counts = snapshot.counts
    if not policy.replace_reaped or counts.work == 0:
        return 0
    # A new worker can only take what it can receive: in-flight messages are held by a live worker (they
    # keep the cluster from scaling to zero, but launching for them buys idle instances). With no worker
    # left, held messages come back when their visibility expires, so one must be there to take them.
    receivable = counts.visible + counts.delayed
    if capacity == 0:
        receivable = max(receivable, 1)
    # One worker per receivable message at most: no fleet for the last few tasks.
    wanted = min(policy.cluster_size - capacity, receivable)
    budget = policy.replacement_budget - snapshot.replacements_launched
    return max(0, min(wanted, budget))


def attempts_finished(snapshot: Snapshot) -> int:
    """Task attempts finished (done + failed): the best count at hand, a retried task counted again.

    The workers' counters lag by up to a heartbeat, an exact count of the task log is made only near the
    end, and a restarted worker's counters start again at zero: the highest of these and of what earlier
    rounds reported, so that the figure never goes backwards.
    """
    workers = sum(w.tasks_done + w.tasks_failed for w in snapshot.workers)
    return max(workers, snapshot.exact_tasks_finished or 0, snapshot.finished_before)


def finished_count(snapshot: Snapshot) -> int:
    """Tasks finished, for the drain's progress over the enqueued tasks (not for the cross-check): the
    attempts, capped at the job's tasks since a retried task counts twice, so never past 100 %."""
    attempts = attempts_finished(snapshot)
    return attempts if snapshot.enqueued is None else min(attempts, snapshot.enqueued)


def finished_messages(snapshot: Snapshot) -> int:
    if snapshot.exact_finished is not None:
        return snapshot.exact_finished
    return sum(w.messages_finished for w in snapshot.workers)


def drain_state(snapshot: Snapshot, consecutive_empty: int, finished: int) -> tuple[bool, bool, str | None]:
    """(drained, needs_exact_count, failure) for the queue-empty side; ``finished`` counts messages."""
    checks = snapshot.policy.drained_checks
    expected = snapshot.expected_messages
    if expected is None:
        # Nothing to cross-check against: only the (approximate) queue counts, so more of them.
        unchecked = max(checks, UNCHECKED_DRAINED_CHECKS)
        return consecutive_empty >= unchecked and snapshot.enqueue_complete, False, None
    if consecutive_empty < checks or not snapshot.enqueue_complete:
        return False, False, None
    accounted = finished + snapshot.counts.dead_lettered
    if accounted >= expected:
        return True, False, None
    if snapshot.exact_finished is None:
        return False, consecutive_empty % checks == 0, None
    if consecutive_empty >= EXACT_COUNT_ROUNDS * checks:
        return (
            False,
            False,
            f"the queue has read empty on {consecutive_empty} consecutive checks but only {accounted} of "
            f"{expected} enqueued messages are accounted for ({finished} in the task log, "
            f"{snapshot.counts.dead_lettered} dead-lettered): messages were deleted without a task-log "
            "record, or the META item's enqueued count is wrong; inspect the queue and the task log",
        )
    return False, False, None


# States of an instance that is gone for good: one that got there without a status item never booted.
ENDED_STATES = frozenset({"shutting-down", "terminated"})
# Consoles read in one round at most (each is a GetConsoleOutput call); the rest wait for the next round.
MAX_CONSOLES_PER_ROUND = 10
NO_CONSOLE_REASON = "its console named no start-up failure"
# What a boot failure keeps of the console: its last lines, each cut short (META holds one per failed boot).
CONSOLE_TAIL_LINES = 5
CONSOLE_LINE_CHARS = 200
# Boot failures listed in a summary or a failure message (the newest).
BOOT_FAILURES_SHOWN = 20


def console_tail(console: str, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
    """The last non-empty lines of an instance's console, each at most CONSOLE_LINE_CHARS long."""
    kept = [line.rstrip()[:CONSOLE_LINE_CHARS] for line in console.splitlines() if line.strip()]
    return kept[-lines:]


def boot_failures_shown(boot_failures: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The newest boot failures, for a summary: instance id, the cause named (or None), the console's tail."""
    newest = sorted(boot_failures.items(), key=lambda item: (item[1].get("at") or 0, item[0]))
    return [
        {
            "instance_id": instance_id,
            "reason": failure.get("reason") or None,
            "console": list(failure.get("console") or []),
        }
        for instance_id, failure in newest[-BOOT_FAILURES_SHOWN:]
    ]


def unexplained_ends(
    launched: Iterable[str],
    live: Iterable[str],
    reported: Iterable[str],
    explained: Iterable[str],
    retired: Iterable[str] = (),
) -> list[str]:
    """Instances launched for the current generation that are no longer live, never had a worker write a
    status item (``reported``: a boot loader's ``booting`` item does not count),
    and whose end no round has explained yet: their consoles say why (the worker could not reach
    DynamoDB, the bootstrap could not install, ...). At most MAX_CONSOLES_PER_ROUND, oldest first."""
    skip = set(live) | set(reported) | set(explained) | set(retired)
    return [i for i in launched if i not in skip][:MAX_CONSOLES_PER_ROUND]


def boot_failure_statuses(boot_failures: Mapping[str, Mapping[str, Any]]) -> tuple[WorkerStatus, ...]:
    """The workers that ended without a status item, as stopped workers with the cause their console
    named (``startup-failed: ...``), so that N in a row with one cause stop the drain like any start-up
    failure. One whose console named no cause (reclaimed before it booted, or a console EC2 has not
    published yet) is no evidence either way: it neither counts in such a row nor breaks it."""
    return tuple(
        WorkerStatus(
            worker_id=instance_id,
            state=WORKER_STOPPED,
            started_at=float(failure.get("at") or 0.0),
            heartbeat_at=float(failure.get("at") or 0.0),
            stop_reason=f"{STARTUP_FAILED}: {failure['reason']}",
        )
        for instance_id, failure in sorted(boot_failures.items())
        if failure.get("reason")
    )


def current_stops(snapshot: Snapshot) -> list[WorkerStatus]:
    """The current launch generation's stopped workers, in the order they stopped (their last beat)."""
    stopped = [
        w
        for w in snapshot.workers
        if w.state == WORKER_STOPPED and w.worker_id not in snapshot.retired_workers
    ]
    return sorted(stopped, key=lambda w: (w.heartbeat_at, w.worker_id))


def repeated_startup_failure(snapshot: Snapshot) -> str | None:
    """The start-up error the last ``repeated_failure_limit`` workers to stop all stopped with, if they did.

    Only this launch generation's workers count (a re-run after a fix starts afresh), and any other stop in
    between (a worker that ran and went idle, or failed differently) breaks the row. The error is the stop
    reason the worker wrote (``startup-failed: ...``), without its prefix.
    """
    limit = snapshot.policy.repeated_failure_limit
    last = current_stops(snapshot)[-limit:]
    if limit < 1 or len(last) < limit:
        return None
    reasons = {w.stop_reason or "" for w in last}
    if len(reasons) != 1:
        return None
    (reason,) = reasons
    prefix = f"{STARTUP_FAILED}:"
    return reason[len(prefix) :].strip() if reason.startswith(prefix) else None


def repeated_failure_message(snapshot: Snapshot, error: str) -> str:
    limit = snapshot.policy.repeated_failure_limit
    quoted = "\n    ".join(error.splitlines()[:STOP_REASON_QUOTE_LINES])
    return (
        f"{limit} workers in a row failed at start with the same error, so no more are launched "
        f"({snapshot.counts.work} messages of tasks still queued):\n    {quoted}\n"
        "Fix the handler (its module, its requirements or the worker options), then clear the launch and "
        "drain tasks: the launch starts workers from its current arguments with a fresh replacement budget, "
        "for the work still queued (tasks already done are not run again)"
    )


def stop_reasons_text(snapshot: Snapshot, limit: int = 3) -> str:
    """The last distinct stop reasons of this launch generation's workers, for a failure message."""
    reasons: list[str] = []
    for worker in reversed(current_stops(snapshot)):
        reason = (worker.stop_reason or "no reason").splitlines()[0]
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons[:limit])


def new_stops(snapshot: Snapshot) -> tuple[tuple[str, str], ...]:
    """Stopped workers no round has logged yet (their status items outlive their instances)."""
    return tuple(
        (w.worker_id, w.stop_reason or "no reason")
        for w in sorted(snapshot.workers, key=lambda w: (w.heartbeat_at, w.worker_id))
        if w.state == WORKER_STOPPED and w.worker_id not in snapshot.stops_reported
    )


def failure_message(snapshot: Snapshot, reaped: Iterable[Reap], launch: int, capacity: int) -> str | None:
    """A clear reason to fail when work remains that no worker can ever run."""
    counts = snapshot.counts
    if counts.work == 0 or capacity > 0 or (launch > 0 and not snapshot.cost_capped):
        return None
    policy = snapshot.policy
    if not policy.replace_reaped:
        why = "replace_reaped is off"
    elif snapshot.cost_capped:
        why = (
            f"{cost_cap_text(snapshot)}, so no replacement is launched (raise the launch's max_cost to go on)"
        )
    else:
        why = f"the replacement budget ({policy.replacement_budget} instances) is used up"
    reasons = sorted({f"{r.reason} ({r.detail})" for r in reaped})
    reaped_text = f"; reaped this check: {', '.join(reasons)}" if reasons else ""
    stopped = stop_reasons_text(snapshot)
    stopped_text = f"; workers stopped with: {stopped}" if stopped else ""
    return (
        f"{counts.work} messages of tasks remain (visible {counts.visible}, in flight {counts.in_flight}, "
        f"delayed {counts.delayed}) but no worker can run them: no live worker is left and {why}"
        f"{reaped_text}{stopped_text}. Fix the cause, then clear the launch and drain tasks: the launch "
        "starts workers from its current arguments with a fresh replacement budget, for the work still "
        "queued"
    )


def capacity_failure(snapshot: Snapshot, capacity: int) -> str | None:
    """Fail when work remains, no worker is left, and launches have failed for ``capacity_timeout``:
    the last one failed when it had passed. A drain that comes back late (a busy scheduler, a long
    backoff) tries once more before it gives up, since capacity may be back by then."""
    since = snapshot.capacity_wait_since
    waited = snapshot.now - since
    if not since or capacity > 0 or snapshot.counts.work == 0:
        return None
    if snapshot.launch_failed_at - since < snapshot.policy.capacity_timeout:
        return None
    errors = snapshot.launch_errors or "no error named"
    return (
        f"no worker could be launched for {waited:.0f}s (capacity_timeout "
        f"{snapshot.policy.capacity_timeout:.0f}s; {snapshot.launch_failures} launch(es) in a row fell "
        f"short) and {snapshot.counts.work} messages of tasks remain; the last launch's errors: {errors}. "
        "EC2 had no capacity (or quota) in any pool the launch may use: give the launch more instance types "
        "or subnets (zones), capacity='spot-then-on-demand', or a higher vCPU quota (Service Quotas), then "
        "clear the launch and drain tasks: the launch starts workers for the work still queued"
    )


def decide(snapshot: Snapshot) -> Decision:
    policy = snapshot.policy
    workers = {w.worker_id: w for w in snapshot.workers}
    reap: list[Reap] = []
    capacity = 0
    for instance in snapshot.instances:
        worker = workers.get(instance.instance_id)
        reason = reap_reason(instance, worker, snapshot.now, policy)
        if reason is not None:
            reap.append(reason)
        elif can_work(instance, worker):
            capacity += 1

    wanted = replacements_to_launch(snapshot, capacity)
    # After launches short of what they asked (capacity, quotas), the next waits out its backoff; once the
    # estimated cost reaches max_cost, nothing more is launched (replacements and growth alike).
    launch = 0 if snapshot.now < snapshot.launch_retry_at or snapshot.cost_capped else wanted
    repeated = repeated_startup_failure(snapshot) if snapshot.counts.work else None
    if repeated is not None:
        launch = 0
    consecutive_empty = snapshot.consecutive_empty + 1 if snapshot.counts.work == 0 else 0
    finished = finished_count(snapshot)
    drained, needs_exact, drain_failure = drain_state(
        snapshot, consecutive_empty, finished_messages(snapshot)
    )
    failure = (
        drain_failure
        or failure_message(snapshot, reap, wanted, capacity)
        or capacity_failure(snapshot, capacity)
    )
    if repeated is not None and not drain_failure:
        failure = repeated_failure_message(snapshot, repeated)
    stats = worker_stats(snapshot, reap, capacity, finished)
    return Decision(
        reap=tuple(reap),
        launch=0 if drained else launch,
        consecutive_empty=consecutive_empty,
        drained=drained,
        needs_exact_count=needs_exact,
        failure=None if drained else failure,
        progress=progress_line(snapshot, stats),
        finished=finished,
        stats=stats,
        stops=new_stops(snapshot),
    )


def worker_stats(snapshot: Snapshot, reap: list[Reap], capacity: int, finished: int) -> dict[str, Any]:
    live = {i.instance_id for i in snapshot.instances}
    reaped = {r.instance_id for r in reap}
    reporting = [
        w for w in snapshot.workers if w.worker_id in live and w.worker_id not in reaped and not w.booting
    ]
    busy = sum(1 for w in reporting if w.busy)
    reported = {w.worker_id for w in snapshot.workers if not w.booting}
    booting = sum(1 for i in snapshot.instances if i.instance_id not in reaped | reported)
    elapsed = snapshot.now - snapshot.started_at if snapshot.started_at else None
    rate = finished / elapsed if elapsed and elapsed > 0 else None
    return {
        "finished": finished,
        "busy": busy,
        "idle": len(reporting) - busy,
        "booting": booting,
        "capacity": capacity,
        "reaped": snapshot.reaped_total + len(reap),
        "rate_per_s": rate,
        "elapsed_s": elapsed,
    }


def progress_line(snapshot: Snapshot, stats: dict[str, Any]) -> str:
    counts = snapshot.counts
    finished = stats["finished"]
    total = snapshot.enqueued
    total_text = "?" if total is None else str(total)
    pct = f" ({100 * finished / total:.1f}%)" if total else ""
    rate = stats["rate_per_s"]
    rate_text = "-" if rate is None else f"{rate * 60:.1f}/min"
    return (
        f"done {finished}/{total_text}{pct}; messages in flight {counts.in_flight}, queued "
        f"{counts.visible + counts.delayed}, dead-lettered {counts.dead_lettered}; workers "
        f"{stats['busy']} busy/{stats['idle']} idle/{stats['booting']} booting, reaped {stats['reaped']}; "
        f"rate {rate_text}, ETA {eta_text(total, finished, counts.dead_lettered, rate)}"
        f"{launch_text(snapshot)}{cost_text(snapshot)}"
    )


def cost_cap_text(snapshot: Snapshot) -> str:
    """'the estimated cost $X reached max_cost $Y' (the priced part of the estimate)."""
    usd = snapshot.cost.usd if snapshot.cost is not None else 0.0
    return f"the estimated cost {usd_text(usd)} reached max_cost {usd_text(snapshot.max_cost or 0.0)}"


def cost_text(snapshot: Snapshot) -> str:
    """The progress line's cost part: the estimate so far, and the cap when it holds launches back."""
    if snapshot.cost is None:
        return ""
    text = f"; cost ~{snapshot.cost.text()}"
    if snapshot.cost_capped:
        text += f" ({cost_cap_text(snapshot)}: no replacement or scale-out is launched)"
    elif snapshot.max_cost is not None:
        text += f" of max_cost {usd_text(snapshot.max_cost)}"
    return text


def launch_text(snapshot: Snapshot) -> str:
    """The progress line's launch part: launches short of capacity, and the wait for any (or '')."""
    if not snapshot.launch_failures:
        return ""
    retry = max(0.0, snapshot.launch_retry_at - snapshot.now)
    text = (
        f"; launches short of capacity {snapshot.launch_failures} in a row "
        f"({snapshot.launch_errors or 'no error named'}), next in {retry:.0f}s"
    )
    if snapshot.capacity_wait_since:
        waited = snapshot.now - snapshot.capacity_wait_since
        text += f", no worker for {waited:.0f}s of capacity_timeout {snapshot.policy.capacity_timeout:.0f}s"
    return text


def eta_text(
    total: int | None,
    finished: int,
    dead_lettered: int,
    rate: float | None,
    *,
    held_by_stopped: int = 0,
    held_at_least: bool = False,
) -> str:
    """Time left at ``rate``; "-" when nothing is left or there is no rate yet.

    Messages held by workers that are gone come back only when their visibility timeout lapses, whatever
    the rate: with any (``held_by_stopped``), the ETA is unknown and says why.
    """
    if held_by_stopped > 0:
        count = f"at least {held_by_stopped}" if held_at_least else str(held_by_stopped)
        return f"unknown: {count} message(s) held by stopped workers until their visibility timeout"
    if total is None or not rate:
        return "-"
    remaining = max(0, total - finished - dead_lettered)
    if remaining == 0:
        return "-"
    seconds = math.ceil(remaining / rate)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
