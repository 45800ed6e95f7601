"""Parsing task messages: good bodies become Tasks, anything else a Malformed value, never an exception."""

from __future__ import annotations

import json

import pytest
from ec2cluster_worker.messages import Malformed, Task, parse_message, task_body
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
    assert isinstance(parsed, Task)
    assert (parsed.task_id, parsed.payload) == ("t000000042", {"id": 1, "text": ":)"})
    assert (parsed.delivery.message_id, parsed.delivery.receipt_handle, parsed.delivery.attempt) == (
        "m-1",
        "rh-1",
        3,
    )


@pytest.mark.parametrize("payload", [None, 0, "text", [1, 2], {"nested": {"a": [None]}}])
def test_any_json_payload(payload):
    assert parse_message(message(task_body("a.b:c_d-e", payload))).payload == payload


def test_extra_keys_are_ignored():
    body = json.dumps({"task_id": "t1", "payload": 1, "enqueued_at": 5})
    assert isinstance(parse_message(message(body)), Task)


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
    parsed = parse_message(message(body, "2"))
    assert isinstance(parsed, Malformed)
    assert error_part in parsed.error
    assert parsed.task_id == "malformed-m-1"
    assert parsed.delivery.attempt == 2


def test_missing_receive_count_means_first_attempt():
    raw = message(task_body("t", 1))
    del raw["Attributes"]
    assert parse_message(raw).delivery.attempt == 1


@given(st.text(max_size=300))
def test_no_body_raises(body):
    assert isinstance(parse_message(message(body)), (Task, Malformed))
