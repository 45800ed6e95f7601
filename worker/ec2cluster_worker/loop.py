"""The worker loop: receive messages, run their tasks on the slots, store results, log them, delete what is
done.

The loop receives only when a slot is free and no task waits for one, sizing the receive by what the free
slots can finish soon (``sizing.py``); the slots (``slots.py``) run the tasks, several at once with
``slots_per_instance`` > 1; the messages whose tasks have all ended are finished together just before the
next receive (or when the first of them has waited a quarter of the visibility timeout), so one task-log
write and one delete serve up to a receive's worth of messages.

Per received batch of messages (each one task or a group of tasks) the loop makes three AWS calls
(ReceiveMessage, one BatchWriteItem for every message's task-log item, one DeleteMessageBatch), plus a
ChangeMessageVisibilityBatch only when something failed or must be handed back, and one BatchGetItem only
when a message is a redelivery or was moved back by a redrive (its tasks already logged done are not run
again; a first delivery never costs a read). A message with a failed
task is left undeleted with a short visibility, so SQS retries it and redrive moves it to the dead-letter
queue after maxReceiveCount receives.

An idle worker stops as soon as nothing is visible and it holds nothing (``stop_when_queue_empty``, stop
reason "queue-empty"), so a job's tail does not bill for idle instances; see ``Worker._queue_empty``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from . import records
from .aws import AwsClients, error_code
from .config import WorkerConfig
from .handlers import Handler, TaskContext, TaskFailure, TaskTimeout, error_detail, error_summary
from .lifecycle import (
    STOP_QUEUE_EMPTY,
    SpotWatcher,
    StopRequest,
    due_stop_reason,
    install_signal_handlers,
    may_stop_queue_empty,
)
from .logs import EventLog
from .messages import Delivery, Malformed, Parsed, Task, TaskMessage, delivery_of, parse_message
from .receiver import STOP_CHECK_SECONDS, Receiver
from .results import TaskResult, done_result, failed_result
from .sinks import Sink, write_results
from .sizing import RECEIVE_BUDGET_FRACTION, DurationStats, receive_size
from .slots import SlotPool
from .status import Heartbeat, StatusWriter, WorkerStatus
from .tasklog import MessageRun, TaskLog, fit_inline_results
from .taskqueue import TaskQueue
from .visibility import VisibilityKeeper

MAX_RETRY_DELAY_SECONDS = 60
MAX_CONSECUTIVE_RECEIVE_ERRORS = 5
QUEUE_GONE_CODES = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
RETURN_MARGIN_SECONDS = 1.0  # how long past a let-go message's expected return the worker waits for it
ACCESS_DENIED_CODES = ("AccessDenied", "AccessDeniedException", "AWS.SimpleQueueService.AccessDenied")
EXIT_OK = 0
EXIT_ERROR = 1


def retry_delay_seconds(attempt: int, visibility_timeout: int) -> int:
    """How long a failed task's message stays hidden before SQS offers it again: 1, 2, 4, ... s."""
    return int(min(2 ** max(attempt - 1, 0), MAX_RETRY_DELAY_SECONDS, visibility_timeout))


