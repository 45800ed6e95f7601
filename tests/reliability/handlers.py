"""Task handlers for the reliability tests, shipped to the workers in the bundle (``handlers:<name>``)."""

from __future__ import annotations

import os
import time
from typing import Any

GATE_LIMIT_SECONDS = 120


def double(payload: Any, context: Any) -> dict[str, Any]:
    """A fast task whose result is checkable: ``{"n": 2 * payload["n"]}``.

    Optionally after a short sleep, or once the file named by ``gate`` exists (the test creates it when it
    has done what must happen before the job can end).
    """
    time.sleep(payload.get("sleep", 0))
    gate = payload.get("gate")
    if gate:
        deadline = time.monotonic() + GATE_LIMIT_SECONDS
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gate {gate} never opened")
            time.sleep(0.05)
    return {"n": 2 * payload["n"]}


def poison_if_asked(payload: Any, context: Any) -> dict[str, Any]:
    if payload.get("poison"):
        raise RuntimeError(f"poison task {context.task_id}")
    return {"n": 2 * payload["n"]}


def hang_if_asked(payload: Any, context: Any) -> dict[str, Any]:
    if payload.get("hang"):
        try:
            time.sleep(3600)
        except Exception:  # a handler that swallows errors must still be stopped
            time.sleep(3600)
    return {"n": 2 * payload["n"]}


def tamper(payload: Any, context: Any) -> dict[str, Any]:
    """A task that tries, with the worker's own credentials (its instance profile's, from instance metadata),
    what a worker must not be able to do; returns the error code AWS answered each attempt with."""
    import json

    import boto3
    from botocore.exceptions import ClientError

    region, table = payload["region"], payload["state_table"]
    dynamodb, sqs = boto3.client("dynamodb", region_name=region), boto3.client("sqs", region_name=region)
    meta_key = {"pk": {"S": f"C#{context.cluster_id}"}, "sk": {"S": "META"}}
    evil_spec = json.dumps({"image_id": "ami-attacker", "instance_type": "p5.48xlarge"})
    attempts = {
        "put META": lambda: dynamodb.put_item(
            TableName=table, Item={**meta_key, "num_workers": {"N": "500"}, "launch_spec": {"S": evil_spec}}
        ),
        "update META": lambda: dynamodb.update_item(
            TableName=table,
            Key=meta_key,
            UpdateExpression="SET num_workers = :n",
            ExpressionAttributeValues={":n": {"N": "500"}},
        ),
        "delete META": lambda: dynamodb.delete_item(TableName=table, Key=meta_key),
        "overwrite the cluster's bundle": lambda: boto3.client("s3", region_name=region).put_object(
            Bucket=payload["bundle_bucket"], Key=payload["bundle_key"], Body=b"evil"
        ),
        "receive from an unrelated queue": lambda: sqs.receive_message(
            QueueUrl=payload["unrelated_queue_url"]
        ),
        "delete its own task queue": lambda: sqs.delete_queue(QueueUrl=payload["own_queue_url"]),
    }
    answers = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            answers[name] = "allowed"
        except ClientError as error:
            answers[name] = error.response["Error"]["Code"]
    return answers
