"""Capacity benchmarks on the local cloud (issue 15): idle instance-seconds at a job's tail with and without
fast scale-in, and the time from a spot interruption notice (or a rebalance recommendation) to its
replacement taking work.

Both run whole jobs through the operators and the sensor's poke loop, as ``controller.measure_drain`` does,
and read what happened from the workers' instance logs (``<work_dir>/logs/<instance id>.log``: JSON events
with their epoch ``ts``; the instances share the host's clock), their status items and DescribeInstances.
Faults are injected on observed progress (tasks done in the logs, status items), never after a sleep.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import cloud
from .controller import hook_for, operators_kwargs, sensor_for, task_context
from .result import Result

EVERY_STATE = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated")
# Tasks are ``sleep <seconds>`` (a command handler, the payload a number): lengths chosen per task, no code
# shipped in the bundle.
SLEEP_HANDLER = {"type": "command", "argv": ["sleep", "{payload}"], "payload": "argv"}
INSTANCE_TYPE = "t3.micro"
ZONES = ("us-east-1a", "us-east-1b")
# The worker's long poll in both benchmarks: an idle stop needs one empty receive of this length.
WAIT_TIME_SECONDS = 1
POKE_INTERVAL = 2.0
RUN_TIMEOUT_SECONDS = 240


# -- shared -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_cloud() -> Iterator[tuple[Any, str]]:
    """A LocalCloud (IAM enforced: the workers' role holds the project's policy) and a state table."""
    from ec2cluster_localcloud import LocalCloud
    from ec2cluster_localcloud.project import apply_project_policies

    with LocalCloud(grace_seconds=5) as local, cloud.pointed_at(local.env()):
        table = cloud.create_state_table()
        apply_project_policies(local, "--state-table", table)
        yield local, table


def events(local: Any, instance_id: str) -> list[dict[str, Any]]:
    """The worker's JSON events from the instance's console, in order (boot-loader lines skipped)."""
    path = Path(local.work_dir) / "logs" / f"{instance_id}.log"
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{") or '"event"' not in line:
            continue
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def first(found: list[dict[str, Any]], event: str) -> dict[str, Any] | None:
    return next((e for e in found if e.get("event") == event), None)


def cluster_instances(cluster_id: str) -> dict[str, dict[str, Any]]:
    return {i["InstanceId"]: i for i in hook_for().list_cluster_instances(cluster_id, EVERY_STATE)}


def pool_of(instance: dict[str, Any]) -> str:
    market = instance.get("InstanceLifecycle") or "on-demand"
    return f"{instance['InstanceType']} in {instance['Placement']['AvailabilityZone']} ({market})"


def default_subnets() -> list[str]:
    subnets = cloud.client("ec2").describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets["Subnets"]}
    return [by_zone[zone] for zone in ZONES]


def on_call(client: Any, operation: str, times: list[float]) -> None:
    """Append the epoch time at which each ``operation`` call of ``client`` returned."""
    client.meta.events.register(
        f"after-call.{client.meta.service_model.service_name}.{operation}",
        lambda **_: times.append(time.time()),
    )


def poke_loop(sensor: Any, between_pokes: Callable[[], bool]) -> int:
    """Poke as Airflow does (poke, sleep poke_interval, ...) until drained or ``between_pokes`` says stop;
    the number of pokes."""
    from airflow.sdk import PokeReturnValue

    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    pokes = 0
    while time.monotonic() < deadline:
        answer = sensor.poke(task_context())
        pokes += 1
        if isinstance(answer, PokeReturnValue) and answer.is_done:
            return pokes
        if between_pokes():
            return pokes
        time.sleep(sensor.poke_interval)
    raise RuntimeError(f"the run did not end within {RUN_TIMEOUT_SECONDS} s")


def teardown(common: dict[str, Any], cluster_id: str) -> None:
    from airflow_ec2cluster.operators import EC2ClusterTeardownOperator

    EC2ClusterTeardownOperator(task_id="teardown", waiter_delay=1, **common).execute(task_context())
    live = hook_for().list_cluster_instances(cluster_id, ("pending", "running", "stopping", "stopped"))
    if live:
        raise RuntimeError(f"instances left after the teardown: {[i['InstanceId'] for i in live]}")


# -- scale-in ---------------------------------------------------------------------------------------------

# workers, short tasks (count, seconds), long tasks (seconds, enqueued last), idle_shutdown_seconds
SCALE_IN_SIZES = {
    "tiny": (2, (20, 0.05), (2.0, 5.0), 6),
    "full": (3, (150, 0.1), (4.0, 8.0, 45.0), 30),
}


def scale_in_run(local: Any, table: str, size: str, fast: bool) -> dict[str, Any]:
    """One job: short tasks then a few long ones, one task a message and one message a receive (so the
    long ones go to different workers), poked until drained, torn down; per worker, its idle tail."""
    from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator

    workers, (shorts, short_seconds), longs, idle_seconds = SCALE_IN_SIZES[size]
    cluster_id = cloud.unique("scalein")
    common = operators_kwargs(cluster_id, table)
    payloads = [short_seconds] * shorts + list(longs)
    EC2ClusterEnqueueOperator(task_id="enqueue", tasks=payloads, tasks_per_message=1, **common).execute(
        task_context()
    )
    EC2ClusterLaunchOperator(
        task_id="launch",
        num_workers=workers,
        image_id=local.ami_id,
        instance_type=INSTANCE_TYPE,
        handler=SLEEP_HANDLER,
        slots_per_instance=1,  # one task at a time per worker, as issue 15 measured (slots: issue 16)
        worker_options={
            "stop_when_queue_empty": fast,
            "idle_shutdown_seconds": idle_seconds,
            "wait_time_seconds": WAIT_TIME_SECONDS,
            "max_messages": 1,
        },
        **common,
    ).execute(task_context())
    sensor = sensor_for(cluster_id, table, poke_interval=POKE_INTERVAL)
    pokes = poke_loop(sensor, lambda: False)
    drained_at = time.time()
    teardown(common, cluster_id)
    ids = sorted(cluster_instances(cluster_id))
    statuses = {item["sk"]: item for item in hook_for().worker_statuses(table, cluster_id)}
    logs = {iid: events(local, iid) for iid in ids}
    done = [e for found in logs.values() for e in found if e.get("event") == "task.done"]
    if len(done) < len(payloads):
        raise RuntimeError(f"{len(done)} of {len(payloads)} tasks done")
    # The queue had nothing visible left once the last task was received: with one message a receive, the
    # latest task start (its task.done time less its duration) follows that receive by milliseconds.
    queue_empty_at = max(e["ts"] - e["duration_s"] for e in done)
    per_worker = {}
    for iid in ids:
        found = logs[iid]
        stopped = first(found, "worker.stopped")
        if stopped is None:
            raise RuntimeError(f"{iid}: no worker.stopped event (status {statuses.get(iid)})")
        completions = [e["ts"] for e in found if e.get("event") == "task.done"]
        busy_until = max([queue_empty_at, *completions])
        per_worker[iid] = {
            "tail_s": round(max(0.0, stopped["ts"] - busy_until), 2),
            "tasks": len(completions),
            "stop_reason": stopped.get("reason"),
            "queue_reads": sum(1 for e in found if e.get("event") in ("queue.empty", "queue.not_empty")),
        }
    return {
        "per_worker": per_worker,
        "idle_instance_seconds": round(sum(w["tail_s"] for w in per_worker.values()), 2),
        "drained_after_queue_empty_s": round(drained_at - queue_empty_at, 2),
        "pokes": pokes,
        "idle_shutdown_seconds": idle_seconds,
    }


def scale_in(size: str) -> Result:
    workers, (shorts, short_seconds), longs, idle_seconds = SCALE_IN_SIZES[size]
    result = Result("scale-in", size)
    with local_cloud() as (local, table):
        fast = scale_in_run(local, table, size, fast=True)
        slow = scale_in_run(local, table, size, fast=False)
    job = (
        f"{workers} workers, {shorts} x {short_seconds:g} s then {', '.join(f'{s:g}' for s in longs)} s; "
        f"poke {POKE_INTERVAL:g} s, long poll {WAIT_TIME_SECONDS} s"
    )
    fast_sum, slow_sum = fast["idle_instance_seconds"], slow["idle_instance_seconds"]
    result.add(
        f"idle instance-s after the last visible task, fast scale-in ({job})",
        fast_sum,
        slow_sum,
        "< reference",
        fast_sum < slow_sum,
    )
    result.add(
        f"  ratio fast / without (stop_when_queue_empty false, idle_shutdown_seconds {idle_seconds})",
        round(fast_sum / slow_sum, 3) if slow_sum else None,
    )
    tails = [w["tail_s"] for w in fast["per_worker"].values()]
    result.add(
        "idle s per worker, fast scale-in (max; long poll "
        f"{WAIT_TIME_SECONDS} s + 1 GetQueueAttributes + stop)",
        max(tails),
        max(w["tail_s"] for w in slow["per_worker"].values()),
        f"<= poke interval {POKE_INTERVAL:g}",
        max(tails) <= POKE_INTERVAL,
    )
    result.add("  mean idle s per worker, fast scale-in", round(statistics.mean(tails), 2))
    stops = [w for w in fast["per_worker"].values() if w["stop_reason"] == "queue-empty"]
    reads = sum(w["queue_reads"] for w in fast["per_worker"].values())
    result.add(
        "GetQueueAttributes per queue-empty stop (worker logs)",
        round(reads / len(stops), 3) if stops else None,
        sum(w["queue_reads"] for w in slow["per_worker"].values()),
        "1",
        bool(stops) and reads == len(stops),
    )
    result.details = {
        "per worker, fast (tail s, tasks, stop reason)": {
            iid: (w["tail_s"], w["tasks"], w["stop_reason"]) for iid, w in fast["per_worker"].items()
        },
        "per worker, without (tail s, tasks, stop reason)": {
            iid: (w["tail_s"], w["tasks"], w["stop_reason"]) for iid, w in slow["per_worker"].items()
        },
        "queue-empty stops, fast": f"{len(stops)} of {len(fast['per_worker'])} workers",
        "drained after the last receive, s (fast, without)": (
            fast["drained_after_queue_empty_s"],
            slow["drained_after_queue_empty_s"],
        ),
        "reference": "the same job, stop_when_queue_empty false: a worker out of work waits "
        f"idle_shutdown_seconds ({idle_seconds} s here; default 300) or the teardown, whichever comes first",
    }
    return result


# -- interruption-replacement -----------------------------------------------------------------------------

# workers, tasks, task seconds
INTERRUPT_SIZES = {"tiny": (2, 400, 0.25), "full": (3, 900, 0.25)}
NOTICE_SECONDS = 30.0
TASKS_BEFORE_NOTICE = 10


class Replacements:
    """Between pokes: once every first worker has done a task, a spot notice to one of them; once its
    replacement has done a task, a rebalance recommendation to another; then stop poking."""

    def __init__(self, local: Any, cluster_id: str, table: str, first_ids: set[str]) -> None:
        self.local, self.cluster_id, self.table = local, cluster_id, table
        self.first_ids = set(first_ids)
        self.known = set(first_ids)
        self.injected: list[dict[str, Any]] = []  # {"kind", "instance_id", "at", "replacement"}

    def first_task_at(self, instance_id: str) -> float | None:
        done = first(events(self.local, instance_id), "task.done")
        return done["ts"] if done else None

    def running_workers(self) -> list[str]:
        items = hook_for().worker_statuses(self.table, self.cluster_id)
        return sorted(i["sk"] for i in items if i.get("state") == "running" and i["sk"] in self.first_ids)

    def __call__(self) -> bool:
        if not self.injected:
            started = [self.first_task_at(iid) for iid in self.first_ids]
            tasks = sum(
                1 for iid in self.first_ids for e in events(self.local, iid) if e.get("event") == "task.done"
            )
            if None in started or tasks < TASKS_BEFORE_NOTICE:
                return False
            return self._inject("spot-interruption")
        last = self.injected[-1]
        if last["replacement"] is None:
            new = sorted(set(cluster_instances(self.cluster_id)) - self.known)
            if new:
                last["replacement"] = new[0]
                self.known.update(new)
                last["also_launched"] = new[1:]
        if last["replacement"] is None or self.first_task_at(last["replacement"]) is None:
            return False
        if len(self.injected) == 1:
            return self._inject("rebalance-recommendation")
        return True

    def _inject(self, kind: str) -> bool:
        taken = {i["instance_id"] for i in self.injected}
        candidates = [iid for iid in self.running_workers() if iid not in taken]
        if not candidates:
            return False
        iid = candidates[0]
        at = time.time()
        if kind == "spot-interruption":
            self.local.inject_spot_interruption(iid, notice_seconds=NOTICE_SECONDS)
        else:
            self.local.inject_rebalance_recommendation(iid)
        self.injected.append({"kind": kind, "instance_id": iid, "at": at, "replacement": None})
        return False


def interruption_replacement(size: str) -> Result:
    from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator

    workers, tasks, seconds = INTERRUPT_SIZES[size]
    result = Result("interruption-replacement", size)
    with local_cloud() as (local, table):
        cluster_id = cloud.unique("spot")
        common = operators_kwargs(cluster_id, table)
        subnets = default_subnets()
        EC2ClusterEnqueueOperator(
            task_id="enqueue", tasks=[seconds] * tasks, tasks_per_message=1, **common
        ).execute(task_context())
        launch = EC2ClusterLaunchOperator(
            task_id="launch",
            num_workers=workers,
            image_id=local.ami_id,
            instance_type=INSTANCE_TYPE,
            capacity="spot",
            subnet_ids=subnets,
            handler=SLEEP_HANDLER,
            slots_per_instance=1,  # as issue 15 measured
            worker_options={"wait_time_seconds": WAIT_TIME_SECONDS},
            **common,
        )
        launched_at: list[float] = []
        on_call(launch.hook.ec2, "CreateFleet", launched_at)
        first_ids = set(launch.execute(task_context())["instance_ids"])
        sensor = sensor_for(cluster_id, table, poke_interval=POKE_INTERVAL)
        replaced_at: list[float] = []
        on_call(sensor.hook.ec2, "CreateFleet", replaced_at)
        watch = Replacements(local, cluster_id, table, first_ids)
        pokes = poke_loop(sensor, watch)
        # Measured before the teardown: the logs and the instances' pools.
        instances = cluster_instances(cluster_id)
        logs = {iid: events(local, iid) for iid in instances}
        statuses = {item["sk"]: item for item in hook_for().worker_statuses(table, cluster_id)}
        teardown(common, cluster_id)
    if len(watch.injected) < 2 or watch.injected[-1]["replacement"] is None:
        raise RuntimeError(f"the job drained before both replacements took work: {watch.injected}")

    def first_task(iid: str) -> float:
        return first(logs[iid], "task.done")["ts"]

    boots = sorted(first_task(iid) - launched_at[0] for iid in first_ids)
    boot = statistics.median(boots)
    target = POKE_INTERVAL + boot
    result.details["the boot: launch (CreateFleet returned) -> first task, first workers, s"] = [
        round(b, 2) for b in boots
    ]
    for injected in watch.injected:
        kind, iid, at, new = (
            injected["kind"],
            injected["instance_id"],
            injected["at"],
            injected["replacement"],
        )
        found = logs[iid]
        seen = first(
            found,
            "spot.interruption_notice" if kind == "spot-interruption" else "spot.rebalance_recommendation",
        )
        stopping = first(found, "worker.stopping")
        stopped = first(found, "worker.stopped")
        fleet = min((t for t in replaced_at if t >= at), default=None)
        taken = first_task(new)
        total = taken - at
        label = "spot notice" if kind == "spot-interruption" else "rebalance recommendation"
        result.add(
            f"s from {label} posted to the replacement's first task (poke {POKE_INTERVAL:g} s)",
            round(total, 2),
            round(target, 2),
            f"<= poke + boot = {target:.2f}",
            total <= target,
        )
        result.add(f"  {label} -> worker saw it (metadata poll, every 5 s)", round(seen["ts"] - at, 2))
        result.add(
            f"  {label} -> worker stopping (its status item, what the drain reads)",
            round(stopping["ts"] - at, 2),
        )
        result.add(f"  {label} -> worker stopped", round(stopped["ts"] - at, 2))
        result.add(
            "  worker stopping -> replacement launched (the drain's CreateFleet returned)",
            round(fleet - stopping["ts"], 2) if fleet else None,
            None,
            f"<= poke {POKE_INTERVAL:g} + a poke",
        )
        result.add(
            "  replacement launched -> its first task (its boot)",
            round(taken - fleet, 2) if fleet else None,
            round(boot, 2),
        )
        result.details[f"{label}: instance, stop_reason, pool"] = (
            iid,
            statuses.get(iid, {}).get("stop_reason"),
            pool_of(instances[iid]),
        )
        result.details[f"{label}: replacement, pool, LaunchTime"] = (
            new,
            pool_of(instances[new]),
            str(instances[new]["LaunchTime"]),
        )
        if kind == "rebalance-recommendation":
            other = pool_of(instances[new]) != pool_of(instances[iid])
            result.add(
                "rebalance replacement in another pool (DescribeInstances: type, zone)",
                other,
                None,
                "yes",
                other,
            )
            reason = statuses.get(iid, {}).get("stop_reason")
            result.add(
                "  stop_reason of the recommended worker",
                reason,
                None,
                "rebalance-recommendation",
                reason == "rebalance-recommendation",
            )
    result.details["pools of the first workers"] = sorted(pool_of(instances[i]) for i in first_ids)
    result.details["replacement CreateFleet calls, pokes"] = (len(replaced_at), pokes)
    return result
