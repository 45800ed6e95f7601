"""ec2_cluster_example: count the smileys in 3,000 tweets on a temporary EC2 cluster, then tear it down.

enqueue >> launch >> drain >> report, with teardown as the launch's teardown task: it terminates every
instance of the cluster even when drain or anything else upstream fails. The params can be changed when
triggering from the UI; `make demo` runs this DAG on the local cloud in a real Airflow deployment, and
`make up` keeps one running for you to trigger it from the UI.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.operators import (
    EC2ClusterEnqueueOperator,
    EC2ClusterLaunchOperator,
    EC2ClusterTeardownOperator,
)
from airflow_ec2cluster.sensors import QueueDrainedSensor

TWEETS = Path(__file__).resolve().parent / "data" / "tweets.jsonl"
TOP_TWEETS = 3
STATE_TABLE = "ec2cluster-state"


def read_tweets(limit: int | None = None):
    """The job's tasks: one payload per tweet (the first ``limit``), streamed from the data file."""
    with TWEETS.open(encoding="utf-8") as lines:
        tweets = (json.loads(line) for line in lines if line.strip())
        for tweet in itertools.islice(tweets, limit):
            yield {"id": tweet["id"], "text": tweet["text"]}


with DAG(
    dag_id="ec2_cluster_example",
    description="Count smileys in tweets on a temporary EC2 cluster fed by SQS",
    schedule=None,
    catchup=False,
    render_template_as_native_obj=True,
    tags=["ec2cluster", "example"],
    params={
        "tweets": Param(3000, type="integer", minimum=1, description="How many tweets to process"),
        "workers": Param(3, type="integer", minimum=1, maximum=100, description="EC2 workers to launch"),
        "instance_type": Param("t3.micro", type="string"),
        "ami_id": Param("", type="string", description="AMI whose python3 is 3.10+ (nothing else needed)"),
        "instance_profile": Param("ec2cluster-worker", type="string"),
        "spot": Param(False, type="boolean", description="Launch spot instances"),
        "network": Param(
            "public",
            enum=["public", "private"],
            description="public: a public IP, through an internet gateway (a default VPC); private: no "
            "public IP, the subnets' NAT gateway or VPC endpoints",
        ),
        "subnet_ids": Param(
            [], type="array", items={"type": "string"}, description="Subnets (default: the default VPC's)"
        ),
        "idle_timeout": Param(300, type="integer", minimum=1, description="Reap a worker idle this long (s)"),
        "fail_on_dead_letters": Param(
            False, type="boolean", description="Fail the run when any task ends in the dead-letter queue"
        ),
        "worker_idle_shutdown": Param(
            600, type="integer", minimum=1, description="A worker with no message this long stops itself (s)"
        ),
        "deferrable": Param(
            False, type="boolean", description="Wait for the drain in the triggerer, freeing the worker slot"
        ),
    },
) as dag:
    enqueue = EC2ClusterEnqueueOperator(
        task_id="enqueue",
        tasks_callable=read_tweets,
        tasks_callable_kwargs={"limit": "{{ params.tweets }}"},
        id_field="id",
    )

    launch = EC2ClusterLaunchOperator(
        task_id="launch",
        num_workers="{{ params.workers }}",
        image_id="{{ params.ami_id }}",
        instance_type="{{ params.instance_type }}",
        instance_profile="{{ params.instance_profile }}",
        spot="{{ params.spot }}",
        network="{{ params.network }}",
        subnet_ids="{{ params.subnet_ids }}",
        handler={"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
        worker_options={"idle_shutdown_seconds": "{{ params.worker_idle_shutdown }}"},
    )

    drain = QueueDrainedSensor(
        task_id="drain",
        idle_timeout="{{ params.idle_timeout }}",
        fail_on_dead_letters="{{ params.fail_on_dead_letters }}",
        poke_interval=5,
        deferrable="{{ params.deferrable }}",
        timeout=6 * 3600,
    )

    @task
    def report(summary: dict) -> dict:
        """What a downstream ETL step does with the job's output: read every result back through the hook."""
        hook = EC2ClusterHook()
        results = [
            item["result"]
            for item in hook.iter_results(STATE_TABLE, summary["cluster_id"])
            if item["status"] == "done"
        ]
        top = sorted(results, key=lambda r: (-r["smileys"], r["id"]))[:TOP_TWEETS]
        report = {
            **summary,
            "results": len(results),
            "total_smileys": sum(r["smileys"] for r in results),
            "top_tweets": top,
        }
        print(json.dumps(report, indent=2, sort_keys=True))
        return report

    teardown = EC2ClusterTeardownOperator(task_id="teardown", delete_queues=True)

    enqueue >> launch >> drain
    report(drain.output)
    drain >> teardown.as_teardown(setups=launch)
