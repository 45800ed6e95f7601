"""Controller benchmarks: API calls and CPU per sensor poke, drain latency, CreateFleet calls per launch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from ec2cluster_worker import records

from airflow_ec2cluster.meta import MetaUpdate
from airflow_ec2cluster.tasklog import tally

from . import cloud
from .counting import CallCounter
from .result import Result

MAX_CALLS_PER_POKE = 5
# One of the AMIs moto registers by default.
MOTO_AMI_ID = "ami-03cf127a"
POKE_SIZES = {"tiny": ((3, 30), (100, 1000)), "full": ((10, 100, 1000), (1_000, 100_000))}


class TaskInstance:
    """What the operators use of the task context's ``ti`` outside a task runner: XCom push."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def task_context() -> dict[str, Any]:
    return {"ti": TaskInstance()}


def sensor_for(cluster_id: str, table: str, **kwargs: Any):
    from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor

    return QueueDrainedSensor(
        task_id=f"drain-{cluster_id}",
        cluster_id=cluster_id,
        state_table=table,
        aws_conn_id=None,
        region_name=cloud.REGION,
        **kwargs,
    )


def hook_for():
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    return EC2ClusterHook(aws_conn_id=None, region_name=cloud.REGION)


# -- poke-calls -------------------------------------------------------------------------------------------


def busy_cluster(hook: Any, table: str, tasks: int) -> str:
    """A cluster mid-job: work on the queue, ``tasks`` logged tasks, no workers yet."""
    cluster_id = cloud.unique("poke")
    queue_url, dlq_url = hook.ensure_queues(cluster_id)
    cloud.fill_queue(queue_url, 20)
    hook.update_meta(
        table,
        cluster_id,
        MetaUpdate(
            queue_url=queue_url,
            dlq_url=dlq_url,
            enqueued=tasks + 20,
            enqueue_complete=True,
            log_shards=records.DEFAULT_LOG_SHARDS,
            launched_at=time.time(),
        ),
    )
    write_task_log(table, cluster_id, tasks)
    return cluster_id


def worker_log_pk(cluster_id: str, worker_id: str) -> str:
    # The reference design: each worker's own log partition, newest entry last.
    return f"C#{cluster_id}#L#{worker_id}"


def seed_worker_logs(table: str, cluster_id: str, worker_ids: list[str]) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dynamodb.models import dynamodb_backends

    backend = dynamodb_backends[DEFAULT_ACCOUNT_ID][cloud.REGION]
    for iid in worker_ids:
        backend.put_item(
            table,
            {"pk": {"S": worker_log_pk(cluster_id, iid)}, "sk": {"S": "t000000000"}, "status": {"S": "done"}},
        )


def write_task_log(table: str, cluster_id: str, tasks: int, start: int = 0) -> None:
    """Seed ``tasks`` task-log items straight into the in-process moto backend.

    Over HTTP, moto takes minutes for 100,000 items; the poke never reads them, and what is measured (the
    poke) goes over HTTP like any client's calls.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dynamodb.models import dynamodb_backends

    backend = dynamodb_backends[DEFAULT_ACCOUNT_ID][cloud.REGION]
    now = str(int(time.time()))
    for index in range(start, tasks):
        task = cloud.task_id(index)
        key = records.task_log_key(cluster_id, task)
        backend.put_item(
            table,
            {
                "pk": {"S": key["pk"]},
                "sk": {"S": task},
                "task_id": {"S": task},
                "status": {"S": records.TASK_DONE},
                "worker_id": {"S": "i-0"},
                "finished_at": {"N": now},
                "result": {"S": '{"ok":true}'},
            },
        )


@contextlib.contextmanager
def in_process_server() -> Iterator[str]:
    """A moto server in this process (so the task log can be seeded directly); CPU is measured per thread."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with cloud.pointed_at(cloud.client_env(f"http://{host}:{port}")):
            yield f"http://{host}:{port}"
    finally:
        server.stop()


