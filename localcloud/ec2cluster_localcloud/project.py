"""The project's identities in the local cloud: what a user of airflow-ec2cluster sets up in their account.

The controller (the Airflow connection) is an IAM user holding exactly ``ec2cluster iam-policy --side
controller``; the worker instance profile's role holds exactly ``--side worker``. With the local cloud's IAM
enforced, these policies are all either side may do, so every test and demo run proves them sufficient.
Needs the provider (``airflow_ec2cluster``) importable: the demo and the tests have it.
"""

from __future__ import annotations

import argparse
from typing import Any

from ec2cluster_localcloud.account import ACCOUNT_ID
from ec2cluster_localcloud.cloud import LocalCloud

CONTROLLER_USER = "ec2cluster-controller"


def iam_policy_documents(region: str, *options: str) -> dict[str, dict[str, Any]]:
    """What ``ec2cluster iam-policy --region <region> --account-id <account> <options>`` prints."""
    from airflow_ec2cluster.commands.iam_policy import register, scope_from
    from airflow_ec2cluster.iam import controller_policy, worker_policy

    parser = argparse.ArgumentParser(prog="ec2cluster")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["iam-policy", "--region", region, "--account-id", ACCOUNT_ID, *options])
    scope = scope_from(args)
    return {"controller": controller_policy(scope), "worker": worker_policy(scope)}


def apply_project_policies(cloud: LocalCloud, *options: str) -> dict[str, str]:
    """Give the worker role its policy and create the controller user; the controller's access key."""
    documents = iam_policy_documents(cloud.region, *options)
    cloud.set_worker_policy(documents["worker"])
    return cloud.create_user(CONTROLLER_USER, documents["controller"])


def controller_env(cloud: LocalCloud, controller: dict[str, str]) -> dict[str, str]:
    """The environment of the Airflow side: the endpoint, and the controller user as the connection
    ``aws_default`` and as boto3's default credentials (so that no call can slip by as the root)."""
    env = cloud.env()
    env.pop("AWS_SESSION_TOKEN", None)
    env.update(
        AWS_ACCESS_KEY_ID=controller["AccessKeyId"], AWS_SECRET_ACCESS_KEY=controller["SecretAccessKey"]
    )
    return {**env, **cloud.airflow_conn_env(credentials=controller)}
