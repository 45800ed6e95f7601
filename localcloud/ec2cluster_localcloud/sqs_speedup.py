"""A narrowly scoped speed-up of moto 5.2.5's SQS, applied only inside the local cloud's server process.

Why moto's SQS gets slow as a queue grows (cProfile on a queue of a few thousand messages):

1. The clock. ``Message.visible`` and ``Message.delayed`` each read ``unix_time_millis()`` (a datetime
   subtraction, ~1 µs), and ``Queue.messages`` calls both for every message of the queue.
2. ``is_message_valid_based_on_retention_period``, run for every message a ReceiveMessage returns, reads
   the retention period through ``get_queue_attributes``, which builds ``Queue.attributes`` three times;
   each build counts the queue's visible, in-flight and delayed messages (four clock reads per message).
   So one ReceiveMessage of 10 messages reads the clock ~120 times per message in the queue.
3. ``send_message`` builds ``Queue.attributes`` (the same three full counts) for every message sent, to
   read ContentBasedDeduplication: filling a queue is quadratic.
4. ``Queue.delete_message`` and ``change_message_visibility`` find a message by receipt handle with two
   linear scans that build a list per message. ``delete_message`` then rebuilds the message list and
   assigns it, which under the threaded server loses concurrent updates: two workers deleting at once can
   bring a deleted message back (seen as messages stuck "in flight" after every task was done).

The speed-up keeps moto's data structures and semantics: the same messages are visible, delayed,
received, redriven to the dead-letter queue, counted and purged at the same instants. It reads the clock
once per scan (the same answer, since a scan is one instant), reads the retention period and the
deduplication setting from the queue's own fields, and finds a message by receipt handle through an
index (falling back to moto's own scan when the index does not know the handle).

It patches classes in place, so it is applied explicitly (``apply()`` or ``patched()``), never on import.
Before patching it checks the moto version and a hash of the source of every function it replaces or
whose behaviour it reproduces, and refuses loudly when any differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import string
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

PINNED_MOTO_VERSION = "5.2.5"

# sha256 (16 hex digits) of inspect.getsource() of what the speed-up replaces or relies on, moto 5.2.5.
# Regenerate with source_hashes() only after re-reading each function against the replacements below.
EXPECTED_SOURCE_HASHES = {
    "moto.core.utils.unix_time_millis": "7a37e1337d02962e",
    "Message.__init__": "4ab16d5eb16ec41c",
    "Message.mark_received": "98e7ec115c7fcb9f",
    "Message.change_visibility": "fcde8986de1390dc",
    "Message.visible": "5129b573308de62a",
    "Message.delayed": "e2fd48abf582683a",
    "Message.all_receipt_handles": "ed3dd73cb69b4911",
    "Message.had_receipt_handle": "31a347382a7315b7",
    "Queue.__init__": "0a4781ed5a21a050",
    "Queue.messages": "03a531dbcbcf9aee",
    "Queue.approximate_number_of_messages_delayed": "c3c1dadb0c42ed5f",
    "Queue.approximate_number_of_messages_not_visible": "5dbecc4dda174358",
    "Queue.approximate_number_of_messages": "d357a9506a56d2f8",
    "Queue.attributes": "40cb990b121628d5",
    "Queue.add_message": "f27c9231c1f20433",
    "Queue.delete_message": "fa6fd5b9bd2cafb4",
    "Queue.wait_for_messages": "58432562ccf2e13e",
    "SQSBackend.send_message": "bf161af09a9e6b86",
    "SQSBackend.receive_message": "065f3e5e7d214408",
    "SQSBackend.change_message_visibility": "f0e9df5f66627114",
    "SQSBackend.purge_queue": "443ea1ae7b15230c",
    "SQSBackend.is_message_valid_based_on_retention_period": "cca23b94a5f3af9d",
}


class SqsSpeedupMismatch(RuntimeError):
    """The installed moto is not the one the speed-up was written against."""


def moto_objects() -> dict[str, Callable[..., Any]]:
    """The functions (property getters unwrapped) named in EXPECTED_SOURCE_HASHES."""
    from moto.core import utils as core_utils
    from moto.sqs.models import Message, Queue, SQSBackend

    objects: dict[str, Callable[..., Any]] = {"moto.core.utils.unix_time_millis": core_utils.unix_time_millis}
    for name in EXPECTED_SOURCE_HASHES:
        class_name, _, attribute = name.partition(".")
        cls = {"Message": Message, "Queue": Queue, "SQSBackend": SQSBackend}.get(class_name)
        if cls is None:
            continue
        # Once applied, the class holds the replacement: hash what it replaced.
        value = _originals.get((cls, attribute), cls.__dict__[attribute])
        objects[name] = value.fget if isinstance(value, property) else value
    return objects


def source_hashes() -> dict[str, str]:
    return {
        name: hashlib.sha256(inspect.getsource(obj).encode("utf-8")).hexdigest()[:16]
        for name, obj in moto_objects().items()
    }


def check_moto() -> None:
    """Raise SqsSpeedupMismatch unless moto is the pinned version with the expected source."""
    import moto

    if moto.__version__ != PINNED_MOTO_VERSION:
        raise SqsSpeedupMismatch(
            f"the local cloud's SQS speed-up was written for moto {PINNED_MOTO_VERSION}, found moto "
            f"{moto.__version__}: re-read moto/sqs/models.py against airflow_ec2cluster/localcloud/"
            f"sqs_speedup.py, then update PINNED_MOTO_VERSION and EXPECTED_SOURCE_HASHES"
        )
    found = source_hashes()
    changed = sorted(name for name, digest in EXPECTED_SOURCE_HASHES.items() if found.get(name) != digest)
    if changed:
        raise SqsSpeedupMismatch(
            f"moto {moto.__version__} differs from what the SQS speed-up reproduces: {', '.join(changed)} "
            f"changed; re-read them against airflow_ec2cluster/localcloud/sqs_speedup.py before updating "
            f"EXPECTED_SOURCE_HASHES"
        )


# Receipt handle -> message, for every handle a message was given. Weak values: a message deleted,
# purged or dropped with its queue leaves the index by itself.
_messages_by_handle: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_state_lock = threading.Lock()
_originals: dict[tuple[type, str], Any] = {}


def apply() -> None:
    """Check moto, then patch its SQS models in this process (idempotent)."""
    with _state_lock:
        if _originals:
            return
        check_moto()
        from moto.sqs.models import Message, Queue, SQSBackend

        replacements = {
            (Message, "mark_received"): fast_mark_received(Message.__dict__["mark_received"]),
            (Queue, "messages"): property(fast_messages),
            (Queue, "approximate_number_of_messages_delayed"): property(fast_count_delayed),
            (Queue, "approximate_number_of_messages_not_visible"): property(fast_count_not_visible),
            (Queue, "delete_message"): fast_queue_delete_message(Queue.__dict__["delete_message"]),
            (SQSBackend, "send_message"): fast_send_message,
            (SQSBackend, "change_message_visibility"): fast_change_message_visibility(
                SQSBackend.__dict__["change_message_visibility"]
            ),
            (SQSBackend, "is_message_valid_based_on_retention_period"): fast_is_within_retention,
        }
        for (cls, name), replacement in replacements.items():
            _originals[(cls, name)] = cls.__dict__[name]
            setattr(cls, name, replacement)


def revert() -> None:
    """Undo apply() (for tests that apply the speed-up in their own process)."""
    with _state_lock:
        for (cls, name), original in _originals.items():
            setattr(cls, name, original)
        _originals.clear()
        _messages_by_handle.clear()


def is_applied() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    was_applied = is_applied()
    apply()
    try:
        yield
    finally:
        if not was_applied:
            revert()


def _now_millis() -> float:
    # Looked up at call time, through moto's module, so that moto's own clock stays the only clock.
    from moto.sqs import models

    return models.unix_time_millis()


# Replacements. Each reproduces the original's result for one instant of moto's clock.


def fast_messages(self: Any) -> list[Any]:
    """Queue.messages: the visible, not delayed messages (one clock read instead of two per message)."""
    now = _now_millis()
    return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]


def fast_count_delayed(self: Any) -> int:
    now = _now_millis()
    return sum(1 for m in self._messages if now < m.delayed_until)


def fast_count_not_visible(self: Any) -> int:
    now = _now_millis()
    return sum(1 for m in self._messages if not now > m.visible_at)


def fast_is_within_retention(self: Any, queue_name: str, message: Any) -> bool:
    """Same test as moto's, reading the retention period from the queue instead of its attributes."""
    from moto.sqs import models

    retention_period = self.get_queue(queue_name).message_retention_period
    retain_until = retention_period + message.sent_timestamp / 1000
    return not retain_until <= models.unix_time()


