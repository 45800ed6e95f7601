"""CloudWatch Logs: the cluster's log group (requests), and reading the workers' lines back (pure).

Each worker ships its log lines (JSON, ``ec2cluster_worker.logs``) to the cluster's log group, one stream
per worker (``ec2cluster_worker.cloudwatch``). The controller makes the group at launch, with a retention;
the drain shows failed tasks' errors from it as they happen (:func:`next_failures`: one FilterLogEvents
per round, a bounded number shown); ``ec2cluster logs`` reads it. A worker writes these lines: they are
shown, never acted on (the drain's decisions read the task log and status items only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from airflow_ec2cluster.cluster import TAG_CLUSTER_ID

# PutRetentionPolicy's retentionInDays must be one of these.
RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip
LOGS_SERVICE = "logs"  # botocore's name, and the VPC endpoint's: com.amazonaws.<region>.logs
ALREADY_EXISTS = "ResourceAlreadyExistsException"
NOT_FOUND = "ResourceNotFoundException"
# A task fails in its handler (task.failed) or after it, when its result cannot be stored
# (task.output_failed): the workers count both as failed, so the drain shows both.
FAILED_TASK_EVENTS = ("task.failed", "task.output_failed")
FAILED_TASK_PATTERN = "{ " + " || ".join(f'$.event = "{event}"' for event in FAILED_TASK_EVENTS) + " }"
# The drain: at most this many failed tasks' errors a round, and a look back this far for lines that
# reached CloudWatch late (a worker sends every 5 s; another worker's may come after a newer one's).
FAILURES_PER_ROUND = 5
LOOKBACK_MS = 60_000
MAX_SHOWN_REMEMBERED = 200
FILTER_PAGES = 3  # FilterLogEvents may answer a page short of the limit, with a token: follow at most this
DETAIL_LINES = 30  # a traceback's last lines in the drain's log (the whole of it: ``ec2cluster logs``)


def retention_problems(days: Any) -> list[str]:
    """Why ``log_retention_days`` cannot be used ([] when it can; None turns CloudWatch Logs off)."""
    if days is None:
        return []
    if isinstance(days, str) and days.strip().isdigit():  # a rendered template
        days = int(days)
    if isinstance(days, bool) or not isinstance(days, int) or days not in RETENTION_DAYS:
        allowed = ", ".join(str(d) for d in RETENTION_DAYS)
        return [
            f"log_retention_days: {days!r} is not a retention CloudWatch Logs offers; use one of {allowed} "
            "(or None to keep the workers' logs on their consoles only)"
        ]
    return []


def create_log_group_params(log_group: str, cluster_id: str, extra_tags: dict[str, str]) -> dict[str, Any]:
    return {"logGroupName": log_group, "tags": {**extra_tags, TAG_CLUSTER_ID: cluster_id}}


def retention_params(log_group: str, days: int) -> dict[str, Any]:
    return {"logGroupName": log_group, "retentionInDays": int(days)}


def filter_params(
    log_group: str,
    *,
    start_ms: int | None = None,
    pattern: str | None = None,
    streams: list[str] | None = None,
    limit: int | None = None,
    next_token: str | None = None,
) -> dict[str, Any]:
    """FilterLogEvents arguments (events of every stream, in time order)."""
    params: dict[str, Any] = {"logGroupName": log_group, "interleaved": True}
    if start_ms:
        params["startTime"] = int(start_ms)
    if pattern:
        params["filterPattern"] = pattern
    if streams:
        params["logStreamNames"] = list(streams)
    if limit:
        params["limit"] = int(limit)
    if next_token:
        params["nextToken"] = next_token
    return params


def task_pattern(task_id: str) -> str:
    """The lines about one task (task ids are ``[A-Za-z0-9_.:-]``: nothing to escape)."""
    return f'{{ $.task_id = "{task_id}" }}'


@dataclass(frozen=True)
class LogCursor:
    """Where the drain's reading of failed tasks stands: from ``read_from`` (ms) on, less the events
    already shown (event id -> timestamp, those within ``LOOKBACK_MS`` of it); ``failures_shown`` counts
    every failure shown so far (a round reads only while the workers count more)."""

    read_from: int = 0
    shown: dict[str, int] = field(default_factory=dict)
    failures_shown: int = 0

    def start_ms(self) -> int:
        return max(0, self.read_from - LOOKBACK_MS) if self.read_from else 0

    def limit(self) -> int:
        """Enough for the events shown within the look-back, this round's new ones, and one to say more."""
        return len(self.shown) + FAILURES_PER_ROUND + 1


