"""Getting capacity: one launch of N workers over the fleet, and what the cluster remembers of launches.

A launch is one CreateFleet (type ``instant``) per market the launch's ``capacity`` names, spot first for
``spot-then-on-demand`` (on-demand only for what spot could not start). EC2 answers with what it started and
an error per pool it could not use; a launch never raises on capacity: it returns a
:class:`~airflow_ec2cluster.aws.fleet.LaunchOutcome`. Fewer than ``min_count`` started: they are
terminated at once (the launch keeps none) and the launch counts as failed.

A launch that started fewer workers than it asked for backs off: the next one waits
``launch_backoff * 2**(failures - 1)`` seconds, at most ``launch_backoff_max`` (pure:
:func:`launch_retry_at`). While the cluster has no worker and launches keep failing, the drain waits
``capacity_timeout`` from the first failure before it fails the run with the errors that stopped it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import replace
from typing import Any

from airflow_ec2cluster.aws.fleet import (
    LaunchOutcome,
    create_fleet_params,
    market_token,
    pool_name,
)
from airflow_ec2cluster.calls import Call, call
from airflow_ec2cluster.cluster import LaunchSpec
from airflow_ec2cluster.meta import ClusterMeta, MetaUpdate

# Launches kept in the META item's history (the summary shows them).
LAUNCH_HISTORY = 10
# Distinct "pool: error" totals kept in the META item.
MAX_ERROR_TOTALS = 50


def launch_workers(
    cluster_id: str,
    spec: LaunchSpec,
    count: int,
    client_token: str,
    *,
    min_count: int = 1,
    extra_tags: dict[str, str] | None = None,
    avoid: Iterable[str] = (),
) -> Generator[Call, Any, LaunchOutcome]:
    """Start up to ``count`` workers: CreateFleet per market in turn; see the module docstring."""
    outcome = LaunchOutcome(requested=count)
    avoid = tuple(avoid)
    for index, market in enumerate(spec.markets()):
        remaining = count - len(outcome.instances)
        if remaining <= 0:
            break
        params = create_fleet_params(
            cluster_id=cluster_id,
            spec=spec,
            market=market,
            count=remaining,
            client_token=market_token(client_token, market, index == 0),
            extra_tags=extra_tags,
            avoid=avoid,
        )
        answer: LaunchOutcome = yield call("create_fleet", params, remaining, market)
        outcome = outcome.merged(answer)
    if 0 < len(outcome.instances) < min_count:
        released = outcome.instance_ids
        yield call("terminate_instances", released, wait=False)
        outcome = replace(outcome, instances=(), released=tuple(released))
    return outcome


def min_count_for(spec: LaunchSpec, count: int, capacity: int) -> int:
    """The fewest workers a launch of ``count`` keeps: enough to bring the cluster to its ``min_workers``."""
    return max(1, min(count, int(spec.min_workers or 1) - capacity))


def after_launch(meta: ClusterMeta, outcome: LaunchOutcome, now: float, capacity: int | None) -> MetaUpdate:
    """The META item's launch fields after ``outcome`` (``capacity``: workers the cluster had before it;
    None: not known, then only a launch that started workers changes the wait for capacity)."""
    history = [*meta.launch_history, outcome.record(now)][-LAUNCH_HISTORY:]
    totals = dict(meta.launch_errors_total)
    for entry in history[-1]["errors"]:
        key = f"{entry['pool']}: {entry['code']}"
        totals[key] = totals.get(key, 0) + 1
    totals = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:MAX_ERROR_TOTALS])
    short = outcome.short > 0
    # Waiting for capacity: no worker before, and none started now.
    if outcome.instances or (capacity or 0) > 0:
        wait_since = 0.0
    elif capacity == 0:
        wait_since = meta.capacity_wait_since or now
    else:
        wait_since = meta.capacity_wait_since
    return MetaUpdate(
        launch_history=history,
        launch_errors_total=totals,
        launch_failures=meta.launch_failures + 1 if short else 0,
        launch_failed_at=now if short else 0.0,
        capacity_wait_since=wait_since,
    )


def launch_retry_at(meta: ClusterMeta, backoff: float, backoff_max: float) -> float:
    """When the next launch may go (0: now): exponential in the launches short in a row, capped."""
    if meta.launch_failures <= 0 or not meta.launch_failed_at:
        return 0.0
    delay = min(backoff_max, backoff * 2 ** min(meta.launch_failures - 1, 30))
    return meta.launch_failed_at + delay


def last_errors_text(meta: ClusterMeta, limit: int = 3) -> str:
    """The last launch's errors, for a progress line or a failure: "pool: code (message)"; "" if none."""
    if not meta.launch_history:
        return ""
    last = meta.launch_history[-1]
    errors = last.get("errors") or []
    parts = [f"{e['pool']}: {e['code']}" for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# A worker that stopped on a rebalance recommendation (EC2: its spot pool is at elevated risk) keeps its
# pool out of the launches for this long.
REBALANCE_AVOID_SECONDS = 900.0
REBALANCE_STOP_REASON = "rebalance-recommendation"


def pools_to_avoid(
    workers: Iterable[Any], spec: LaunchSpec, now: float, window: float = REBALANCE_AVOID_SECONDS
) -> list[str]:
    """The pools (as :func:`~airflow_ec2cluster.aws.fleet.pool_name` names them) of workers that stopped
    on a rebalance recommendation within ``window``: their replacements go to other pools first."""
    zones = spec.subnet_zones or {}
    avoid = []
    for worker in workers:
        if worker.stop_reason != REBALANCE_STOP_REASON or now - worker.heartbeat_at > window:
            continue
        if not worker.instance_type or not worker.availability_zone:
            continue
        lifecycle = worker.lifecycle or "spot"
        for subnet, zone in zones.items():
            if zone == worker.availability_zone:
                avoid.append(pool_name(worker.instance_type, subnet, lifecycle))
    return sorted(set(avoid))