def fast_mark_received(original: Callable[..., None]) -> Callable[..., None]:
    def mark_received(self: Any, visibility_timeout: int | None = None) -> None:
        original(self, visibility_timeout=visibility_timeout)
        _messages_by_handle[self.receipt_handle] = self

    return mark_received


def _indexed_message(messages: list[Any], receipt_handle: str) -> Any | None:
    """The message of ``messages`` that had ``receipt_handle``, when the index knows it; else None."""
    message = _messages_by_handle.get(receipt_handle)
    if message is None or not message.had_receipt_handle(receipt_handle):
        return None
    # Identity comparison in C: Message defines no __eq__.
    return message if message in messages else None


def fast_queue_delete_message(original: Callable[..., None]) -> Callable[..., None]:
    def delete_message(self: Any, receipt_handle: str) -> None:
        # Under the queue's own lock (add_message appends under it), and in place: moto's "build a new
        # list, assign it" loses a message appended or deleted by another request thread in between.
        with self._messages_lock:
            if receipt_handle in self.deleted_messages:
                return
            message = _indexed_message(self._messages, receipt_handle)
            if message is None:
                # Unknown handle (never given, or given before the message moved queues): moto's own
                # scan decides, and raises ReceiptHandleIsInvalid when no message had it.
                original(self, receipt_handle)
                return
            self._messages.remove(message)
            self.pending_messages.discard(message)
            self.deleted_messages.update(message.all_receipt_handles)

    return delete_message


