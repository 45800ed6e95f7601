"""The redrive's pure parts: which tasks of a dead-lettered message had not finished, which messages to
mark, batches within SQS's limits; and the errors a person reads of the task log."""

from __future__ import annotations

import json

from ec2cluster_worker.messages import REDRIVEN_ATTRIBUTE, group_body, task_body

from airflow_ec2cluster.aws.sqs import (
    REDRIVEN_MARK_BYTES,
    redrive_plan,
    resend_batches,
    resend_params,
)
from airflow_ec2cluster.packing import MAX_MESSAGE_BYTES
from airflow_ec2cluster.tasklog import dead_letter_errors, readable_error


def message(body: str, message_id: str = "m-1") -> dict:
    return {"MessageId": message_id, "ReceiptHandle": f"rh-{message_id}", "Body": body}


def group_item(key: str, entries: dict[str, str]) -> dict:
    return {
        "task_id": key,
        "status": "failed",
        "tasks": [{"task_id": t, "status": s} for t, s in entries.items()],
    }


def test_the_plan_names_each_failing_task_and_marks_only_messages_with_tasks_done():
    messages = [
        message(group_body([("g0", 0), ("g1", 1), ("g2", 2)]), "m-g"),
        message(group_body([("h0", 0), ("h1", 1)]), "m-h"),
        message(task_body("single", 1), "m-s"),
        message("not json", "m-x"),
    ]
    items = {
        "g0": group_item("g0", {"g0": "done", "g1": "failed"}),  # g2 never ran (a stopping worker)
        "h0": group_item("h0", {"h0": "failed", "h1": "failed"}),
        "single": {"task_id": "single", "status": "failed", "error": "ValueError: x"},
    }
    plan = redrive_plan(messages, items)
    assert [(p.failing_task_ids, p.marked) for p in plan] == [
        (("g1", "g2"), True),
        (("h0", "h1"), False),
        (("single",), False),
        (("malformed-m-x",), False),
    ]
    params = resend_params("https://queue", plan)
    assert params["Entries"][0]["MessageAttributes"] == {
        REDRIVEN_ATTRIBUTE: {"DataType": "String", "StringValue": "1"}
    }
    assert all("MessageAttributes" not in entry for entry in params["Entries"][1:])
    assert [entry["MessageBody"] for entry in params["Entries"]] == [m["Body"] for m in messages]


def test_a_message_with_no_room_for_the_mark_goes_unmarked():
    payload = "x" * (MAX_MESSAGE_BYTES - len(group_body([("g0", ""), ("g1", 1)])) - REDRIVEN_MARK_BYTES + 1)
    full = message(group_body([("g0", payload), ("g1", 1)]))
    assert len(full["Body"]) + REDRIVEN_MARK_BYTES == MAX_MESSAGE_BYTES + 1
    [entry] = redrive_plan([full], {"g0": group_item("g0", {"g0": "done", "g1": "failed"})})
    assert not entry.marked and entry.failing_task_ids == ("g1",)


def test_batches_hold_ten_entries_and_one_mebibyte_at_most():
    big = "y" * 400_000
    messages = [message(task_body(f"t{i}", big), f"m{i}") for i in range(5)] + [
        message(task_body(f"s{i}", 1), f"n{i}") for i in range(12)
    ]
    batches = list(resend_batches(redrive_plan(messages, {})))
    assert [len(batch) for batch in batches] == [2, 2, 10, 3]
    assert all(sum(entry.size for entry in batch) <= MAX_MESSAGE_BYTES for batch in batches)
    assert json.loads(batches[0][0].message["Body"])["task_id"] == "t0"


def test_the_controller_shows_an_older_workers_traceback_as_its_last_line():
    old = 'Traceback (most recent call last):\n  File "/tmp/h.py", line 3, in f\nValueError: bad payload 7\n'
    assert readable_error(old) == "ValueError: bad payload 7"
    assert (
        readable_error('...h.py", line 3, in f\n  File "/tmp/h.py", line 9\nKeyError: \'id\'')
        == "KeyError: 'id'"
    )
    assert (
        readable_error("1 of 6 tasks failed; g4: " + old)
        == "1 of 6 tasks failed; g4: ValueError: bad payload 7"
    )
    assert readable_error("ValueError: x") == "ValueError: x" and readable_error(None) is None
    items = {
        "g0": {
            "task_id": "g0",
            "status": "failed",
            "tasks": [
                {"task_id": "g0", "status": "done"},
                {"task_id": "g1", "status": "failed", "error": old},
            ],
        }
    }
    assert dead_letter_errors(["g0"], items) == [{"task_id": "g1", "error": "ValueError: bad payload 7"}]
