"""QueueDrainedTrigger: the drain sensor's wait, in the triggerer, with async AWS calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from botocore.exceptions import BotoCoreError, ClientError

from airflow_ec2cluster.calls import run_async
from airflow_ec2cluster.defaults import DEFAULT_MAX_ERROR_ROUNDS
from airflow_ec2cluster.drain.round import DrainSettings, drain_round
from airflow_ec2cluster.hooks.async_io import AsyncClusterIO
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

STATUS_SUCCESS = "success"
STATUS_FAILURE = "failure"
STATUS_ERROR = "error"


class QueueDrainedTrigger(BaseTrigger):
    """Run drain rounds every ``poll_interval`` seconds until the queue is drained or the job cannot finish.

    Each round is exactly the sensor's poke (:func:`~airflow_ec2cluster.drain.round.drain_round`):
    counts, reaping, replacements and the drained decision, with aiobotocore clients so the triggerer's
    event loop never blocks. Everything remembered between rounds is in the cluster's META item, so a
    restarted (or a second) triggerer carries on where the last round left off; this trigger serialises
    only what rebuilds it.

    Yields one event: ``{"status": "success", "summary": {...}}``, ``{"status": "failure", "message"}`` (the
    job cannot finish: fail without retry) or ``{"status": "error", "message"}`` (AWS kept failing).
    """

    def __init__(
        self,
        *,
        cluster_id: str,
        settings: dict[str, Any],
        poll_interval: float = 30,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
        max_error_rounds: int = DEFAULT_MAX_ERROR_ROUNDS,
    ) -> None:
        super().__init__()
        self.cluster_id = cluster_id
        self.settings = DrainSettings.from_dict(settings)
        self.poll_interval = poll_interval
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.verify = verify
        self.botocore_config = botocore_config
        self.max_error_rounds = max_error_rounds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {
                "cluster_id": self.cluster_id,
                "settings": self.settings.to_dict(),
                "poll_interval": self.poll_interval,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
                "verify": self.verify,
                "botocore_config": self.botocore_config,
                "max_error_rounds": self.max_error_rounds,
            },
        )

    def hook(self) -> EC2ClusterHook:
        return EC2ClusterHook(
            aws_conn_id=self.aws_conn_id,
            region_name=self.region_name,
            verify=self.verify,
            config=self.botocore_config,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        errors = 0
        async with AsyncClusterIO.open(self.hook()) as io:
            while True:
                try:
                    outcome = await run_async(drain_round(self.cluster_id, self.settings, self.log), io)
                except (ClientError, BotoCoreError) as error:
                    errors += 1
                    self.log.warning("Drain round failed (%d in a row): %s", errors, error)
                    if errors >= self.max_error_rounds:
                        yield TriggerEvent({"status": STATUS_ERROR, "message": str(error)})
                        return
                else:
                    errors = 0
                    if outcome.failure:
                        yield TriggerEvent({"status": STATUS_FAILURE, "message": outcome.failure})
                        return
                    if outcome.drained:
                        yield TriggerEvent({"status": STATUS_SUCCESS, "summary": outcome.summary})
                        return
                await asyncio.sleep(self.poll_interval)
