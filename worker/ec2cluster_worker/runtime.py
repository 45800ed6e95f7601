"""Putting a worker together from its configuration and environment, and running it.

Start-up order matters: first one TCP connect to each service the worker needs (``reachability``), so a subnet
with no way to one of them stops the worker in seconds, saying which; then the status item is written (so the
controller sees a worker that booted), then the handler and sink are loaded, so a bad handler stops the worker
at once with the reason on its status item. Every start-up failure also prints one console line
(``ec2cluster: startup-failed: <reason>``), which the controller finds with GetConsoleOutput when the status
item could not be written.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Mapping

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from . import reachability, records
from .aws import AwsClients
from .cloudwatch import LogShipper
from .config import WorkerConfig, default_slots, instance_vcpus
from .handlers import HandlerError, build_handler
from .identity import InstanceMetadata, explicit_imds_url, imds_base_url, read_placement, resolve_worker_id
from .lifecycle import SpotWatcher, StopRequest
from .logs import EventLog
from .loop import Worker
from .sinks import SinkContext, build_sink
from .status import Heartbeat, StatusWriter, WorkerStatus, startup_failure_reason

EXIT_STARTUP_FAILED = 3


def run_worker(
    config: WorkerConfig,
    *,
    environ: Mapping[str, str] | None = None,
    session: boto3.session.Session | None = None,
    log: EventLog | None = None,
) -> int:
    """Run until stopped; the process exit code (0 after a normal stop)."""
    environ = os.environ if environ is None else environ
    worker_id, id_source = resolve_worker_id(environ)
    log = (log or EventLog()).bind(worker_id=worker_id, cluster_id=config.cluster_id)
    clients = AwsClients(config.region, session=session)
    shipper = None
    if config.log_group:
        # From here on every line also goes to the cluster's log group (this worker's stream); what goes
        # wrong with CloudWatch is said on the console only.
        console = log
        shipper = LogShipper(
            clients.client("logs"),
            config.log_group,
            worker_id,
            on_error=lambda event, error: console.warning(event, error=error, log_group=config.log_group),
        )
        shipper.start()
        log = log.with_sink(shipper.add)
    try:
        return _run(config, worker_id, id_source, environ, clients, log)
    finally:
        if shipper is not None:
            shipper.close()


def _run(
    config: WorkerConfig,
    worker_id: str,
    id_source: str,
    environ: Mapping[str, str],
    clients: AwsClients,
    log: EventLog,
) -> int:
    log.info("worker.starting", id_source=id_source, region=config.region, handler=config.handler.to_dict())
    status = WorkerStatus()
    status_writer = StatusWriter(
        clients.dynamodb,
        config.state_table,
        status,
        cluster_id=config.cluster_id,
        worker_id=worker_id,
        retention_seconds=config.retention_seconds,
        log=log,
    )

    # Instance metadata only where it answered (or was pointed at explicitly): off EC2, never.
    base_url = imds_base_url(environ)
    metadata = None
    if base_url is not None and (id_source == "imds" or explicit_imds_url(environ) is not None):
        metadata = InstanceMetadata.from_environ(base_url, environ)
    if metadata is not None:
        # Where this worker runs, on every status item from the first (three GETs, once).
        placement = read_placement(metadata)
        status.set_placement(placement)
        log.info("worker.placement", **placement)

    def startup_failed(error: str, *, write_status: bool, **fields: str) -> int:
        stop_reason = startup_failure_reason(error, worker_id)
        log.error("worker.startup_failed", error=error, **fields)
        if write_status:
            status.set_state(records.STATE_STOPPED, stop_reason=stop_reason)
            status_writer.put_logged()
        reachability.print_console_failure(stop_reason)
        return EXIT_STARTUP_FAILED

    if config.startup_check:
        problems = check_reachability(config, clients, log)
        if problems:
            # The status item only when DynamoDB answers: a write to it would wait out the same timeouts.
            return startup_failed(
                reachability.unreachable_reason(problems), write_status="dynamodb" not in problems
            )
    try:
        status_writer.put()
    except (BotoCoreError, ClientError) as error:
        return startup_failed(
            f"cannot write the status item to {config.state_table!r}: {error}", write_status=False
        )
    try:
        handler = build_handler(config.handler)
        sink = build_sink(
            config.output,
            SinkContext(
                cluster_id=config.cluster_id,
                worker_id=worker_id,
                log_shards=config.log_shards,
                retention_seconds=config.retention_seconds,
                clients=clients,
            ),
        )
    except HandlerError as error:
        cause = error.__cause__ or error
        return startup_failed(
            str(error),
            write_status=True,
            traceback="".join(traceback.format_exception(type(cause), cause, cause.__traceback__)),
        )
    vcpus = instance_vcpus()
    slots = config.slots_per_instance or default_slots(config.handler, vcpus)
    log.info("worker.slots", slots=slots, vcpus=vcpus, given=config.slots_per_instance is not None)
    start_children = getattr(handler, "start", None)
    if callable(start_children):  # process isolation: a child per slot, ready before the first receive
        # A heavy import can take minutes: the heartbeat goes on meanwhile, so the drain does not take the
        # worker for hung.
        loading = Heartbeat(status_writer, config.heartbeat_seconds)
        loading.start()
        try:
            start_children(slots)
        except HandlerError as error:
            failure: str | None = str(error)
        else:
            failure = None
        finally:
            loading.stop()  # before a failure is written: a late heartbeat must not write over it
        if failure is not None:
            return startup_failed(failure, write_status=True)
    stop = StopRequest()
    # Spot notices (and rebalance recommendations) are watched where metadata is used: off EC2, never.
    spot_watcher = (
        SpotWatcher(metadata, stop, log, watch_rebalance=config.stop_on_rebalance) if metadata else None
    )
    worker = Worker(
        config=config,
        worker_id=worker_id,
        clients=clients,
        handler=handler,
        sink=sink,
        log=log,
        status=status,
        status_writer=status_writer,
        spot_watcher=spot_watcher,
        stop=stop,
        slots=slots,
    )
    try:
        return worker.run()
    finally:
        for closable in (sink, handler):  # a custom sink's resources; process isolation's children
            close = getattr(closable, "close", None)
            if callable(close):
                close()


def check_reachability(config: WorkerConfig, clients: AwsClients, log: EventLog) -> dict[str, str]:
    """Service -> problem for the services this worker needs and cannot reach (see ``reachability``)."""
    services = reachability.services_needed(config)
    started = time.monotonic()
    try:
        problems = reachability.check(
            services, config.region, config.startup_check_timeout_seconds, session=clients.session
        )
    except Exception as error:  # a bug in the check must not stop a worker that may well work
        log.warning("worker.startup_check_skipped", error=f"{type(error).__name__}: {error}")
        return {}
    log.info(
        "worker.startup_check",
        services=services,
        unreachable=problems,
        seconds=round(time.monotonic() - started, 3),
    )
    return problems