def add_workers(table: str, cluster_id: str, count: int, tasks_done: int) -> list[str]:
    """``count`` running instances tagged for the cluster, each with a fresh, busy status item."""
    from airflow_ec2cluster.cluster import TAG_CLUSTER_ID

    ec2 = cloud.client("ec2")
    instances = ec2.run_instances(
        ImageId=MOTO_AMI_ID,
        MinCount=count,
        MaxCount=count,
        InstanceType="t3.micro",
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": TAG_CLUSTER_ID, "Value": cluster_id}]}
        ],
    )["Instances"]
    ids = [i["InstanceId"] for i in instances]
    now = time.time()
    with cloud.boto3.resource("dynamodb", region_name=cloud.REGION).Table(table).batch_writer() as batch:
        for iid in ids:
            batch.put_item(
                Item={
                    "pk": records.workers_pk(cluster_id),
                    "sk": iid,
                    "worker_id": iid,
                    "cluster_id": cluster_id,
                    "state": records.STATE_RUNNING,
                    "started_at": int(now - 60),
                    "heartbeat_at": int(now),
                    "busy": True,
                    "busy_task_id": "t000000000",
                    "busy_since": int(now),
                    "tasks_done": tasks_done,
                    "tasks_failed": 0,
                    "expires_at": int(now) + 86400,
                }
            )
    return ids


def warm_sensor(cluster_id: str, table: str, workers: int) -> Any:
    """A sensor whose clients are made and first answers parsed (its first poke is not measured)."""
    sensor = sensor_for(cluster_id, table, cluster_size=workers, poke_interval=2)
    if sensor.poke({}) is not False:
        raise RuntimeError("the busy cluster read as drained")
    return sensor


def measure_poke(sensor: Any, workers: int) -> dict[str, Any]:
    # The cluster's size follows the workers added, so the busy cluster never asks for replacements.
    sensor.cluster_size = workers
    hook = sensor.hook
    counter = CallCounter().attach_clients(hook.sqs, hook.ec2, hook.dynamodb)
    cpu, wall = time.thread_time(), time.perf_counter()
    if sensor.poke({}) is not False:
        raise RuntimeError("the busy cluster read as drained")
    return {
        "calls": counter.total,
        "by_operation": counter.by_operation(),
        "cpu_ms": (time.thread_time() - cpu) * 1000,
        "wall_ms": (time.perf_counter() - wall) * 1000,
    }


# Per-worker Queries timed in the reference beyond which the rest are extrapolated (see below).
REFERENCE_QUERY_SAMPLE = 100


def measure_per_worker_reads(
    hook: Any, cluster_id: str, table: str, log_table: str, worker_ids: list[str]
) -> dict[str, Any]:
    """The reference: the same queue and instance reads, then one Query per worker for its last entry.

    moto answers a Query by scanning the whole table (DynamoDB reads only the partition), so 1,000 Queries
    take about 50 s on moto, a moto artefact: the logs live in a table of their own, and beyond
    ``REFERENCE_QUERY_SAMPLE`` workers only that many Queries are made and timed, the calls and times of the
    rest scaled from them (``sampled`` says so). Every Query costs the same one call, so the count is exact.
    """
    meta = hook.get_meta(table, cluster_id)
    counter = CallCounter().attach_clients(hook.sqs, hook.ec2, hook.dynamodb)
    cpu, wall = time.thread_time(), time.perf_counter()
    hook.get_meta(table, cluster_id)
    hook.queue_counts(meta.queue_url, meta.dlq_url)
    hook.list_cluster_instances(cluster_id)
    fixed_calls = counter.total
    fixed_cpu, fixed_wall = time.thread_time() - cpu, time.perf_counter() - wall
    sample = worker_ids[:REFERENCE_QUERY_SAMPLE]
    cpu, wall = time.thread_time(), time.perf_counter()
    for iid in sample:
        hook.dynamodb.query(
            TableName=log_table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": worker_log_pk(cluster_id, iid)}},
            ScanIndexForward=False,
            Limit=1,
        )
    scale = len(worker_ids) / max(len(sample), 1)
    result = {
        "calls": fixed_calls + round((counter.total - fixed_calls) * scale),
        "cpu_ms": (fixed_cpu + (time.thread_time() - cpu) * scale) * 1000,
        "wall_ms": (fixed_wall + (time.perf_counter() - wall) * scale) * 1000,
        "sampled": len(sample) < len(worker_ids),
    }
    counter.calls.clear()
    return result


def poke_calls(size: str) -> Result:
    """The poke's calls over the grid of worker and task levels, beside the per-worker-read reference.

    Two clusters: A logs the fewer tasks and is poked at every worker level; B logs the more tasks and is
    poked at every worker level but the largest; then A's task log is topped up to the larger level and A is
    poked again at the largest. So each point of the grid is measured while moto creates the largest fleet
    once (about 12 s and 15 s per DescribeInstances of it: moto, not EC2), which keeps the run in 2 minutes.
    """
    worker_levels, (few_tasks, many_tasks) = POKE_SIZES[size]
    result = Result("poke-calls", size)
    calls_seen: list[int] = []
    with in_process_server():
        table = cloud.create_state_table()
        log_table = cloud.create_state_table()
        hook = hook_for()
        fleet_a = Fleet(hook, table, log_table, few_tasks)
        for workers in worker_levels:
            calls_seen.append(fleet_a.measure(result, workers))
        fleet_b = Fleet(hook, table, log_table, many_tasks)
        for workers in worker_levels[:-1]:
            calls_seen.append(fleet_b.measure(result, workers))
        fleet_a.log_more_tasks(many_tasks)
        calls_seen.append(fleet_a.measure(result, worker_levels[-1]))
    flat = len(set(calls_seen)) == 1
    result.add("calls per poke flat in tasks and workers", flat, None, "flat", flat)
    return result


