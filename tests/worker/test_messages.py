"""Parsing task messages: good bodies become TaskMessages, anything else Malformed, never an exception."""

from __future__ import annotations

import json

import pytest
from ec2cluster_worker.messages import (
    MAX_TASKS_PER_MESSAGE,
    REDRIVEN_ATTRIBUTE,
    Malformed,
    TaskMessage,
    group_body,
    parse_message,
    task_body,
)
from hypothesis import given
from hypothesis import strategies as st


def message(body: str, receive_count: str = "1") -> dict:
    return {
        "MessageId": "m-1",
        "ReceiptHandle": "rh-1",
        "Body": body,
        "Attributes": {"ApproximateReceiveCount": receive_count},
    }


def test_a_task():
    parsed = parse_message(message(task_body("t000000042", {"id": 1, "text": ":)"}), "3"))
    assert isinstance(parsed, TaskMessage)
    assert not parsed.grouped and parsed.log_key == "t000000042" and parsed.redelivered
    [task] = parsed.tasks
    assert (task.task_id, task.payload) == ("t000000042", {"id": 1, "text": ":)"})
    assert (parsed.delivery.message_id, parsed.delivery.receipt_handle, parsed.delivery.attempt) == (
        "m-1",
        "rh-1",
        3,
    )


def test_a_message_the_redrive_marked_is_a_redelivery_even_on_its_first_receive():
    # A redriven message is new to SQS (receive count 1): the mark is what says tasks may be logged done.
    marked = message(group_body([("t1", 1), ("t2", 2)]))
    marked["MessageAttributes"] = {REDRIVEN_ATTRIBUTE: {"DataType": "String", "StringValue": "1"}}
    parsed = parse_message(marked)
    assert parsed.delivery.attempt == 1 and parsed.delivery.redriven and parsed.redelivered
    fresh = parse_message(message(group_body([("t1", 1), ("t2", 2)])))
    assert not fresh.delivery.redriven and not fresh.redelivered


@pytest.mark.parametrize("payload", [None, 0, "text", [1, 2], {"nested": {"a": [None]}}])
def test_any_json_payload(payload):
    assert parse_message(message(task_body("a.b:c_d-e", payload))).tasks[0].payload == payload


def test_extra_keys_are_ignored():
    body = json.dumps({"task_id": "t1", "payload": 1, "enqueued_at": 5})
    assert isinstance(parse_message(message(body)), TaskMessage)


def test_a_group_keeps_its_order_and_is_logged_under_its_first_id():
    parsed = parse_message(message(group_body([("t2", {"a": 1}), ("t1", None), ("t3", [1])])))
    assert isinstance(parsed, TaskMessage) and parsed.grouped and not parsed.redelivered
    assert [(t.task_id, t.payload) for t in parsed.tasks] == [("t2", {"a": 1}), ("t1", None), ("t3", [1])]
    assert parsed.log_key == "t2"
    assert {t.delivery for t in parsed.tasks} == {parsed.delivery}


def test_a_group_of_one_is_still_a_group():
    parsed = parse_message(message(group_body([("only", 1)])))
    assert parsed.grouped and len(parsed.tasks) == 1


@pytest.mark.parametrize(
    ("body", "error_part"),
    [
        ("not json", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "JSON list, not an object"),
        ('"text"', "JSON str"),
        ('{"payload": 1}', "no task_id"),
        ('{"task_id": "t1"}', "no payload"),
        ("{}", "no task_id and no payload"),
        ('{"task_id": 5, "payload": 1}', "is not 1-200 characters"),
        ('{"task_id": "", "payload": 1}', "is not 1-200 characters"),
        ('{"task_id": "has space", "payload": 1}', "is not 1-200 characters"),
        (json.dumps({"task_id": "x" * 201, "payload": 1}), "is not 1-200 characters"),
        ('{"task_id": "a/b", "payload": 1}', "is not 1-200 characters"),
    ],
)
def test_malformed_bodies(body, error_part):
    check_malformed(body, error_part)


def check_malformed(body, error_part):
    parsed = parse_message(message(body, "2"))
    assert isinstance(parsed, Malformed)
    assert error_part in parsed.error
    assert parsed.task_id == "malformed-m-1"
    assert parsed.delivery.attempt == 2


@pytest.mark.parametrize(
    ("tasks", "error_part"),
    [
        ([], "not a list of 1-100 task objects"),
        ("t1", "not a list of 1-100 task objects"),
        ([{"task_id": f"t{i}", "payload": i} for i in range(MAX_TASKS_PER_MESSAGE + 1)], "1-100"),
        ([{"task_id": "t1", "payload": 1}, {"task_id": "t1", "payload": 2}], "repeat a task_id"),
        ([{"task_id": "t1", "payload": 1}, {"payload": 2}], "tasks[1] has no task_id"),
        ([{"task_id": "t1", "payload": 1}, "x"], "tasks[1] is a JSON str"),
        ([{"task_id": "bad id", "payload": 1}], "tasks[0]: task_id 'bad id'"),
    ],
)
def test_malformed_groups_are_refused_whole(tasks, error_part):
    check_malformed(json.dumps({"tasks": tasks}), error_part)


def test_missing_receive_count_means_first_attempt():
    raw = message(task_body("t", 1))
    del raw["Attributes"]
    assert parse_message(raw).delivery.attempt == 1


@given(st.text(max_size=300))
def test_no_body_raises(body):
    assert isinstance(parse_message(message(body)), (TaskMessage, Malformed))