class Worker:
    def __init__(
        self,
        *,
        config: WorkerConfig,
        worker_id: str,
        clients: AwsClients,
        handler: Handler,
        sink: Sink,
        log: EventLog,
        status: WorkerStatus,
        status_writer: StatusWriter,
        spot_watcher: SpotWatcher | None = None,
        stop: StopRequest | None = None,
        clock: Callable[[], float] = time.monotonic,
        slots: int = 1,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.handler = handler
        self.sink = sink
        self.log = log
        self.status = status
        self.status_writer = status_writer
        self.spot_watcher = spot_watcher
        self.stop = stop or (spot_watcher.stop_request if spot_watcher else StopRequest())
        self.clock = clock
        self.queue = TaskQueue(clients.sqs, config.queue_url)
        self.keeper = VisibilityKeeper(clients.sqs, config.queue_url, config.visibility_timeout_seconds, log)
        self.receiver = Receiver(self.queue, self._hand_back_late)
        self.heartbeat = Heartbeat(status_writer, config.heartbeat_seconds)
        self.task_log = TaskLog(
            clients.dynamodb,
            config.state_table,
            cluster_id=config.cluster_id,
            log_shards=config.log_shards,
            retention_seconds=config.retention_seconds,
        )
        self.started_at = clock()
        self.last_activity_at = self.started_at
        self.polled_empty = False  # a receive found nothing since the last work: idle time may count
        self._empty_receive = False  # the last receive found nothing (each one allows one queue check)
        self._returns_at = 0.0  # when the last message this worker let go with a delay is visible again
        self._queue_check = config.stop_when_queue_empty  # off for good when GetQueueAttributes is denied
        self.exit_code = EXIT_OK
        self._receive_errors = 0
        # The slots: tasks start only while no stop is requested (the rest are handed back).
        self.slots = SlotPool(slots, should_start=lambda: not self.stop.requested, inline=slots == 1)
        self.status.set_slots(slots)
        self.durations = DurationStats()
        # Messages whose tasks have all ended, waiting to be finished (written, deleted) together; filled by
        # the slot threads, emptied by the loop.
        self._ended_lock = threading.Lock()
        self._ended: list[MessageRun] = []
        self._ended_since = 0.0  # when the oldest of them ended (monotonic)
        self._finish_after = config.visibility_timeout_seconds * RECEIVE_BUDGET_FRACTION

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        in_main_thread = threading.current_thread() is threading.main_thread()
        restore_signals = install_signal_handlers(self.stop) if in_main_thread else (lambda: None)
        self.status.set_state(records.STATE_RUNNING)
        self.status_writer.put_logged()
        for thread in self._threads():
            thread.start()
        self.log.info("worker.running", queue_url=self.config.queue_url)
        try:
            while not self._stopping():
                self._finish_due(before_receive=False)
                free = self.slots.free()
                if free <= 0:
                    self.slots.wait_free(STOP_CHECK_SECONDS)
                    continue
                self._finish_due(before_receive=True)
                messages = self._receive(free)
                if messages:
                    self.dispatch(messages)
            self._wind_down()
        except Exception as error:  # a bug, not a task's failure: say so on the status item, exit 1
            self.exit_code = EXIT_ERROR
            self.stop.request(f"error: {type(error).__name__}: {error}")
            self.log.error("worker.crashed", error=traceback.format_exc())
        finally:
            self.slots.close()
            self._shut_down()
            restore_signals()
        return self.exit_code

    def _threads(self) -> list[Any]:
        threads: list[Any] = [self.heartbeat, self.keeper, self.receiver]
        return threads + ([self.spot_watcher] if self.spot_watcher else [])

    def _stopping(self) -> bool:
        """True when the worker must stop; on the first such answer, records and announces it."""
        if not self.stop.requested:
            reason = due_stop_reason(
                now=self.clock(),
                started_at=self.started_at,
                last_activity_at=self.last_activity_at,
                polled_empty=self.polled_empty,
                idle_shutdown_seconds=self.config.idle_shutdown_seconds,
                max_lifetime_seconds=self.config.max_lifetime_seconds,
            )
            if reason is None and self._queue_empty():
                reason = STOP_QUEUE_EMPTY
            if reason is not None:
                self.stop.request(reason)
        if self.stop.requested and self.status.snapshot().state == records.STATE_RUNNING:
            self.status.set_state(records.STATE_STOPPING, stop_reason=self.stop.reason)
            self.heartbeat.poke()
            self.log.info("worker.stopping", reason=self.stop.reason)
        return self.stop.requested

    # Fast scale-in (``stop_when_queue_empty``). An idle worker stops as soon as (1) it holds no message:
    # none running, none received and not started (between batches the loop has deleted, handed back or
    # retried every message of the last one); (2) no message it let go with a delay is due back: a failed
    # task's message (retry delay, at most 60 s) or one whose task-log write or delete failed (its
    # visibility timeout) comes back to this worker, rather than to a replacement the controller would have
    # to boot; (3) its last receive, a long poll (WaitTimeSeconds up to 20, which asks every SQS server),
    # found nothing; and (4) one GetQueueAttributes reads ApproximateNumberOfMessages and ...Delayed both at
    # 0, one call per empty receive that passed (1)-(3), none while there is work. Why each, and what it
    # leaves:
    # - A worker started before the enqueue finished: a stream still sending would show in (3) (a long poll
    #   returns as soon as a message arrives) and in (4) (messages sent, or sent with a delay, between the
    #   poll and the read). A worker started before the enqueue began stops at once: the controller
    #   launches after the enqueue, and its drain launches workers for visible or delayed messages.
    # - A short poll (wait_time_seconds 0) samples some SQS servers and may find nothing while messages
    #   wait: (4) catches it. The counts are approximate (they may lag a send by a moment): a stop that
    #   comes too early loses nothing, the drain launches a worker for what is left.
    # - Messages in flight held by other workers are not counted: if their worker dies they come back and
    #   the drain launches a worker for them, so stopping is safe, and waiting for them would keep idle
    #   instances for every slow task.
    # - No minimum lifetime: the controller decides the capacity, and a fresh worker that finds nothing to
    #   do has nothing to wait for.
    # - When GetQueueAttributes is refused (a worker role without sqs:GetQueueAttributes) the worker says
    #   so once and falls back to idle_shutdown_seconds; other errors skip this check only.
    # With stop_when_queue_empty false, idle_shutdown_seconds alone decides, as before.

    def _queue_empty(self) -> bool:
        """True when the worker may stop "queue-empty" now (see above); at most one AWS call."""
        if not self._queue_check or not self._empty_receive:
            return False
        self._empty_receive = False  # one queue read per empty receive
        if not may_stop_queue_empty(
            empty_receive=True,
            held=self.keeper.held_count(),
            now=self.clock(),
            returns_at=self._returns_at,
        ):
            return False
        try:
            waiting = self.queue.waiting()
        except (BotoCoreError, ClientError) as error:
            code = error_code(error)
            if code in QUEUE_GONE_CODES:
                self.log.warning("queue.gone", error=str(error))
                self.stop.request("queue-deleted")
            elif code in ACCESS_DENIED_CODES:
                self._queue_check = False
                self.log.warning(
                    "queue.empty_check_disabled",
                    error=str(error),
                    fix="give the worker role sqs:GetQueueAttributes on the task queue; "
                    "until then the worker stops after idle_shutdown_seconds",
                )
            else:
                self.log.warning("queue.empty_check_failed", error=str(error))
            return False
        if waiting:
            self.log.info("queue.not_empty", waiting=waiting)
            return False
        self.log.info("queue.empty")
        return True

    def _expect_back(self, visible_at: float) -> None:
        """A message this worker let go is visible again at ``visible_at`` (monotonic): wait for it, and a
        margin (SQS's timing and this clock's are not the same to the millisecond)."""
        if visible_at:
            self._returns_at = max(self._returns_at, visible_at + RETURN_MARGIN_SECONDS)

    def _receive(self, free_slots: int) -> list[dict[str, Any]]:
        """One long poll, cut short by a stop request (SIGTERM, spot notice): [] then."""
        self._empty_receive = False
        try:
            messages = self.receiver.receive(
                lambda: self.stop.requested,
                max_messages=receive_size(
                    self.durations.mean(),
                    free_slots,
                    self.config.visibility_timeout_seconds,
                    self.durations.tasks_per_message,
                    self.config.max_messages,
                ),
                wait_time_seconds=self.config.wait_time_seconds,
                visibility_timeout=self.config.visibility_timeout_seconds,
            )
        except (BotoCoreError, ClientError) as error:
            self._receive_failed(error)
            return []
        self._receive_errors = 0
        if messages:
            self.last_activity_at = self.clock()
        # Idle only when nothing is running or waiting to be finished either.
        self.polled_empty = not messages and not self.stop.requested and self._holds_nothing()
        self._empty_receive = self.polled_empty
        return messages

    def _holds_nothing(self) -> bool:
        with self._ended_lock:
            ended = bool(self._ended)
        return not ended and self.slots.idle()

    def _receive_failed(self, error: Exception) -> None:
        if error_code(error) in QUEUE_GONE_CODES:
            self.log.warning("queue.gone", error=str(error))
            self.stop.request("queue-deleted")
            return
        self._receive_errors += 1
        self.log.error("queue.receive_failed", error=str(error), consecutive=self._receive_errors)
        if self._receive_errors >= MAX_CONSECUTIVE_RECEIVE_ERRORS:
            self.exit_code = EXIT_ERROR
            self.stop.request(f"error: ReceiveMessage failed {self._receive_errors} times: {error}")

    # -- messages on the slots ------------------------------------------------------------------------------

    def process_batch(self, messages: list[dict[str, Any]]) -> None:
        """Run these messages' tasks and finish them (one batch, start to end: for tests and tools)."""
        self.dispatch(messages)
        self.slots.wait_idle(timeout=None)
        self._finish_ended()

    def dispatch(self, messages: list[dict[str, Any]]) -> None:
        """Hold the messages, queue their tasks on the slots (not those an earlier delivery logged done)."""
        parsed = [parse_message(message) for message in messages]
        self.durations.saw_messages(
            [len(item.tasks) if isinstance(item, TaskMessage) else 1 for item in parsed]
        )
        self.keeper.hold([item.delivery for item in parsed], self.clock())
        self.polled_empty = False
        done_before = self._done_before(parsed)
        jobs: list[TaskJob] = []
        for item in parsed:
            run = MessageRun(
                key=item.log_key,
                delivery=item.delivery,
                grouped=isinstance(item, TaskMessage) and item.grouped,
                task_count=len(item.tasks) if isinstance(item, TaskMessage) else 1,
                kept=done_before.get(item.log_key, {}),
            )
            if isinstance(item, Malformed):
                run.results.append(self.malformed_result(item))
                self._ended_run(run)
                continue
            to_run = [task for task in item.tasks if task.task_id not in run.kept]
            if not to_run:  # every task logged done before: only the delete is left
                self._ended_run(run)
                continue
            run.outstanding = len(to_run)
            order = {task.task_id: index for index, task in enumerate(item.tasks)}
            jobs.extend(TaskJob(self, task, run, order) for task in to_run)
        if jobs:
            self.slots.submit(jobs)

    def task_ended(self, job: TaskJob, result: TaskResult | None) -> None:
        """A slot ran a task (``result``) or skipped it for a stop (None)."""
        run = job.message
        with self._ended_lock:
            if result is None:
                run.not_run += 1
            else:
                run.results.append(result)
            run.outstanding -= 1
            ended = run.outstanding == 0
        if ended:
            run.results.sort(key=lambda result: job.order[result.task_id])
            self._ended_run(run)

    def _ended_run(self, run: MessageRun) -> None:
        with self._ended_lock:
            if not self._ended:
                self._ended_since = self.clock()
            self._ended.append(run)

    def _finish_due(self, *, before_receive: bool) -> None:
        """Finish the ended messages before a receive, or once the first has waited long enough (a
        quarter of the visibility timeout: results are not kept from the task log for long while every slot
        is busy)."""
        with self._ended_lock:
            due = bool(self._ended) and (
                before_receive or self.clock() - self._ended_since >= self._finish_after
            )
        if due:
            self._finish_ended()

    def _finish_ended(self) -> None:
        with self._ended_lock:
            runs, self._ended = self._ended, []
        if not runs:
            return
        not_started = [run.delivery for run in runs if run.not_run and not run.results and not run.kept]
        if not_started:
            refused = self.keeper.set_visibility(not_started, 0)
            self.log.info("batch.released", messages=len(not_started), refused=len(refused))
        self.finish([run for run in runs if run.delivery not in not_started])
        self.last_activity_at = self.clock()

    def _wind_down(self) -> None:
        """A stop: the slots finish the tasks at hand, start none of the others (handed back with their
        messages), and every message ended is finished."""
        for job in self.slots.cancel_pending():
            job.skip()
        while not self.slots.wait_idle(STOP_CHECK_SECONDS):
            pass
        self._finish_ended()

    def _done_before(self, parsed: list[Parsed]) -> dict[str, dict[str, dict[str, Any]]]:
        """Tasks an earlier delivery logged done: one read, for redelivered or redriven messages only."""
        keys = [item.log_key for item in parsed if isinstance(item, TaskMessage) and item.redelivered]
        if not keys:
            return {}
        try:
            return self.task_log.done_before(keys)
        except (BotoCoreError, ClientError) as error:
            # Not fatal: the tasks run again (at-least-once), and their items are overwritten.
            self.log.warning("tasklog.read_failed", error=str(error), messages=len(keys))
            return {}

    def malformed_result(self, item: Malformed) -> TaskResult:
        now = time.time()
        self.log.warning(
            "message.malformed", task_id=item.task_id, error=item.error, attempt=item.delivery.attempt
        )
        return failed_result(
            task_id=item.task_id,
            attempt=item.delivery.attempt,
            worker_id=self.worker_id,
            message_id=item.delivery.message_id,
            started_at=now,
            finished_at=now,
            error=f"malformed message: {item.error}",
        )

    def run_task(self, task: Task) -> TaskResult:
        delivery = task.delivery
        common = dict(
            task_id=task.task_id,
            attempt=delivery.attempt,
            worker_id=self.worker_id,
            message_id=delivery.message_id,
        )
        started_at = time.time()
        token = self.status.task_started(task.task_id, started_at)
        context = TaskContext(task.task_id, delivery.attempt, self.worker_id, self.config.cluster_id)
        detail = None
        try:
            value = self.handler(task.payload, context, self.config.task_timeout_seconds)
        except TaskTimeout:
            error = f"timed out after {self.config.task_timeout_seconds:g} s (task_timeout_seconds)"
        except TaskFailure as failure:
            error, detail = str(failure), failure.detail
        except Exception as exception:  # the handler's own error: the task fails, the worker goes on
            # A person reads the type and message; the traceback is kept beside it for whoever wants it.
            error = error_summary(exception)
            detail = error_detail(exception)
        else:
            error = None
        finally:
            finished_at = time.time()
            self.status.task_finished(token, finished_at)
            self.durations.add(finished_at - started_at)
        if error is None:
            result = done_result(started_at=started_at, finished_at=finished_at, result=value, **common)
        else:
            result = failed_result(started_at=started_at, finished_at=finished_at, error=error, **common)
            result = dataclasses.replace(result, error_detail=detail)
        self._log_task(result)
        return result

    def _log_task(self, result: TaskResult) -> None:
        fields = dict(task_id=result.task_id, attempt=result.attempt, duration_s=round(result.duration_s, 3))
        if result.done:
            self.log.info("task.done", **fields)
        else:
            if result.error_detail:
                fields["detail"] = result.error_detail
            self.log.warning("task.failed", error=result.error, **fields)

    def finish(self, runs: list[MessageRun]) -> None:
        """Store results, write the batch's task log, delete what is done, let the rest come back."""
        if not runs:
            return
        attributes = self._store_results(runs)
        try:
            self.task_log.write(
                self.task_log.items(runs, attributes, worker_id=self.worker_id, now=time.time())
            )
        except (BotoCoreError, ClientError) as error:
            # Nothing deleted: every message of the batch comes back after its visibility timeout.
            self._expect_back(self.keeper.visible_until(run.delivery for run in runs))
            self.keeper.forget(run.delivery for run in runs)
            self.log.error("tasklog.write_failed", error=str(error), messages=len(runs))
            return
        done = [run for run in runs if run.status == records.TASK_DONE]
        failed = [run for run in runs if run.status == records.TASK_FAILED]
        handed_back = [run.delivery for run in runs if run.status == records.TASK_PARTIAL]
        done_visible_until = self.keeper.visible_until(run.delivery for run in done)
        self.keeper.forget(run.delivery for run in done)
        if not self._delete([run.delivery for run in done]):
            self._expect_back(done_visible_until)
        if failed:
            delays = {
                run.delivery.message_id: retry_delay_seconds(
                    run.delivery.attempt, self.config.visibility_timeout_seconds
                )
                for run in failed
            }
            self.keeper.set_visibility(
                [run.delivery for run in failed], lambda delivery: delays[delivery.message_id]
            )
            # SQS counts the delay from its answer: read the clock after it.
            self._expect_back(self.clock() + max(delays.values()))
        if handed_back:
            refused = self.keeper.set_visibility(handed_back, 0)
            self.log.info("batch.released", messages=len(handed_back), refused=len(refused), partly_run=True)
        self.status.count(
            done=sum(len(run.results) - run.tasks_failed for run in runs),
            failed=sum(run.tasks_failed for run in runs),
            messages_done=sum(1 for run in done if not run.finished_before),
            messages_failed=len(failed),
            now=time.time(),
        )

    def _store_results(self, runs: list[MessageRun]) -> dict[str, dict[str, Any]]:
        """Hand done results to the sink; what it could not store (or what overflows an item) fails."""
        completed = [result for run in runs for result in run.results if result.done]
        stored, attributes = write_results(self.sink, completed)
        stored_by_id = {result.task_id: result for result in stored}
        for result in stored:
            if not result.done:
                self.log.warning("task.output_failed", task_id=result.task_id, error=result.error)
        for run in runs:
            run.results = [stored_by_id.get(r.task_id, r) if r.done else r for r in run.results]
            if run.grouped:
                fit_inline_results(run, attributes)
        return attributes

    def _delete(self, deliveries: list[Delivery]) -> bool:
        """True when every message was deleted."""
        if not deliveries:
            return True
        try:
            refused = self.queue.delete(deliveries)
        except (BotoCoreError, ClientError) as error:
            self.log.error("queue.delete_failed", error=str(error), messages=len(deliveries))
            return False
        for failure in refused:
            # The task is logged done; its message comes back and the task runs again (at-least-once).
            self.log.warning(
                "queue.delete_refused", message_id=failure["MessageId"], code=failure.get("Code")
            )
        return not refused

    # -- stopping -------------------------------------------------------------------------------------

    def _hand_back_late(self, messages: list[dict[str, Any]]) -> None:
        """Messages a receive brought after the worker stopped: visible again at once."""
        refused = self.keeper.set_visibility([delivery_of(message) for message in messages], 0)
        self.log.info("batch.released", messages=len(messages), refused=len(refused), after_stop=True)

    def _shut_down(self) -> None:
        # A long poll may still be in flight: what it brings from now on is handed back, not run.
        self.receiver.abandon()
        if self.spot_watcher:
            self.spot_watcher.stop()
        self.keeper.stop()
        self.heartbeat.stop()
        self.status.set_state(records.STATE_STOPPED, stop_reason=self.stop.reason or "unknown")
        self.status_writer.put_logged()
        if not self.receiver.join():
            # Its messages, if any, come back when their visibility timeout ends.
            self.log.info("queue.receive_abandoned")
        snapshot = self.status.snapshot()
        self.log.info(
            "worker.stopped",
            reason=snapshot.stop_reason,
            tasks_done=snapshot.tasks_done,
            tasks_failed=snapshot.tasks_failed,
            exit_code=self.exit_code,
        )


class TaskJob:
    """One task of a received message, queued for a slot."""

    __slots__ = ("worker", "task", "message", "order")

    def __init__(self, worker: Worker, task: Task, message: MessageRun, order: dict[str, int]) -> None:
        self.worker = worker
        self.task = task
        self.message = message
        self.order = order  # task id -> place in its message: the task log lists them in that order

    def run(self) -> None:
        result = self.worker.run_task(self.task)
        self.worker.task_ended(self, result)

    def skip(self) -> None:
        self.worker.task_ended(self, None)
