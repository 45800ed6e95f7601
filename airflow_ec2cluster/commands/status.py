"""``ec2cluster status CLUSTER_ID [--watch]``: workers, queue, progress and dead letters of one cluster.

Three steps: :func:`gather` makes the calls (what the drain sensor reads, through the same hook) and returns
:class:`StatusFacts`; :func:`assess` is pure (facts in, :class:`StatusReport` out: it runs the sensor's own
``decide`` on the same snapshot); :func:`render` turns the report into text. It never acts (no reaping, no
launching, no writes).

What the figures mean:

- **progress** counts tasks: finished (done or failed) over the job's tasks. The job's tasks are the enqueued
  tasks, plus the work queued again while it runs (a retried message, a redrive), estimated from the queue's
  messages: a redrive adds to both sides, so the bar never passes 100 %. Once the queue is empty (or
  deleted) both sides are exact: the task log's count (one item per message, as the drain's last rounds
  count it) over the enqueued tasks.
- **ETA** is the work left at the rate so far; unknown while messages are held by workers that are gone
  (they come back only when their visibility timeout lapses), and "-" once nothing is left.
- **--watch** ends when the job is finished (queue empty, every enqueued message done or dead-lettered) or
  the cluster is torn down (the teardown's record in META, or queues gone and no instance left).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import ClientError
from ec2cluster_worker import records

from airflow_ec2cluster.aws import error_code
from airflow_ec2cluster.aws.dynamodb import TABLE_NOT_FOUND
from airflow_ec2cluster.aws.sqs import NONEXISTENT_QUEUE_CODES
from airflow_ec2cluster.commands.common import add_connection_arguments, hook_from
from airflow_ec2cluster.cost import CostEstimate, stale_spot_pools, usd_text
from airflow_ec2cluster.defaults import DEFAULT_VISIBILITY_TIMEOUT
from airflow_ec2cluster.drain.decisions import (
    CAPACITY_STATES,
    LIVE_STATES,
    WORKER_STOPPED,
    Decision,
    QueueCounts,
    Snapshot,
    attempts_finished,
    decide,
    eta_text,
)
from airflow_ec2cluster.drain.round import DrainSettings, build_snapshot, cluster_cost, spot_pools_in_use
from airflow_ec2cluster.meta import ClusterMeta
from airflow_ec2cluster.tasklog import dead_letter_errors, messages_finished, tasks_finished

BAR_WIDTH = 30
CLEAR_SCREEN = "\033[H\033[2J"
# A worker holds at most what one ReceiveMessage brings: 10 messages.
MAX_MESSAGES_HELD = 10
ERROR_CHARS = 100
STOP_REASON_CHARS = 60


# -- the calls ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusFacts:
    """Everything ``status`` reads about a cluster; the report is a function of this alone."""

    cluster_id: str
    table: str
    meta: ClusterMeta
    counts: QueueCounts | None  # None: the queues do not exist (deleted, or never created)
    instances: list[dict[str, Any]]  # every state: an ended instance's time is part of the cost
    workers: list[dict[str, Any]]
    now: float
    exact: dict[str, int] | None = None  # the task log's count, made when the queue is empty or gone
    dead_letters: tuple[dict[str, Any], ...] = ()  # [{task_id, error}] of the messages peeked
    dead_letters_peeked: int = 0  # dead-lettered messages peeked
    # Spot prices looked up for pools META holds no price (younger than an hour) for ("type/zone" -> ...).
    spot_prices: dict[str, dict[str, Any]] | None = None


def gather(
    hook: Any, table: str, cluster_id: str, *, dead_letter_limit: int = 20, now: float | None = None
) -> StatusFacts | None:
    """Read the cluster (None when it has no META item).

    A fixed handful of calls, plus, when the queue is empty or gone, the task log's exact count (one Query
    per log shard: this grows with the job, so it is made only at the end, as the drain does) and, with
    dead letters, a peek of at most ``dead_letter_limit`` of them (about a tenth as many receives).
    """
    try:
        meta = hook.get_meta(table, cluster_id)
    except ClientError as error:
        if error_code(error) == TABLE_NOT_FOUND:
            raise ValueError(
                f"state table {table} does not exist (wrong --state-table or --region?)"
            ) from error
        raise
    if meta is None:
        return None
    counts = None
    if meta.queue_url and meta.dlq_url:
        try:
            counts = hook.queue_counts(meta.queue_url, meta.dlq_url)
        except ClientError as error:
            if error_code(error) not in NONEXISTENT_QUEUE_CODES:
                raise
    instances = hook.list_cluster_instances(cluster_id, None)
    workers = hook.worker_statuses(table, cluster_id)
    now = time.time() if now is None else now
    stale = stale_spot_pools(spot_pools_in_use(meta, instances, now), meta.spot_prices, now)
    spot_prices = hook.current_spot_prices(sorted({p.split("/")[0] for p in stale}), now) if stale else {}
    exact = None
    if counts is None or counts.work == 0:
        exact = hook.count_task_log(table, cluster_id, meta.log_shards)
    dead: list[dict[str, Any]] = []
    keys: list[str] = []
    if counts is not None and counts.dead_lettered and dead_letter_limit > 0:
        keys = hook.peek_dead_letters(meta.dlq_url, dead_letter_limit)
        items = hook.task_log_items(table, cluster_id, keys, meta.log_shards) if keys else {}
        dead = dead_letter_errors(keys, items)
    return StatusFacts(
        cluster_id=cluster_id,
        table=table,
        meta=meta,
        counts=counts,
        instances=instances,
        workers=workers,
        now=now,
        exact=exact,
        dead_letters=tuple(dead[: max(dead_letter_limit, 0)]),
        dead_letters_peeked=len(keys),
        spot_prices=spot_prices,
    )


# -- the report (pure) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    facts: StatusFacts
    snapshot: Snapshot
    decision: Decision
    finished: int  # tasks done or failed
    total: int | None  # the job's tasks: enqueued, plus work queued again (see the module docstring)
    exact: bool  # finished (and total) are the task log's exact count
    job_finished: bool
    torn_down: bool
    rate: float | None  # tasks finished per second since the launch
    held_by_stopped: int  # in-flight messages held by workers that are gone (a lower bound, see below)
    held_at_least: bool
    eta: str
    cost: CostEstimate | None = None

    @property
    def queues_gone(self) -> bool:
        return self.facts.counts is None

    @property
    def watch_over(self) -> bool:
        """Nothing more will change without a new launch: ``--watch`` stops."""
        return self.job_finished or self.torn_down


def alive(worker_id: str, snapshot: Snapshot) -> bool:
    """Whether a worker can still run (or hand back) what it holds: instance up, not stopped, beating."""
    states = {i.instance_id: i.state for i in snapshot.instances}
    worker = next((w for w in snapshot.workers if w.worker_id == worker_id), None)
    if states.get(worker_id) not in CAPACITY_STATES:
        return False
    if worker is None:
        return True  # booting
    stale = snapshot.now - worker.heartbeat_at > snapshot.policy.heartbeat_timeout
    return worker.state != WORKER_STOPPED and not stale


def held_by_stopped_workers(snapshot: Snapshot, visibility_timeout: float) -> tuple[int, bool]:
    """(in-flight messages held by workers that are gone, whether that is a lower bound).

    With no live worker, every in-flight message is held by a gone worker until its visibility lapses. With
    live workers, those hold at most ``MAX_MESSAGES_HELD`` each, so the rest is held by gone ones; and each
    worker killed while busy (not a graceful stop: that hands its messages back) within the last visibility
    timeout still holds at least one.
    """
    in_flight = snapshot.counts.in_flight
    if in_flight <= 0:
        return 0, False
    live = [i.instance_id for i in snapshot.instances if alive(i.instance_id, snapshot)]
    if not live:
        return in_flight, False
    killed = sum(
        1
        for w in snapshot.workers
        if w.busy
        and w.state != WORKER_STOPPED
        and not alive(w.worker_id, snapshot)
        and snapshot.now - w.heartbeat_at < visibility_timeout
    )
    held = min(in_flight, max(in_flight - MAX_MESSAGES_HELD * len(live), killed))
    return held, True


def assess(facts: StatusFacts, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT) -> StatusReport:
    """The report from the facts alone. ``visibility_timeout``: how long a killed worker's messages stay
    locked; the workers' own setting is in their configuration, not in META, so the default is assumed."""
    meta = facts.meta
    counts = facts.counts or QueueCounts(0, 0, 0, 0)
    policy = DrainSettings(state_table=facts.table).policy(meta)
    cost = cluster_cost(meta, facts.instances, facts.now, facts.spot_prices).estimate
    live = [i for i in facts.instances if i["State"]["Name"] in LIVE_STATES]
    snapshot = build_snapshot(meta, counts, live, facts.workers, policy, facts.now, cost=cost)
    exact = facts.exact is not None
    if facts.exact is not None:
        snapshot = replace(
            snapshot,
            exact_finished=messages_finished(facts.exact),
            exact_tasks_finished=tasks_finished(facts.exact),
        )
    decision = decide(snapshot)
    enqueued = meta.enqueued
    if facts.exact is not None:
        # The exact count: one task-log item per message, so no retry or redrive counts twice.
        finished = tasks_finished(facts.exact)
        total = None if enqueued is None else max(enqueued, finished)
    else:
        # The workers' counters (and META's high-water) count a retried task again: so does the total.
        # They lag (a worker killed before its heartbeat): messages gone from both queues were deleted,
        # every task in them done, a floor the queue's counts give for free.
        per_message = enqueued / meta.enqueued_messages if enqueued and meta.enqueued_messages else 1.0
        deleted = (meta.enqueued_messages or 0) - counts.work - counts.dead_lettered
        finished = max(attempts_finished(snapshot), round(max(0, deleted) * per_message))
        queued = round(counts.work * per_message)
        total = None if enqueued is None else max(enqueued, finished + queued)

    live_instances = [i for i in snapshot.instances if i.state in CAPACITY_STATES]
    recorded_teardown = meta.torn_down_at is not None and meta.torn_down_at >= (meta.launched_at or 0)
    torn_down = not live_instances and (recorded_teardown or facts.counts is None)
    if facts.counts is None:
        job_finished = True  # the queues are gone: nothing more will run
    else:
        expected = snapshot.expected_messages
        accounted = (snapshot.exact_finished or 0) + counts.dead_lettered
        job_finished = (
            exact
            and counts.work == 0
            and meta.enqueue_finished
            and (expected is None or accounted >= expected)
        )
    held, at_least = held_by_stopped_workers(snapshot, visibility_timeout)
    elapsed = decision.stats["elapsed_s"]
    rate = finished / elapsed if elapsed and elapsed > 0 and finished else None
    if job_finished:
        eta = "-"
    elif torn_down:
        eta = "- (torn down: no worker will run the rest)"
    else:
        eta = eta_text(total, finished, 0, rate, held_by_stopped=held, held_at_least=at_least)
    return StatusReport(
        facts=facts,
        snapshot=snapshot,
        decision=decision,
        finished=finished,
        total=total,
        exact=exact,
        job_finished=bool(job_finished),
        torn_down=torn_down,
        rate=rate,
        held_by_stopped=held,
        held_at_least=at_least,
        eta=eta,
        cost=cost,
    )