def fast_change_message_visibility(original: Callable[..., None]) -> Callable[..., None]:
    def change_message_visibility(
        self: Any, queue_name: str, receipt_handle: str, visibility_timeout: int
    ) -> None:
        from moto.sqs.exceptions import InvalidParameterValue

        queue = self.get_queue(queue_name)
        message = _indexed_message(queue._messages, receipt_handle)
        if message is None:
            original(self, queue_name, receipt_handle, visibility_timeout)
            return
        visibility_timeout_msec = int(visibility_timeout) * 1000
        given_visibility_timeout = _now_millis() + visibility_timeout_msec
        if given_visibility_timeout - message.sent_timestamp > 43200 * 1000:
            raise InvalidParameterValue(
                f"Value {visibility_timeout} for parameter VisibilityTimeout is invalid. Reason: Total "
                "VisibilityTimeout for the message is beyond the limit [43200 seconds]"
            )
        message.change_visibility(visibility_timeout)
        if message.visible and message in queue.pending_messages:
            queue.pending_messages.remove(message)

    return change_message_visibility


def _content_based_deduplication(queue: Any) -> bool:
    """``queue.attributes.get("ContentBasedDeduplication") == "true"`` without counting messages."""
    # Queue.attributes lists FIFO attributes only for FIFO queues, booleans as "true"/"false".
    return bool(queue.fifo_queue) and str(queue.content_based_deduplication).lower() == "true"


def fast_send_message(
    self: Any,
    queue_name: str,
    message_body: str,
    message_attributes: dict[str, Any] | None = None,
    delay_seconds: int | None = None,
    deduplication_id: str | None = None,
    group_id: str | None = None,
    system_attributes: dict[str, Any] | None = None,
    validate_group_id: bool = True,
) -> Any:
    """moto's SQSBackend.send_message, reading ContentBasedDeduplication without building attributes."""
    from moto.sqs import models

    queue = self.get_queue(queue_name)

    self._validate_message(
        queue,
        message_body=message_body,
        delay_seconds=int(delay_seconds or 0),
        deduplication_id=deduplication_id,
        group_id=group_id,
        validate_group_id=validate_group_id,
    )

    delay_seconds = int(delay_seconds) if delay_seconds is not None else queue.delay_seconds

    message_id = str(models.random.uuid4())
    message = models.Message(message_id, message_body, system_attributes)

    if _content_based_deduplication(queue):
        sha256 = hashlib.sha256()
        sha256.update(message_body.encode("utf-8"))
        message.deduplication_id = sha256.hexdigest()

    if deduplication_id is not None:
        message.deduplication_id = deduplication_id
        message.sequence_number = "".join(models.random.choice(string.digits) for _ in range(20))

    if group_id is not None:
        message.group_id = group_id

    if message_attributes:
        message.message_attributes = message_attributes

    if delay_seconds > models.MAXIMUM_MESSAGE_DELAY:
        msg = (
            f"Value {delay_seconds} for parameter DelaySeconds is invalid. "
            "Reason: DelaySeconds must be >= 0 and <= 900."
        )
        raise models.InvalidParameterValue(msg)

    message.mark_sent(delay_seconds=delay_seconds)

    queue.add_message(message)

    return message
