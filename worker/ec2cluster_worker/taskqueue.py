"""The task queue's calls the loop makes: long-poll receive (of as many messages as ``sizing.receive_size``
says), delete of finished messages, and (only when an idle worker is about to stop,
``stop_when_queue_empty``) one read of the queue's counts."""

from __future__ import annotations

from typing import Any

from .messages import REDRIVEN_ATTRIBUTE, Delivery
from .visibility import chunks


class TaskQueue:
    def __init__(self, sqs: Any, queue_url: str) -> None:
        self.sqs = sqs
        self.queue_url = queue_url

    def receive(
        self, *, max_messages: int, wait_time_seconds: int, visibility_timeout: int
    ) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait_time_seconds,
            # Set here, so the worker knows when each message's visibility ends without asking the queue.
            VisibilityTimeout=visibility_timeout,
            AttributeNames=["ApproximateReceiveCount"],
            # The redrive's mark (messages.py): asked for in the same call, so it costs no request.
            MessageAttributeNames=[REDRIVEN_ATTRIBUTE],
        )
        return response.get("Messages", [])

    def waiting(self) -> int:
        """Messages a receive could still bring: ApproximateNumberOfMessages (visible) plus ...Delayed (sent
        with a delay, visible later), in one GetQueueAttributes call. Messages in flight are not counted:
        they are held by workers, and come back to the queue (for the controller to launch a worker) only
        if theirs dies."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"]
        response = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=names)
        attributes = response.get("Attributes", {})
        return sum(int(attributes.get(name, 0)) for name in names)

    def delete(self, deliveries: list[Delivery]) -> list[dict[str, Any]]:
        """DeleteMessageBatch in chunks of 10; returns the Failed entries (with MessageId added)."""
        failed: list[dict[str, Any]] = []
        for chunk in chunks(deliveries):
            by_id = {f"m{index}": delivery for index, delivery in enumerate(chunk)}
            response = self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": entry_id, "ReceiptHandle": d.receipt_handle} for entry_id, d in by_id.items()
                ],
            )
            for failure in response.get("Failed", []):
                failed.append({**failure, "MessageId": by_id[failure["Id"]].message_id})
        return failed