# -- the text (pure) ---------------------------------------------------------------------------------------


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_bar(done: int, total: int | None, width: int = BAR_WIDTH) -> str:
    if not total:
        return "[" + "?" * width + "]"
    done = min(done, total)
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / total:5.1f}%"


def one_line(text: str | None, limit: int = ERROR_CHARS) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def worker_rows(snapshot: Snapshot) -> list[tuple[str, ...]]:
    """One row per instance or worker status item: instance, EC2 state, worker state, counters, times."""
    now = snapshot.now
    ec2_state = {i.instance_id: i.state for i in snapshot.instances}
    workers = {w.worker_id: w for w in snapshot.workers}
    rows = []
    for worker_id in sorted(set(ec2_state) | set(workers)):
        worker = workers.get(worker_id)
        if worker is None:
            rows.append((worker_id, ec2_state[worker_id], "booting", "0", "0", "-", "-", "-"))
            continue
        last = None if worker.last_completion_at is None else now - worker.last_completion_at
        if worker.busy:
            idle = f"busy {ago(now - worker.busy_since) if worker.busy_since else ''}".strip()
        else:
            idle = ago(now - worker.last_activity)
        rows.append(
            (
                worker_id,
                ec2_state.get(worker_id, "gone"),
                worker.state,
                str(worker.tasks_done),
                str(worker.tasks_failed),
                "-" if last is None else f"{ago(last)} ago",
                idle,
                one_line(worker.stop_reason, STOP_REASON_CHARS) or "-",
            )
        )
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def progress_text(report: StatusReport) -> str:
    meta, total = report.facts.meta, report.total
    text = f"{report.finished}/{'?' if total is None else total} finished"
    if report.exact and report.facts.exact is not None:
        counted = report.facts.exact
        done, failed = counted[records.TASK_DONE], counted[records.TASK_FAILED]
        text += f" (done {done}, failed {failed}: task log, exact)"
    elif total is not None and meta.enqueued is not None and total > meta.enqueued:
        text += f" ({meta.enqueued} enqueued + {total - meta.enqueued} queued again)"
    return text


