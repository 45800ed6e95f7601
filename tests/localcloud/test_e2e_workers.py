"""End to end on the local cloud: three instances run the real worker from rendered user data.

The user data is the launch's: a boot loader that fetches the cluster's bundle from S3 into a venv of its own.
Terminating the instances while their workers sit in 20 s long polls stops each worker cleanly (status
'stopped') well within the runner's grace period: none is killed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.project import apply_project_policies
from ec2cluster_worker import records
from ec2cluster_worker.config import WorkerConfig

from airflow_ec2cluster.cluster import task_queue_name

from .helpers import processes_in_groups, wait_for, worker_user_data

TASKS = 200
WORKERS = 3


def create_state_table(dynamodb, name: str) -> None:
    dynamodb.create_table(
        TableName=name,
        **records.STATE_TABLE_SCHEMA,
    )


def task_log(dynamodb, table: str, cluster_id: str) -> dict[str, dict]:
    paginator = dynamodb.get_paginator("query")
    items = {}
    for pk in records.all_log_pks(cluster_id):
        pages = paginator.paginate(
            TableName=table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
        )
        for page in pages:
            for item in page["Items"]:
                items[item["sk"]["S"]] = item
    return items


def enqueue(sqs, queue_url: str, count: int) -> None:
    for start in range(0, count, 10):
        entries = [
            {
                "Id": str(i),
                "MessageBody": json.dumps(
                    {
                        "task_id": f"t{start + i:09d}",
                        "payload": {"id": start + i, "text": ":) " * ((start + i) % 7)},
                    }
                ),
            }
            for i in range(min(10, count - start))
        ]
        answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        assert not answer.get("Failed"), answer["Failed"]


@pytest.mark.e2e
def test_three_workers_run_two_hundred_tasks(tmp_path: Path):
    cluster_id = f"e2e-{uuid.uuid4().hex[:12]}"
    table = f"ec2cluster-state-{uuid.uuid4().hex[:8]}"
    with LocalCloud(work_dir=tmp_path) as cloud:
        apply_project_policies(cloud, "--state-table", table)  # the workers hold exactly --side worker
        ec2, sqs, dynamodb = cloud.client("ec2"), cloud.client("sqs"), cloud.client("dynamodb")
        create_state_table(dynamodb, table)
        queue_url = sqs.create_queue(QueueName=task_queue_name(cluster_id))["QueueUrl"]
        config = {
            "cluster_id": cluster_id,
            "region": cloud.region,
            "queue_url": queue_url,
            "state_table": table,
            "handler": {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
            "wait_time_seconds": 20,
            "heartbeat_seconds": 2,
            "idle_shutdown_seconds": 120,
        }
        WorkerConfig.from_dict(config)
        enqueue(sqs, queue_url, TASKS)
        launched = ec2.run_instances(
            ImageId=cloud.ami_id,
            MinCount=WORKERS,
            MaxCount=WORKERS,
            UserData=worker_user_data(cloud, config),
            InstanceInitiatedShutdownBehavior="terminate",
            IamInstanceProfile={"Name": cloud.instance_profile_name},
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "ec2cluster:cluster-id", "Value": cluster_id}]}
            ],
        )
        instance_ids = [instance["InstanceId"] for instance in launched["Instances"]]

        def complete_log() -> dict[str, dict] | None:
            log = task_log(dynamodb, table, cluster_id)
            return log if len(log) >= TASKS else None

        items = wait_for(complete_log, 120, "all task results", interval=0.5)
        assert sorted(items) == [f"t{i:09d}" for i in range(TASKS)]
        for task_id, item in items.items():
            assert item["status"]["S"] == records.TASK_DONE, item
            i = int(task_id[1:])
            assert json.loads(item["result"]["S"]) == {"id": i, "smileys": i % 7}
        workers_seen = {item["worker_id"]["S"] for item in items.values()}
        assert workers_seen <= set(instance_ids)

        processes = cloud.worker_processes()
        assert set(processes) == set(instance_ids)
        groups = {info["pgid"] for info in processes.values()}
        ec2.terminate_instances(InstanceIds=instance_ids)
        wait_for(
            lambda: not any(info["alive"] for info in cloud.worker_processes().values()),
            30,
            "the workers to stop after termination",
        )
        assert processes_in_groups(groups) == []
        assert not [iid for iid, info in cloud.worker_processes().items() if info["killed"]]
        status = dynamodb.query(
            TableName=table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": records.workers_pk(cluster_id)}},
        )["Items"]
        assert {item["sk"]["S"] for item in status} == set(instance_ids)
        assert {(item["state"]["S"], item["stop_reason"]["S"]) for item in status} == {
            (records.STATE_STOPPED, "signal:SIGTERM")
        }
    assert processes_in_groups(groups) == []
