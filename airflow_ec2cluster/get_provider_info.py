"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from airflow_ec2cluster import __version__

INTEGRATION_NAME = "EC2 Cluster"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-ec2cluster",
        "name": "EC2 Cluster",
        "description": (
            "Run a batch job on a temporary cluster of EC2 instances fed by an SQS queue, "
            "watch it drain, replace hung or idle workers, and tear the cluster down."
        ),
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": INTEGRATION_NAME,
                "external-doc-url": "https://aws.amazon.com/ec2/",
                "tags": ["aws"],
            }
        ],
        "hooks": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": ["airflow_ec2cluster.hooks.ec2cluster"],
            }
        ],
        "operators": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": [
                    "airflow_ec2cluster.operators.enqueue",
                    "airflow_ec2cluster.operators.launch",
                    "airflow_ec2cluster.operators.redrive",
                    "airflow_ec2cluster.operators.teardown",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": ["airflow_ec2cluster.sensors.ec2cluster"],
            }
        ],
        "triggers": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": ["airflow_ec2cluster.triggers.ec2cluster"],
            }
        ],
        "extra-links": [
            "airflow_ec2cluster.links.EC2ClusterInstancesLink",
            "airflow_ec2cluster.links.EC2ClusterQueueLink",
            "airflow_ec2cluster.links.EC2ClusterStateTableLink",
        ],
    }