def state_line(report: StatusReport) -> str:
    meta = report.facts.meta
    if report.torn_down and meta.torn_down_at is not None:
        return f"torn down {ago(report.facts.now - meta.torn_down_at)} ago ({utc(meta.torn_down_at)})"
    if report.torn_down:
        return "torn down: no instance left and no queues"
    if report.queues_gone:
        return "queues gone: nothing more will run (instances are still up: run the teardown)"
    if report.job_finished:
        return "job finished: the queue is empty and every enqueued message is done or dead-lettered"
    if not meta.enqueue_finished:
        return "enqueue in progress"
    return "running"


def cost_lines(report: StatusReport) -> list[str]:
    """The estimate, the cap, and instance-seconds by instance type, zone and market."""
    cost, max_cost = report.cost, report.facts.meta.max_cost
    if cost is None or not cost.pools:
        return []
    cap = ""
    if max_cost is not None:
        reached = "reached: no replacement or scale-out" if report.snapshot.cost_capped else "not reached"
        cap = f"  max_cost {usd_text(max_cost)} ({reached})"
    rows = [
        (
            p.instance_type or "?",
            p.availability_zone or "?",
            p.market,
            f"{p.instance_seconds:.0f}",
            "?" if p.usd_per_hour is None else f"{p.usd_per_hour:.4f}",
            "unknown (no price)" if p.usd is None else f"{p.usd:.4f}",
        )
        for p in cost.pools
    ]
    header = ("instance type", "zone", "market", "instance-s", "USD/hour", "USD")
    return [f"cost ~{cost.text()} (estimate){cap}", *table(header, rows)]


