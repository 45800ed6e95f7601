"""Peeking at the dead-letter queue: up to N task-log keys, every message left where it was.

ReceiveMessage returns at most 10 messages a call, so a peek of N messages receives about N/10 times (and
gives them back in as many calls): bounded by the limit asked for, never by the size of the job.

How the messages stay available. A receive hides what it returns for its visibility timeout. The peek hides
them on purpose (``PEEK_VISIBILITY_SECONDS``), so that each receive brings messages the previous ones did
not, then gives every one back with ChangeMessageVisibilityBatch to 0, so a redrive or a status right after
sees them all. The two alternatives fail:

- VisibilityTimeout=0 on every receive leaves the messages visible, so the next receive may bring the same
  ones again (moto always returns the oldest ten; SQS samples its servers): the peek never got past 10.
- A short visibility and no give-back: a redrive started right after polls the queue empty while they are
  hidden, and stops (it stops after two empty polls), leaving them behind.

If the peek dies between the receives and the give-back (the process is killed), the messages come back on
their own after ``PEEK_VISIBILITY_SECONDS``, which only has to outlast the peek itself (a receive each).
The receives long-poll for a second: a short poll samples a subset of SQS's servers and may answer empty
while messages remain; only the last receive of a peek that ends before its limit waits out that second.
"""

from __future__ import annotations

from typing import Any

from airflow_ec2cluster.tasklog import log_key_of

# Entries per ChangeMessageVisibilityBatch, messages per ReceiveMessage.
SQS_BATCH_ENTRIES = 10
PEEK_VISIBILITY_SECONDS = 30
PEEK_WAIT_SECONDS = 1


class DeadLetterPeek:
    """The state of one peek: what to receive next, what was seen, and what to give back.

    The caller loops ``while (params := peek.next_receive()) is not None: peek.add(receive(**params))`` and
    then (in a ``finally``) sends every ``peek.give_back()`` request; ``peek.keys()`` is the answer.
    """

    def __init__(self, dlq_url: str, limit: int) -> None:
        self.dlq_url = dlq_url
        self.limit = max(0, int(limit))
        self._keys: dict[str, str] = {}  # MessageId -> task-log key, in the order received
        self._handles: dict[str, str] = {}  # MessageId -> its latest receipt handle
        self._exhausted = False

    def next_receive(self) -> dict[str, Any] | None:
        """The next ReceiveMessage's arguments, or None when the peek is over."""
        wanted = self.limit - len(self._keys)
        if self._exhausted or wanted <= 0:
            return None
        return {
            "QueueUrl": self.dlq_url,
            "MaxNumberOfMessages": min(SQS_BATCH_ENTRIES, wanted),
            "VisibilityTimeout": PEEK_VISIBILITY_SECONDS,
            "WaitTimeSeconds": PEEK_WAIT_SECONDS,
        }

    def add(self, response: dict[str, Any]) -> None:
        """Take one ReceiveMessage answer; one that brings nothing new ends the peek."""
        new = 0
        for message in response.get("Messages", []):
            message_id = message["MessageId"]
            self._handles[message_id] = message["ReceiptHandle"]
            if message_id not in self._keys:
                self._keys[message_id] = log_key_of(message)
                new += 1
        self._exhausted = new == 0

    def give_back(self) -> list[dict[str, Any]]:
        """ChangeMessageVisibilityBatch arguments making every received message visible again.

        An entry SQS fails comes back by itself after ``PEEK_VISIBILITY_SECONDS``: nothing to retry.
        """
        entries = [
            {"Id": str(index), "ReceiptHandle": handle, "VisibilityTimeout": 0}
            for index, handle in enumerate(self._handles.values())
        ]
        return [
            {"QueueUrl": self.dlq_url, "Entries": entries[start : start + SQS_BATCH_ENTRIES]}
            for start in range(0, len(entries), SQS_BATCH_ENTRIES)
        ]

    def keys(self) -> list[str]:
        return list(self._keys.values())[: self.limit]
