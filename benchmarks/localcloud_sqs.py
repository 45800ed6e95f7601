"""``localcloud-sqs``: ReceiveMessage time by queue size, moto as shipped beside the local cloud's speed-up.

Both sides read the very same queue (moto in-process, no HTTP, so the figures are moto's own work): it is
filled with the speed-up applied (moto's own send slows down quadratically as a queue grows), then
received from with the speed-up reverted and applied in turn.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from unittest import mock

import boto3
from ec2cluster_localcloud import sqs_speedup
from moto import mock_aws

from .result import Result

SIZES = {"tiny": (100, 1_000), "full": (100, 2_000, 10_000)}
# What the local cloud promises (README): receives well under 50 ms on a 10,000-message queue.
TARGET_SECONDS = 0.05


def receive_seconds(sqs, url: str, rounds: int) -> float:
    """Median seconds of one ReceiveMessage (10) without deleting: the queue keeps its size."""
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def fill(sqs, url: str, count: int) -> None:
    for start in range(0, count, 10):
        entries = [{"Id": str(i), "MessageBody": json.dumps({"task_id": f"t{start + i}"})} for i in range(10)]
        sqs.send_message_batch(QueueUrl=url, Entries=entries[: count - start])


def localcloud_sqs(size: str) -> Result:
    result = Result("localcloud-sqs", size)
    # In-process moto: a benchmark server's endpoint (shared_server) must not capture these calls.
    with mock.patch.dict(os.environ), mock_aws():
        os.environ.pop("AWS_ENDPOINT_URL", None)
        sqs = boto3.client("sqs", region_name="us-east-1")
        for count in SIZES[size]:
            url = sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:12]}")["QueueUrl"]
            with sqs_speedup.patched():
                fill(sqs, url, count)
                fast = receive_seconds(sqs, url, rounds=5)
            shipped = receive_seconds(sqs, url, rounds=3)
            largest = count == SIZES[size][-1]
            result.add(
                f"ReceiveMessage(10) ms, {count:,} messages",
                round(fast * 1000, 1),
                reference=f"moto as shipped {shipped * 1000:,.1f} ms ({shipped / fast:,.0f}x)",
                target=f"< {TARGET_SECONDS * 1000:.0f} ms" if largest else "",
                met=(fast < TARGET_SECONDS) if largest else None,
            )
    return result