def render(report: StatusReport) -> str:
    facts, snapshot = report.facts, report.snapshot
    meta, stats = facts.meta, report.decision.stats
    rate = report.rate
    lines = [f"cluster {facts.cluster_id}"]
    lines.append(
        f"progress {progress_bar(report.finished, report.total)}  {progress_text(report)}"
        f"  rate {'-' if not rate else f'{rate * 60:.1f}/min'}"
        f"  elapsed {ago(stats['elapsed_s'])}  ETA {report.eta}"
    )
    counts = facts.counts
    if counts is None:
        deleted = "deleted" if meta.queue_url else "not created"
        lines.append(
            f"queues {deleted}: the dead-letter queue's messages went with them; what the state table "
            "still holds is shown"
        )
    else:
        lines.append(
            f"messages visible {counts.visible}  in flight {counts.in_flight}  delayed {counts.delayed}"
            f"  dead-lettered {counts.dead_lettered}"
        )
    lines.append(f"state {state_line(report)}")
    enqueued = "?" if meta.enqueued is None else meta.enqueued
    lines.append(
        f"META enqueued {enqueued} tasks in {meta.enqueued_messages or '?'} messages;"
        f" instances launched {len(meta.instance_ids)}, replacements {meta.replacements_launched},"
        f" reaped {meta.reaped_total}"
    )
    lines.extend(cost_lines(report))
    log_group = meta.launch_spec.log_group if meta.launch_spec else None
    if log_group:
        lines.append(f"logs {log_group} (CloudWatch Logs; read them: ec2cluster logs {facts.cluster_id})")
    lines.append("")
    header = ("worker", "ec2", "state", "done", "failed", "last completion", "idle for", "stop reason")
    rows = worker_rows(snapshot)
    lines.extend(table(header, rows) if rows else ["no workers"])
    if facts.dead_letters:
        lines.append("")
        lines.append(
            f"dead-lettered tasks ({len(facts.dead_letters)} shown, from {facts.dead_letters_peeked} of"
            f" {counts.dead_lettered if counts else '?'} dead-lettered messages):"
        )
        lines.extend(
            table(
                ("task", "last error"),
                [
                    (d["task_id"], one_line(d["error"]) or "(no task-log record)")
                    for d in sorted(facts.dead_letters, key=lambda d: d["task_id"])
                ],
            )
        )
        lines.append(f"re-drive them with: ec2cluster redrive {facts.cluster_id}")
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a cluster's workers, queue, progress and dead-lettered tasks",
        description="Show a cluster's workers (state, tasks done, last completion, idle time, stop reason), "
        "its queue (visible, in flight, dead-lettered) with a progress bar and ETA, and the dead-lettered "
        "task ids with their last error. After a teardown that deleted the queues, what the state table "
        "still holds. Read-only.",
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--watch", action="store_true", help="refresh until the job is finished or torn down (or Ctrl-C)"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    parser.add_argument(
        "--dead-letters", type=int, default=20, help="dead-lettered tasks to list (default 20, 0 for none)"
    )
    parser.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace) -> int:
    hook = hook_from(args)
    try:
        while True:
            facts = gather(hook, args.state_table, args.cluster_id, dead_letter_limit=args.dead_letters)
            if facts is None:
                print(f"cluster {args.cluster_id} has no META item in {args.state_table}", file=sys.stderr)
                return 1
            report = assess(facts)
            print((CLEAR_SCREEN if args.watch else "") + render(report), flush=True)
            if not args.watch or report.watch_over:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
