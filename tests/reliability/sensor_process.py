"""The drain sensor's poke loop as a process of its own, for the controller-death test to kill -9.

``python -m tests.reliability.sensor_process CLUSTER_ID STATE_TABLE`` pokes until drained.
"""

from __future__ import annotations

import sys
import time

from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor

from .harness import FAST_SENSOR, TaskInstance


def main(cluster_id: str, state_table: str) -> int:
    sensor = QueueDrainedSensor(
        task_id="drain",
        cluster_id=cluster_id,
        state_table=state_table,
        aws_conn_id="aws_default",
        **FAST_SENSOR,
    )
    ti = TaskInstance("reliability", "manual__controller-death")
    context = {"ti": ti, "run_id": ti.run_id}
    while True:
        answer = sensor.poke(context)
        if getattr(answer, "is_done", False):
            print("DRAINED", flush=True)
            return 0
        time.sleep(float(sensor.poke_interval))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