class Fleet:
    """A busy cluster that grows: workers added, tasks logged, a warm sensor poking it."""

    def __init__(self, hook: Any, table: str, log_table: str, tasks: int) -> None:
        self.hook, self.table, self.log_table, self.tasks = hook, table, log_table, tasks
        self.cluster_id = busy_cluster(hook, table, tasks)
        self.worker_ids: list[str] = []
        self.sensor: Any = None

    def log_more_tasks(self, tasks: int) -> None:
        write_task_log(self.table, self.cluster_id, tasks, start=self.tasks)
        self.tasks = tasks

    def measure(self, result: Result, workers: int) -> int:
        """Grow to ``workers``, poke once (measured) and make the reference reads; the poke's calls."""
        if workers > len(self.worker_ids):
            added = add_workers(self.table, self.cluster_id, workers - len(self.worker_ids), 0)
            seed_worker_logs(self.log_table, self.cluster_id, added)
            self.worker_ids += added
        self.sensor = self.sensor or warm_sensor(self.cluster_id, self.table, workers)
        ours = measure_poke(self.sensor, workers)
        naive = measure_per_worker_reads(
            self.hook, self.cluster_id, self.table, self.log_table, self.worker_ids
        )
        label = f"{workers:,} workers, {self.tasks:,} logged tasks"
        if naive["sampled"]:
            result.details[f"reference, {label}"] = (
                f"{REFERENCE_QUERY_SAMPLE} of {workers:,} per-worker Queries made and timed, "
                "the rest scaled (moto scans the table on every Query)"
            )
        result.add(
            f"calls per poke, {label}",
            ours["calls"],
            naive["calls"],
            f"<= {MAX_CALLS_PER_POKE}",
            ours["calls"] <= MAX_CALLS_PER_POKE,
        )
        result.add(f"  CPU ms per poke, {label}", round(ours["cpu_ms"], 1), round(naive["cpu_ms"], 1))
        result.add(f"  wall ms per poke, {label}", round(ours["wall_ms"], 1), round(naive["wall_ms"], 1))
        result.details[f"calls by operation, {label}"] = ours["by_operation"]
        return ours["calls"]


# -- drain-latency ----------------------------------------------------------------------------------------

