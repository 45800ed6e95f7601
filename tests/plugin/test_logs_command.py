"""``ec2cluster logs``: the workers' lines from the cluster's CloudWatch Logs group, a traceback unfolded."""

from __future__ import annotations

import json
import time
import uuid

import boto3
import pytest

from airflow_ec2cluster.cli import main
from airflow_ec2cluster.cluster import log_group_name
from airflow_ec2cluster.commands import logs as logs_command
from airflow_ec2cluster.commands.logs import unseen

REGION = "us-east-1"
TRACEBACK = 'Traceback (most recent call last):\n  File "handlers.py", line 9, in run\nValueError: bad 7'


# `main` points logging at this test's captured stderr (closed after it): put it back for later tests.
pytestmark = pytest.mark.usefixtures("logging_restored")


def put(client, group: str, stream: str, lines: list[dict]) -> None:
    now = int(time.time() * 1000)
    client.put_log_events(
        logGroupName=group,
        logStreamName=stream,
        logEvents=[{"timestamp": now + n, "message": json.dumps(line)} for n, line in enumerate(lines)],
    )


def a_cluster_with_logs() -> tuple[str, object]:
    cluster = f"logs-{uuid.uuid4().hex[:8]}"
    client = boto3.client("logs", region_name=REGION)
    group = log_group_name(cluster)
    client.create_log_group(logGroupName=group)
    for stream in ("i-1", "i-2"):
        client.create_log_stream(logGroupName=group, logStreamName=stream)
    put(client, group, "i-1", [{"event": "task.done", "task_id": "t-ok", "worker_id": "i-1"}])
    put(
        client,
        group,
        "i-2",
        [
            {"event": "worker.running", "worker_id": "i-2"},
            {"event": "task.failed", "task_id": "t-bad", "error": "ValueError: bad 7", "detail": TRACEBACK},
        ],
    )
    return cluster, client


def test_prints_every_line_one_instances_or_one_tasks(aws_endpoint, capsys):
    cluster, _ = a_cluster_with_logs()
    assert main(["logs", cluster]) == 0
    out = capsys.readouterr().out
    assert '"task_id":"t-ok"' in out and '"event":"worker.running"' in out
    # A failed task's traceback, readable below its line.
    assert '    File "handlers.py", line 9, in run\n    ValueError: bad 7' in out

    assert main(["logs", cluster, "--instance", "i-1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'i-1 {"event":"task.done","task_id":"t-ok","worker_id":"i-1"}'
    ]
    assert main(["logs", cluster, "--task", "t-bad"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].startswith('i-2 {"event":"task.failed","task_id":"t-bad"')
        and lines[-1] == "    ValueError: bad 7"
    )


def test_follow_prints_new_lines_once(aws_endpoint, capsys, monkeypatch):
    cluster, client = a_cluster_with_logs()
    reads = []

    def next_read(seconds: float) -> None:  # between reads: a new line arrives, then Ctrl-C
        reads.append(seconds)
        if len(reads) == 1:
            put(client, log_group_name(cluster), "i-1", [{"event": "task.done", "task_id": "t-new"}])
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(logs_command.time, "sleep", next_read)
    assert main(["logs", cluster, "--follow", "--interval", "2"]) == 0
    out = capsys.readouterr().out
    assert reads == [2.0, 2.0]
    assert out.count('"task_id":"t-ok"') == 1 and out.count('"task_id":"t-new"') == 1


def test_a_cluster_without_a_log_group_says_why(aws_endpoint, capsys):
    assert main(["logs", f"none-{uuid.uuid4().hex[:8]}"]) == 1
    assert "no CloudWatch Logs group /ec2cluster/none-" in capsys.readouterr().err


def test_unseen_remembers_a_lookback_of_printed_ids():
    events = [{"eventId": "a", "timestamp": 0}, {"eventId": "b", "timestamp": 120_000}]
    new, seen = unseen(events, {})
    assert [e["eventId"] for e in new] == ["a", "b"] and seen == {"b": 120_000}
    assert unseen(events[1:], seen)[0] == []
