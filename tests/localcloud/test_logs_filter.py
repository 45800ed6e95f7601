"""The local cloud's CloudWatch Logs answers FilterLogEvents with a JSON pattern as AWS does."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from ec2cluster_localcloud.logs_filter import PatternError, matches, parse

from airflow_ec2cluster.aws.logs import FAILED_TASK_PATTERN


def line(**fields) -> str:
    return json.dumps(fields)


def test_json_patterns_select_by_field():
    assert matches('{ $.event = "task.failed" }', line(event="task.failed", task_id="t1"))
    assert not matches('{ $.event = "task.failed" }', line(event="task.done"))
    assert not matches('{ $.event = "task.failed" }', "task.failed, but not JSON")
    assert matches('{ $.task_id = "t-*" }', line(task_id="t-7"))
    assert matches('{ $.a.b = 3 && $.c != "x" }', line(a={"b": 3}, c="y"))
    assert not matches('{ $.a.b = 3 && $.c != "x" }', line(a={"b": 3}, c="x"))
    assert matches('{ $.c = "x" || $.d = true }', line(d=True))
    assert not matches("{ $.n = 3 }", line(n="3"))
    with pytest.raises(PatternError):
        parse("{ $.event ~ 3 }")


def test_the_servers_filter_log_events_honours_them(aws_endpoint):
    logs = boto3.client("logs", region_name="us-east-1")
    group = f"/ec2cluster/filter-{time.time_ns()}"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="i-1")
    now = int(time.time() * 1000)
    messages = [
        line(event="task.done", task_id="a"),
        line(event="task.failed", task_id="b"),
        "plain text",
        line(event="task.output_failed", task_id="c"),
    ]
    logs.put_log_events(
        logGroupName=group,
        logStreamName="i-1",
        logEvents=[{"timestamp": now + n, "message": m} for n, m in enumerate(messages)],
    )
    found = logs.filter_log_events(logGroupName=group, filterPattern='{ $.event = "task.failed" }')
    assert [json.loads(e["message"])["task_id"] for e in found["events"]] == ["b"]
    assert len(logs.filter_log_events(logGroupName=group, filterPattern='"plain"')["events"]) == 1
    # The drain's own pattern: both ways a task fails.
    drains = logs.filter_log_events(logGroupName=group, filterPattern=FAILED_TASK_PATTERN)
    assert [json.loads(e["message"])["task_id"] for e in drains["events"]] == ["b", "c"]