POKE_INTERVAL = 2.0
DRAIN_SIZES = {"tiny": (20, 1), "full": (200, 2)}
SMILEY_HANDLER = {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"}
DRAIN_TIMEOUT_SECONDS = 90


def operators_kwargs(cluster_id: str, table: str) -> dict[str, Any]:
    return {"cluster_id": cluster_id, "state_table": table, "aws_conn_id": None, "region_name": cloud.REGION}


def run_until_drained(sensor: Any) -> int:
    """Poke as Airflow does (poke, sleep poke_interval, poke...) until drained; the number of pokes."""
    from airflow.sdk import PokeReturnValue

    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    pokes = 0
    while time.monotonic() < deadline:
        answer = sensor.poke({})
        pokes += 1
        if isinstance(answer, PokeReturnValue) and answer.is_done:
            return pokes
        time.sleep(sensor.poke_interval)
    raise RuntimeError(f"not drained after {DRAIN_TIMEOUT_SECONDS} s")


def measure_drain(tasks: int, workers: int, drained_checks: int) -> dict[str, Any]:
    """One job on the local cloud: enqueue, launch, poke until drained, tear down; the seconds it took."""
    from ec2cluster_localcloud import LocalCloud
    from ec2cluster_localcloud.project import apply_project_policies

    from airflow_ec2cluster.operators import (
        EC2ClusterEnqueueOperator,
        EC2ClusterLaunchOperator,
        EC2ClusterTeardownOperator,
    )

    with LocalCloud(grace_seconds=5) as local, cloud.pointed_at(local.env()):
        table = cloud.create_state_table()
        apply_project_policies(local, "--state-table", table)  # IAM enforced: the workers' role policy
        cluster_id = cloud.unique("drain")
        common = operators_kwargs(cluster_id, table)
        payloads = [{"id": i, "text": ":) " * (i % 5)} for i in range(tasks)]
        EC2ClusterEnqueueOperator(task_id="enqueue", tasks=payloads, **common).execute(task_context())
        EC2ClusterLaunchOperator(
            task_id="launch",
            num_workers=workers,
            image_id=local.ami_id,
            instance_type="t3.micro",
            handler=SMILEY_HANDLER,
            **common,
        ).execute(task_context())
        sensor = sensor_for(cluster_id, table, poke_interval=POKE_INTERVAL, drained_checks=drained_checks)
        pokes = run_until_drained(sensor)
        drained_at = time.time()
        EC2ClusterTeardownOperator(task_id="teardown", **common).execute(task_context())
        terminated_at = time.time()
        hook = hook_for()
        live = hook.list_cluster_instances(
            cluster_id, ("pending", "running", "stopping", "stopped", "shutting-down")
        )
        items = list(hook.iter_task_log(table, cluster_id))
    # One item per message (a group's item is written when its last task finishes).
    finished = [float(item["finished_at"]) for item in items]
    logged = tally(items)[records.TASK_DONE]
    if live or logged != tasks:
        raise RuntimeError(f"{len(live)} instances still live, {logged} of {tasks} tasks logged")
    return {
        "latency": terminated_at - max(finished),
        "to_drained": drained_at - max(finished),
        "pokes": pokes,
        "idle_timeout": sensor.idle_timeout,
    }


def drain_latency(size: str) -> Result:
    tasks, workers = DRAIN_SIZES[size]
    target = 2 * POKE_INTERVAL + 3
    result = Result("drain-latency", size)
    from airflow_ec2cluster.defaults import DEFAULT_DRAINED_CHECKS

    # The sensor's default (2 consecutive empty reads, with the task log agreeing), and beside it 3 reads
    # (the default before): what each extra read costs.
    for checks in (DEFAULT_DRAINED_CHECKS, 3) if size == "full" else (DEFAULT_DRAINED_CHECKS,):
        run = measure_drain(tasks, workers, checks)
        result.add(
            f"s from last completion to all terminated, drained_checks={checks} "
            f"({tasks} tasks, {workers} workers, poke {POKE_INTERVAL:g} s)",
            round(run["latency"], 2),
            run["idle_timeout"],
            f"<= {target:g}",
            run["latency"] <= target if checks == DEFAULT_DRAINED_CHECKS else None,
        )
        result.add(
            f"  of which last completion to drained, drained_checks={checks}", round(run["to_drained"], 2)
        )
        result.details[f"pokes, drained_checks={checks}"] = run["pokes"]
    result.details["reference"] = (
        "an idle-time-only controller cannot call a worker idle before its idle_timeout "
        "(the sensor's default, s)"
    )
    return result


# -- launch-calls -----------------------------------------------------------------------------------------

LAUNCH_SIZES = {"tiny": 5, "full": 100}


def launch_calls(size: str) -> Result:
    from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator

    workers = LAUNCH_SIZES[size]
    with cloud.moto_server():
        table = cloud.create_state_table()
        cluster_id = cloud.unique("launch")
        common = operators_kwargs(cluster_id, table)
        cloud.client("iam").create_instance_profile(InstanceProfileName="ec2cluster-worker")
        EC2ClusterEnqueueOperator(task_id="enqueue", tasks=[1, 2, 3], **common).execute(task_context())
        launch = EC2ClusterLaunchOperator(
            task_id="launch",
            num_workers=workers,
            image_id=MOTO_AMI_ID,
            instance_type="t3.micro",
            handler=SMILEY_HANDLER,
            **common,
        )
        hook = launch.hook
        counter = CallCounter().attach_clients(hook.sqs, hook.ec2, hook.dynamodb, hook.iam)
        descriptor = launch.execute(task_context())
        live = hook.list_cluster_instances(cluster_id)
    if len(descriptor["instance_ids"]) != workers or len(live) != workers:
        raise RuntimeError(f"launched {len(descriptor['instance_ids'])}, {len(live)} live, wanted {workers}")
    fleet_calls = counter.count("CreateFleet")
    result = Result("launch-calls", size)
    result.add(f"CreateFleet calls to start {workers} workers", fleet_calls, workers, "1", fleet_calls == 1)
    result.add("all API calls of the launch operator", counter.total)
    result.details = {"calls by operation": counter.by_operation()}
    return result
