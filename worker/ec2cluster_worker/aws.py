"""The one place that makes AWS clients.

Retries are botocore's own (standard mode), credentials come only from the default chain (instance profile on
EC2), and AWS_ENDPOINT_URL (the local cloud) is honoured by boto3 itself (boto3 >= 1.28).
Sessions are not thread-safe, so every client is made here, in the main thread, before threads start;
clients themselves are thread-safe.
"""

from __future__ import annotations

import functools
from typing import Any

import boto3
from botocore.config import Config

MAX_ATTEMPTS = 10


def client_config() -> Config:
    # read_timeout above the 20 s long poll, so a ReceiveMessage wait is never cut short.
    # parameter_validation off: the worker's requests have fixed shapes built (and tested) here, and AWS
    # validates them anyway; botocore's client-side walk of every request was a tenth of its CPU per task.
    return Config(
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        connect_timeout=5,
        read_timeout=40,
        parameter_validation=False,
    )


class AwsClients:
    """The worker's clients, all from one session and one region."""

    def __init__(self, region: str, session: boto3.session.Session | None = None) -> None:
        self.session = session or boto3.session.Session()
        self.region = region
        self._config = client_config()
        self.sqs = self.client("sqs")
        self.dynamodb = self.client("dynamodb")

    @functools.cached_property
    def dynamodb_resource(self) -> Any:
        """A DynamoDB resource (for the table sink's batch_writer); made on first use, in the main thread."""
        return self.session.resource("dynamodb", region_name=self.region, config=self._config)

    def client(self, service: str) -> Any:
        return self.session.client(service, region_name=self.region, config=self._config)


def error_code(error: Exception) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
