"""The enqueue's send engine: messages into SendMessageBatch requests, several in flight, with a resume point.

``send_messages`` packs messages into batches (:func:`message_batches`: 10 entries and 1 MiB a request),
keeps ``concurrency`` requests in flight on a thread pool, resends the entries SQS failed on its side, and
reports how many messages are sent without a gap from the start (:class:`SendProgress`), so that an
interrupted enqueue can resume. ``EC2ClusterHook.send_messages`` is this with the hook's SQS client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from airflow_ec2cluster.aws.sqs import SQS_BATCH_ENTRIES
from airflow_ec2cluster.defaults import DEFAULT_SEND_CONCURRENCY
from airflow_ec2cluster.packing import (
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    OutgoingMessage,
    message_size_problem,
)

# Resend entries SQS reported as failed on its side (not the sender's fault) at most this many times.
FAILED_ENTRY_RESENDS = 2


class SendFailed(RuntimeError):
    """SQS refused some entries of a SendMessageBatch."""


def message_batches(messages: Iterable[OutgoingMessage]) -> Iterator[list[OutgoingMessage]]:
    """Group messages into SendMessageBatch requests: at most 10 entries and 1 MiB per request."""
    batch: list[OutgoingMessage] = []
    batch_bytes = 0
    for message in messages:
        size = len(message.body.encode("utf-8"))
        if size > MAX_MESSAGE_BYTES:  # packing refuses these first; this guards other callers' messages
            raise MessageTooLarge(message_size_problem(message))
        if batch and (len(batch) == SQS_BATCH_ENTRIES or batch_bytes + size > MAX_MESSAGE_BYTES):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(message)
        batch_bytes += size
    if batch:
        yield batch


class SendProgress:
    """Messages (and the tasks in them) sent without a gap from the start, as batches finish in any order."""

    def __init__(self) -> None:
        self.contiguous = 0
        self.contiguous_tasks = 0
        self._ends: dict[int, tuple[int, int]] = {}
        self._next = 0

    def batch_done(self, index: int, end: int, end_tasks: int) -> bool:
        """Record batch ``index`` (ending at message ``end``, task ``end_tasks``); True if the count moved."""
        self._ends[index] = (end, end_tasks)
        moved = False
        while self._next in self._ends:
            self.contiguous, self.contiguous_tasks = self._ends.pop(self._next)
            self._next += 1
            moved = True
        return moved


def send_messages(
    sqs: Any,
    queue_url: str,
    messages: Iterable[OutgoingMessage],
    *,
    concurrency: int = DEFAULT_SEND_CONCURRENCY,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Send messages with SendMessageBatch on client ``sqs``, ``concurrency`` requests at a time.

    Returns the count sent. ``on_progress(n, tasks)`` is called (in this thread) whenever the first ``n``
    messages of ``messages`` (holding ``tasks`` tasks) are all known to be sent, so a caller can record a
    resume point. When a message is refused, or the iterable raises, the requests already started finish,
    progress is reported, and the error is raised.
    """
    progress = SendProgress()
    pending: dict[Future, tuple[int, int, int]] = {}
    error: BaseException | None = None

    def collect(done: Iterable[Future]) -> None:
        nonlocal error
        moved = False
        for future in done:
            index, end, end_tasks = pending.pop(future)
            if future.exception() is not None:
                error = error or future.exception()
            else:
                moved = progress.batch_done(index, end, end_tasks) or moved
        if moved and on_progress is not None:
            on_progress(progress.contiguous, progress.contiguous_tasks)

    end = end_tasks = 0
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sqs-send") as pool:
        try:
            for index, batch in enumerate(message_batches(messages)):
                if error is not None:
                    break
                end += len(batch)
                end_tasks += sum(message.task_count for message in batch)
                pending[pool.submit(send_batch, sqs, queue_url, batch)] = (index, end, end_tasks)
                if len(pending) >= 2 * concurrency:
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
        except BaseException as raised:
            error = raised
        collect(wait(pending).done)
    if error is not None:
        raise error
    return progress.contiguous


def send_batch(sqs: Any, queue_url: str, batch: list[OutgoingMessage]) -> None:
    """One SendMessageBatch; entries failed on SQS's side are resent, a sender fault raises SendFailed."""
    entries = {str(i): message for i, message in enumerate(batch)}
    for _ in range(1 + FAILED_ENTRY_RESENDS):
        response = sqs.send_message_batch(**send_batch_params(queue_url, entries))
        failed = response.get("Failed", [])
        if not failed:
            return
        sender_faults = [f for f in failed if f.get("SenderFault")]
        if sender_faults:
            raise SendFailed(describe_failures(sender_faults, entries))
        # SQS-side failures: resend just those entries (botocore already retried the call itself).
        entries = {f["Id"]: entries[f["Id"]] for f in failed}
    raise SendFailed(describe_failures(failed, entries))


def send_batch_params(queue_url: str, entries: dict[str, OutgoingMessage]) -> dict[str, Any]:
    return {
        "QueueUrl": queue_url,
        "Entries": [{"Id": key, "MessageBody": message.body} for key, message in entries.items()],
    }


def describe_failures(failed: list[dict[str, Any]], entries: dict[str, OutgoingMessage]) -> str:
    shown = [
        f"{entries[f['Id']].task_id}: {f.get('Code')} {f.get('Message', '')}".strip()
        for f in failed[:5]
        if f["Id"] in entries
    ]
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f"SQS refused {len(failed)} message(s): {'; '.join(shown)}{more}"
