"""``ec2cluster status CLUSTER_ID [--watch]``: workers, queue, progress and dead letters of one cluster.

Reads what the drain sensor reads, through the same hook, and runs the same pure ``decide`` for the
progress figures; it never acts (no reaping, no launching).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from airflow_ec2cluster.commands.common import add_connection_arguments, hook_from
from airflow_ec2cluster.drain.decisions import Decision, Snapshot, decide, eta_text, finished_messages
from airflow_ec2cluster.drain.round import DrainSettings, build_snapshot
from airflow_ec2cluster.tasklog import dead_letter_errors

BAR_WIDTH = 30
CLEAR_SCREEN = "\033[H\033[2J"


@dataclass(frozen=True)
class ClusterStatus:
    cluster_id: str
    snapshot: Snapshot
    decision: Decision
    dead_letters: list[dict[str, Any]]

    @property
    def finished(self) -> bool:
        """Queue empty and every enqueued message done, failed or dead-lettered."""
        counts, total = self.snapshot.counts, self.snapshot.expected_messages
        accounted = finished_messages(self.snapshot) + counts.dead_lettered
        return counts.work == 0 and total is not None and accounted >= total


def collect_status(
    hook: Any, table: str, cluster_id: str, *, dead_letter_limit: int = 20
) -> ClusterStatus | None:
    """The cluster as the sensor sees it (same calls), or None when it has no META item."""
    meta = hook.get_meta(table, cluster_id)
    if meta is None or not meta.queue_url:
        return None
    counts = hook.queue_counts(meta.queue_url, meta.dlq_url)
    instances = hook.list_cluster_instances(cluster_id)
    workers = hook.worker_statuses(table, cluster_id)
    policy = DrainSettings(state_table=table).policy(meta)
    snapshot = build_snapshot(meta, counts, instances, workers, policy, time.time())
    dead: list[dict[str, Any]] = []
    if counts.dead_lettered and dead_letter_limit > 0:
        ids = hook.peek_dead_letters(meta.dlq_url, dead_letter_limit)
        items = hook.task_log_items(table, cluster_id, ids, meta.log_shards) if ids else {}
        dead = dead_letter_errors(ids, items)
    return ClusterStatus(cluster_id, snapshot, decide(snapshot), dead)


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
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / total:5.1f}%"


def worker_rows(snapshot: Snapshot) -> list[tuple[str, ...]]:
    """One row per instance or worker status item: instance, EC2 state, worker state, counters, times."""
    now = snapshot.now
    ec2_state = {i.instance_id: i.state for i in snapshot.instances}
    workers = {w.worker_id: w for w in snapshot.workers}
    rows = []
    for worker_id in sorted(set(ec2_state) | set(workers)):
        worker = workers.get(worker_id)
        if worker is None:
            rows.append((worker_id, ec2_state[worker_id], "booting", "0", "0", "-", "-"))
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
            )
        )
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def render_status(status: ClusterStatus) -> str:
    snapshot, stats = status.snapshot, status.decision.stats
    counts, total, finished = snapshot.counts, snapshot.enqueued, status.decision.finished
    rate = stats["rate_per_s"]
    lines = [f"cluster {status.cluster_id}"]
    elapsed = stats["elapsed_s"]
    lines.append(
        f"progress {progress_bar(finished, total)}  {finished}/{'?' if total is None else total} finished"
        f"  rate {'-' if not rate else f'{rate * 60:.1f}/min'}"
        f"  elapsed {ago(elapsed)}  ETA {eta_text(total, finished, counts.dead_lettered, rate)}"
    )
    lines.append(
        f"messages visible {counts.visible}  in flight {counts.in_flight}  delayed {counts.delayed}"
        f"  dead-lettered {counts.dead_lettered}"
    )
    lines.append("")
    header = ("worker", "ec2", "state", "done", "failed", "last completion", "idle for")
    rows = worker_rows(snapshot)
    lines.extend(table(header, rows) if rows else ["no workers"])
    if status.dead_letters:
        lines.append("")
        lines.append(f"dead-lettered tasks ({len(status.dead_letters)} shown of {counts.dead_lettered}):")
        lines.extend(
            table(
                ("task", "last error"),
                [(d["task_id"], one_line(d["error"]) or "(no task-log record)") for d in status.dead_letters],
            )
        )
        lines.append(f"re-drive them with: ec2cluster redrive {status.cluster_id}")
    return "\n".join(lines)


def one_line(text: str | None, limit: int = 100) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a cluster's workers, queue, progress and dead-lettered tasks",
        description="Show a cluster's workers (state, tasks done, last completion, idle time), its queue "
        "(visible, in flight, dead-lettered) with a progress bar and ETA, and the dead-lettered task ids "
        "with their last error. Read-only.",
    )
    add_connection_arguments(parser)
    parser.add_argument("--watch", action="store_true", help="refresh until the cluster is finished (Ctrl-C)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    parser.add_argument(
        "--dead-letters", type=int, default=20, help="dead-lettered tasks to list (default 20, 0 for none)"
    )
    parser.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace) -> int:
    hook = hook_from(args)
    try:
        while True:
            status = collect_status(
                hook, args.state_table, args.cluster_id, dead_letter_limit=args.dead_letters
            )
            if status is None:
                print(f"cluster {args.cluster_id} has no META item in {args.state_table}", file=sys.stderr)
                return 1
            print((CLEAR_SCREEN if args.watch else "") + render_status(status), flush=True)
            if not args.watch or status.finished:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
