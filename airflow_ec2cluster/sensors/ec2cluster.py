"""QueueDrainedSensor: wait for the cluster's queue to drain, looking after the workers meanwhile."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.providers.amazon.aws.sensors.base_aws import AwsBaseSensor
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.exceptions import BotoCoreError, ClientError

from airflow_ec2cluster.calls import run_sync
from airflow_ec2cluster.cluster import cluster_id_from_context
from airflow_ec2cluster.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CAPACITY_TIMEOUT,
    DEFAULT_DEAD_LETTER_SAMPLE,
    DEFAULT_DRAINED_CHECKS,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LAUNCH_BACKOFF,
    DEFAULT_LAUNCH_BACKOFF_MAX,
    DEFAULT_MAX_TASK_SECONDS,
    DEFAULT_REPEATED_FAILURE_LIMIT,
    DEFAULT_STATE_TABLE,
)
from airflow_ec2cluster.drain.round import DrainSettings, drain_round
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.links import CLUSTER_LINKS, persist_cluster_links, uses_custom_endpoint
from airflow_ec2cluster.operators.base import as_bool
from airflow_ec2cluster.triggers.ec2cluster import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    QueueDrainedTrigger,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["QueueDrainedSensor"]


class QueueDrainedSensor(AwsBaseSensor[EC2ClusterHook]):
    """Succeed when the cluster's queue is drained; reap stuck workers and replace them meanwhile.

    Each poke makes the same handful of calls whatever the number of tasks: the META item (GetItem), queue
    and dead-letter counts (two GetQueueAttributes), the cluster's instances (DescribeInstances by tag), the
    worker status items (one Query); then :func:`~airflow_ec2cluster.drain.decisions.decide`,
    TerminateInstances for reaped workers, one CreateFleet per market for replacements, one UpdateItem of
    the META item, and a progress line.
    Drained: the queue has read empty ``drained_checks`` times in a row (default 2, enough because the tasks
    must also be accounted for: done + failed + dead-lettered >= enqueued). Only at the end, when the queue
    has read empty and the workers' counters fall short of the enqueued count, is the task log counted
    exactly (see ``decisions``). Everything the sensor remembers between pokes lives in the META item, so
    reschedule mode and retries work.

    Reaping: a worker idle longer than ``idle_timeout``, silent longer than ``heartbeat_timeout``, busy on one
    task longer than ``max_task_seconds``, an instance with no status ``boot_timeout`` after launch, a worker
    that reported itself stopped while its instance still runs, and an instance stopped in EC2. While work
    remains (in-flight messages count) and ``replace_reaped`` is on, missing workers are replaced up to the
    cluster size (``cluster_size``, default the launched count), at most ``max_replacements`` per launch
    generation (default twice the cluster size; a re-run of the launch starts a new generation). The sensor
    fails at once (no retry) when work remains and no worker can run it, and when
    ``repeated_failure_limit`` workers in a row (default 3) stopped at start with the same error (a broken
    handler: replacing them would only bill boots); the failure quotes the error and says what to fix. The
    stop reason of every stopped worker is logged once, read from the status items (which outlive the
    instances). After a fix, clearing the launch and drain tasks runs the work still queued.

    Capacity (see :mod:`airflow_ec2cluster.capacity`): a launch EC2 could not fulfil (no capacity in its
    pools, a vCPU quota, a refused call) never fails a poke: it records what started where and each pool's
    error (in the progress line and the summary's ``launches`` and ``launch_errors``), gives the unstarted
    instances back to the replacement budget, and the next launch waits ``launch_backoff`` seconds, doubling
    per launch short in a row up to ``launch_backoff_max``. The cluster grows up to the launch's
    ``max_workers`` while queued work exceeds its workers. The sensor fails only when work remains, no worker
    is left and none could be launched for ``capacity_timeout`` seconds, naming the errors.

    ``deferrable=True`` (default: Airflow's ``[operators] default_deferrable``, as in the amazon provider;
    templated, so a run can choose it: ``deferrable="{{ params.deferrable }}"``)
    hands the wait to :class:`~airflow_ec2cluster.triggers.ec2cluster.QueueDrainedTrigger`, which runs the
    very same round (:mod:`airflow_ec2cluster.drain.round`) in the triggerer with async AWS calls,
    so no worker slot is held for the hours a drain can last. ``mode="reschedule"`` frees the slot between
    pokes on the sync path. Extra links: the cluster's instances, queue and state table in the AWS console.

    Returns (XCom) ``{cluster_id, enqueued, tasks_done, tasks_failed, dead_lettered, dead_lettered_task_ids,
    dead_letters ([{task_id, error}]: the last error in the task log),
    workers_used, replacements_launched, reaped, elapsed_seconds, counts_exact,
    failed_boots, launches (the last 5: requested, launched, per pool, each pool's error), launch_errors
    ("pool: error code" -> launches that met it), and the cost
    (:func:`airflow_ec2cluster.cost.cost_summary`): instance_seconds (from EC2's launch and state-transition
    times), instance_seconds_by_pool ([{instance_type, availability_zone, market, instance_seconds,
    usd_per_hour, estimated_cost_usd}]), estimated_cost_usd,
    cost_unknown_instance_seconds and cost_unknown_instance_types (pools no price covers: left out of the
    estimate, never counted as 0), max_cost, max_cost_reached, on_demand_prices_as_of}``. The launch's
    ``max_cost`` stops replacements and growth once the estimate reaches it (the progress line says so).
    ``tasks_done``/``tasks_failed`` are distinct task ids in the task log when ``exact_summary`` (one count at
    the end), else the workers' counters.

    Dead-lettered tasks are reported in the summary; with ``fail_on_dead_letters`` the sensor fails
    (without retry) once the queue is drained and any task was dead-lettered.
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields(
        "cluster_id",
        "state_table",
        "idle_timeout",
        "heartbeat_timeout",
        "max_task_seconds",
        "boot_timeout",
        "drained_checks",
        "cluster_size",
        "max_replacements",
        "repeated_failure_limit",
        "capacity_timeout",
        "launch_backoff",
        "launch_backoff_max",
        "fail_on_dead_letters",
        "deferrable",
    )
    operator_extra_links = CLUSTER_LINKS
    ui_color = "#b3e5fc"

    def __init__(
        self,
        *,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        max_task_seconds: float = DEFAULT_MAX_TASK_SECONDS,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        drained_checks: int = DEFAULT_DRAINED_CHECKS,
        replace_reaped: bool = True,
        cluster_size: int | None = None,
        max_replacements: int | None = None,
        dead_letter_sample: int = DEFAULT_DEAD_LETTER_SAMPLE,
        exact_summary: bool = True,
        fail_on_dead_letters: bool = False,
        repeated_failure_limit: int = DEFAULT_REPEATED_FAILURE_LIMIT,
        capacity_timeout: float = DEFAULT_CAPACITY_TIMEOUT,
        launch_backoff: float = DEFAULT_LAUNCH_BACKOFF,
        launch_backoff_max: float = DEFAULT_LAUNCH_BACKOFF_MAX,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.idle_timeout = idle_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.max_task_seconds = max_task_seconds
        self.boot_timeout = boot_timeout
        self.drained_checks = drained_checks
        self.replace_reaped = replace_reaped
        self.cluster_size = cluster_size
        self.max_replacements = max_replacements
        self.dead_letter_sample = dead_letter_sample
        self.exact_summary = exact_summary
        self.fail_on_dead_letters = fail_on_dead_letters
        self.repeated_failure_limit = repeated_failure_limit
        self.capacity_timeout = capacity_timeout
        self.launch_backoff = launch_backoff
        self.launch_backoff_max = launch_backoff_max
        self.deferrable = deferrable

    def settings(self) -> DrainSettings:
        """The (rendered) thresholds, as the round and the trigger take them."""
        try:
            limit = int(self.repeated_failure_limit)
            if limit < 1 or str(self.repeated_failure_limit).strip() != str(limit):
                raise ValueError
        except (TypeError, ValueError):
            # No retry: the same argument would fail again.
            raise AirflowFailException(
                f"repeated_failure_limit: {self.repeated_failure_limit!r} is not a positive integer; give "
                f"the number of workers in a row that may fail at start with the same error before the "
                f"drain stops (default {DEFAULT_REPEATED_FAILURE_LIMIT})"
            ) from None
        return DrainSettings(
            repeated_failure_limit=limit,
            state_table=self.state_table,
            idle_timeout=float(self.idle_timeout),
            heartbeat_timeout=float(self.heartbeat_timeout),
            max_task_seconds=float(self.max_task_seconds),
            boot_timeout=float(self.boot_timeout),
            drained_checks=int(self.drained_checks),
            replace_reaped=bool(self.replace_reaped),
            cluster_size=None if self.cluster_size is None else int(self.cluster_size),
            max_replacements=None if self.max_replacements is None else int(self.max_replacements),
            dead_letter_sample=int(self.dead_letter_sample),
            exact_summary=bool(self.exact_summary),
            capacity_timeout=float(self.capacity_timeout),
            launch_backoff=float(self.launch_backoff),
            launch_backoff_max=float(self.launch_backoff_max),
        )

    def resolve_cluster_id(self, context: Context) -> str:
        try:
            return cluster_id_from_context(self.cluster_id, context)
        except ValueError as error:
            raise AirflowFailException(str(error)) from error

    def execute(self, context: Context) -> Any:
        self.settings()  # bad arguments fail before anything is read or launched
        cluster_id = self.resolve_cluster_id(context)
        self.persist_links(context, cluster_id)
        if not as_bool(self.deferrable):
            return super().execute(context)
        self.defer(
            trigger=QueueDrainedTrigger(
                cluster_id=cluster_id,
                settings=self.settings().to_dict(),
                poll_interval=float(self.poke_interval),
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
                verify=self.verify,
                botocore_config=self.botocore_config,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        event = event or {}
        status = event.get("status")
        if status == STATUS_SUCCESS:
            return self.drained(event["summary"])
        if status == STATUS_FAILURE:
            raise AirflowFailException(event.get("message"))
        raise AirflowException(f"drain trigger ended with {event!r}")

    def poke(self, context: Context) -> bool | PokeReturnValue:
        cluster_id = self.resolve_cluster_id(context)
        outcome = run_sync(drain_round(cluster_id, self.settings(), self.log), self.hook)
        if outcome.failure:
            raise AirflowFailException(outcome.failure)
        if not outcome.drained:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self.drained(outcome.summary))

    def drained(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The drained cluster's summary; fails the task instead when dead letters must fail the run."""
        if as_bool(self.fail_on_dead_letters) and summary.get("dead_lettered"):
            sample = ", ".join(summary.get("dead_lettered_task_ids") or []) or "see the dead-letter queue"
            # No retry: re-running the sensor would find the same dead letters. Redrive them first.
            raise AirflowFailException(
                f"cluster {summary.get('cluster_id')}: {summary['dead_lettered']} message(s) dead-lettered "
                f"(tasks not done: {sample}); fix the handler and redrive them (ec2cluster redrive), or set "
                "fail_on_dead_letters=False to let the run succeed with them reported"
            )
        return summary

    def persist_links(self, context: Context, cluster_id: str) -> None:
        """Console links for the UI (absent on a custom endpoint); a link never fails the task."""
        hook = self.hook
        queue_url = None
        if not uses_custom_endpoint(hook):
            try:
                meta = hook.get_meta(self.state_table, cluster_id)
                queue_url = meta.queue_url if meta is not None else None
            except (ClientError, BotoCoreError) as error:
                self.log.warning("Console link to the queue not recorded: %s", error)
        persist_cluster_links(
            context, self, hook, cluster_id=cluster_id, queue_url=queue_url, state_table=self.state_table
        )