def next_failures(
    events: list[dict[str, Any]], cursor: LogCursor, now_ms: int
) -> tuple[list[dict[str, Any]], LogCursor, bool]:
    """The failed-task events to show this round (the oldest not yet shown, at most FAILURES_PER_ROUND),
    the cursor after them, and whether more are waiting. The cursor never passes ``now_ms``: a worker's
    clock (or its lines) cannot hide later failures."""
    new = [e for e in events if str(e.get("eventId")) not in cursor.shown and is_failed_task(e)]
    shown, more = new[:FAILURES_PER_ROUND], len(new) > FAILURES_PER_ROUND
    if not shown:
        return [], cursor, more
    read_from = min(max(cursor.read_from, max(int(e["timestamp"]) for e in shown)), now_ms)
    remembered = {**cursor.shown, **{str(e["eventId"]): int(e["timestamp"]) for e in shown}}
    kept = {i: t for i, t in remembered.items() if t >= read_from - LOOKBACK_MS}
    newest = dict(sorted(kept.items(), key=lambda item: item[1])[-MAX_SHOWN_REMEMBERED:])
    return shown, LogCursor(read_from, newest, cursor.failures_shown + len(shown)), more


def parsed(event: dict[str, Any]) -> dict[str, Any] | None:
    """An event's JSON line (a worker's ``EventLog`` line), or None when it is not one."""
    try:
        line = json.loads(event.get("message") or "")
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def is_failed_task(event: dict[str, Any]) -> bool:
    line = parsed(event)
    return line is not None and line.get("event") in FAILED_TASK_EVENTS


def failure_text(event: dict[str, Any], detail_lines: int = DETAIL_LINES) -> str:
    """A failed task's error as the drain's log shows it: which task, where, the error, the traceback's
    last lines."""
    line = parsed(event) or {}
    where = line.get("worker_id") or event.get("logStreamName") or "?"
    if line.get("event") == "task.output_failed":  # the handler ran; its result could not be stored
        head = f"Task {line.get('task_id', '?')} failed on {where}: its result was not stored: "
    else:
        head = f"Task {line.get('task_id', '?')} failed on {where} (attempt {line.get('attempt', '?')}): "
    text = head + str(line.get("error") or event.get("message") or "")
    detail = str(line.get("detail") or "").rstrip()
    if detail:
        lines = detail.splitlines()
        if len(lines) > detail_lines:
            lines = [f"... ({len(lines) - detail_lines} lines above)", *lines[-detail_lines:]]
        text += "\n    " + "\n    ".join(lines)
    return text


def event_text(event: dict[str, Any]) -> str:
    """One event as ``ec2cluster logs`` prints it: stream, then the line (a traceback unfolded)."""
    line = parsed(event)
    stream = event.get("logStreamName", "")
    if line is None:
        return f"{stream} {event.get('message', '')}"
    detail = line.pop("detail", None)
    text = f"{stream} {json.dumps(line, separators=(',', ':'))}"
    if detail:
        text += "\n    " + "\n    ".join(str(detail).rstrip().splitlines())
    return text


@dataclass(frozen=True)
class FailuresRead:
    """What one round read of the failed-task events: the events, or why none could be read."""

    events: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


def failures_params(log_group: str, cursor: LogCursor, next_token: str | None = None) -> dict[str, Any]:
    """FilterLogEvents arguments for the drain: failed tasks' events from the cursor on."""
    return filter_params(
        log_group,
        start_ms=cursor.start_ms(),
        pattern=FAILED_TASK_PATTERN,
        limit=cursor.limit(),
        next_token=next_token,
    )


def read_more(
    events: list[dict[str, Any]], page: dict[str, Any], cursor: LogCursor, pages: int
) -> str | None:
    """After a page: the token of the next one to read this round, or None (enough, or the last page)."""
    events.extend(page.get("events", []))
    token = page.get("nextToken")
    return token if token and len(events) < cursor.limit() and pages < FILTER_PAGES else None
