"""The SQS speed-up: its guard, and moto's SQS semantics with and without it (same answers)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError
from ec2cluster_localcloud import sqs_speedup
from moto import mock_aws


@pytest.fixture(params=["moto", "speedup"])
def sqs(request):
    """An in-process mocked SQS client, with moto as shipped or with the speed-up applied."""
    assert not sqs_speedup.is_applied(), "the speed-up must never be applied outside an explicit scope"
    with mock_aws():
        if request.param == "speedup":
            with sqs_speedup.patched():
                yield boto3.client("sqs", region_name="us-east-1")
        else:
            yield boto3.client("sqs", region_name="us-east-1")
    assert not sqs_speedup.is_applied()


def new_queue(sqs, **attributes) -> str:
    return sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:12]}", Attributes=attributes)["QueueUrl"]


def send(sqs, url: str, count: int, **extra) -> None:
    for start in range(0, count, 10):
        entries = [
            {"Id": str(i), "MessageBody": json.dumps({"task_id": f"t{start + i}"}), **extra}
            for i in range(min(10, count - start))
        ]
        assert not sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")


def counts(sqs, url: str) -> tuple[int, int, int]:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        int(attributes["ApproximateNumberOfMessagesDelayed"]),
    )


def receive(sqs, url: str, count: int = 10, visibility: int = 60) -> list[dict]:
    return sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=count, VisibilityTimeout=visibility, AttributeNames=["All"]
    ).get("Messages", [])


# The guard


def test_guard_passes_on_the_pinned_moto():
    import moto

    assert moto.__version__ == sqs_speedup.PINNED_MOTO_VERSION
    sqs_speedup.check_moto()


def test_guard_refuses_a_changed_function(monkeypatch):
    from moto.sqs.models import Queue

    original = Queue.__dict__["messages"]
    monkeypatch.setitem(sqs_speedup.EXPECTED_SOURCE_HASHES, "Queue.messages", "0" * 16)
    with pytest.raises(sqs_speedup.SqsSpeedupMismatch, match="Queue.messages"):
        sqs_speedup.apply()
    assert not sqs_speedup.is_applied()
    assert Queue.__dict__["messages"] is original


def test_guard_refuses_another_moto_version(monkeypatch):
    import moto

    monkeypatch.setattr(moto, "__version__", "5.3.0")
    with pytest.raises(sqs_speedup.SqsSpeedupMismatch, match="5.3.0"):
        sqs_speedup.check_moto()


def test_not_applied_on_import():
    code = (
        "import ec2cluster_localcloud, ec2cluster_localcloud.server\n"
        "from ec2cluster_localcloud import sqs_speedup\n"
        "from moto.sqs.models import Queue\n"
        "assert not sqs_speedup.is_applied()\n"
        "assert Queue.__dict__['messages'].fget.__module__ == 'moto.sqs.models'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_apply_and_revert_restore_moto():
    from moto.sqs.models import Queue, SQSBackend

    before = (Queue.__dict__["delete_message"], SQSBackend.__dict__["send_message"])
    with sqs_speedup.patched():
        assert Queue.__dict__["delete_message"] is not before[0]
        sqs_speedup.check_moto()  # hashes what it replaced, so still passes while applied
    assert (Queue.__dict__["delete_message"], SQSBackend.__dict__["send_message"]) == before


# Semantics, identical with and without the speed-up


def test_receive_delete_and_counts(sqs):
    url = new_queue(sqs)
    send(sqs, url, 25)
    assert counts(sqs, url) == (25, 0, 0)
    first = receive(sqs, url)
    second = receive(sqs, url)
    assert len(first) == len(second) == 10
    assert not {m["MessageId"] for m in first} & {m["MessageId"] for m in second}
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in first} == {"1"}
    assert counts(sqs, url) == (5, 20, 0)
    entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(first)]
    answer = sqs.delete_message_batch(QueueUrl=url, Entries=entries)
    assert len(answer["Successful"]) == 10 and not answer.get("Failed")
    assert counts(sqs, url) == (5, 10, 0)
    # Deleting again is harmless; an unknown handle fails.
    assert not sqs.delete_message_batch(QueueUrl=url, Entries=entries[:1]).get("Failed")
    bad = sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": "x", "ReceiptHandle": "not-a-handle"}])
    assert bad["Failed"][0]["Code"] == "ReceiptHandleIsInvalid"


def test_visibility_changes_and_old_receipt_handles(sqs):
    url = new_queue(sqs)
    send(sqs, url, 3)
    messages = receive(sqs, url)
    assert len(messages) == 3 and receive(sqs, url) == []
    entries = [
        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
        for i, m in enumerate(messages)
    ]
    assert not sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries).get("Failed")
    again = receive(sqs, url)
    assert {m["MessageId"] for m in again} == {m["MessageId"] for m in messages}
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in again} == {"2"}
    # Extending the visibility of a held message keeps it hidden.
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=again[0]["ReceiptHandle"], VisibilityTimeout=300
    )
    assert counts(sqs, url) == (0, 3, 0)
    # moto accepts a message's earlier receipt handle for deletion.
    sqs.delete_message(QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"])
    assert counts(sqs, url) == (0, 2, 0)
    with pytest.raises(ClientError, match="ReceiptHandleIsInvalid"):
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle="nope", VisibilityTimeout=10)
    with pytest.raises(ClientError, match="43200"):
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=again[1]["ReceiptHandle"], VisibilityTimeout=43201
        )


def test_expired_visibility_makes_a_message_visible_again(sqs):
    url = new_queue(sqs)
    send(sqs, url, 1)
    assert len(receive(sqs, url, visibility=1)) == 1
    assert counts(sqs, url) == (0, 1, 0)
    time.sleep(1.1)
    assert counts(sqs, url) == (1, 0, 0)
    assert receive(sqs, url)[0]["Attributes"]["ApproximateReceiveCount"] == "2"


def test_delayed_messages(sqs):
    url = new_queue(sqs)
    send(sqs, url, 2, DelaySeconds=1)
    assert counts(sqs, url) == (0, 0, 2)
    assert receive(sqs, url) == []
    time.sleep(1.1)
    assert counts(sqs, url) == (2, 0, 0)
    assert len(receive(sqs, url)) == 2


def test_redrive_to_the_dead_letter_queue(sqs):
    dlq_url = new_queue(sqs)
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = new_queue(sqs, RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}))
    send(sqs, url, 2)
    for _ in range(2):
        held = receive(sqs, url)
        assert len(held) == 2
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(held)
        ]
        assert not sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries).get("Failed")
    assert receive(sqs, url) == []  # both received twice: moved, not delivered
    assert counts(sqs, url) == (0, 0, 0)
    assert counts(sqs, dlq_url) == (2, 0, 0)
    dead = receive(sqs, dlq_url)
    assert len(dead) == 2
    sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=dead[0]["ReceiptHandle"])
    assert counts(sqs, dlq_url) == (0, 1, 0)


def test_purge(sqs):
    url = new_queue(sqs)
    send(sqs, url, 12)
    held = receive(sqs, url)
    sqs.purge_queue(QueueUrl=url)
    assert counts(sqs, url) == (0, 0, 0)
    with pytest.raises(ClientError, match="ReceiptHandleIsInvalid"):
        sqs.delete_message(QueueUrl=url, ReceiptHandle=held[0]["ReceiptHandle"])
    send(sqs, url, 1)
    assert len(receive(sqs, url)) == 1


def test_a_large_queue_is_served_fast_with_the_speedup():
    from moto.sqs.models import sqs_backends

    with mock_aws(), sqs_speedup.patched():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = new_queue(sqs)
        name = url.rsplit("/", 1)[1]
        backend = sqs_backends["123456789012"]["us-east-1"]
        for i in range(5000):
            backend.send_message(name, json.dumps({"task_id": f"t{i}"}))
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            messages = receive(sqs, url)
            timings.append(time.perf_counter() - started)
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            assert not sqs.delete_message_batch(QueueUrl=url, Entries=entries).get("Failed")
        assert counts(sqs, url) == (4950, 0, 0)
        # moto as shipped takes seconds per ReceiveMessage at this size.
        assert min(timings) < 0.25, timings


def test_concurrent_deletes_and_sends_lose_nothing():
    """The threaded server deletes and sends from many threads at once: no message may come back or vanish."""
    from concurrent.futures import ThreadPoolExecutor

    with mock_aws(), sqs_speedup.patched():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = new_queue(sqs)
        send(sqs, url, 600)
        held = [m for _ in range(60) for m in receive(sqs, url, visibility=300)]
        assert len(held) == 600
        batches = [held[i : i + 10] for i in range(0, len(held), 10)]

        def delete(batch: list[dict]) -> None:
            client = boto3.client("sqs", region_name="us-east-1")
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
            assert not client.delete_message_batch(QueueUrl=url, Entries=entries).get("Failed")

        def send_more() -> None:
            send(boto3.client("sqs", region_name="us-east-1"), url, 10)

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(delete, batch) for batch in batches]
            futures += [pool.submit(send_more) for _ in range(20)]
            for future in futures:
                future.result()
        assert counts(sqs, url) == (200, 0, 0)
