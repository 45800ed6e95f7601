"""QueueDrainedSensor(deferrable=True) defers to the trigger; execute_complete turns events into results."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor
from airflow_ec2cluster.triggers.ec2cluster import QueueDrainedTrigger


def sensor(**kwargs) -> QueueDrainedSensor:
    return QueueDrainedSensor(
        task_id="drain", cluster_id="job-1", aws_conn_id=None, region_name="us-east-1", **kwargs
    )


def test_deferrable_sensor_hands_its_settings_to_the_trigger(aws, context):
    drain = sensor(deferrable=True, idle_timeout="120", poke_interval=7, timeout=3600, cluster_size=4)
    with pytest.raises(TaskDeferred) as deferred:
        drain.execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, QueueDrainedTrigger) and deferred.value.method_name == "execute_complete"
    assert trigger.cluster_id == "job-1" and trigger.poll_interval == 7
    assert trigger.settings.idle_timeout == 120.0 and trigger.settings.cluster_size == 4
    assert deferred.value.timeout.total_seconds() == 3600
    _, kwargs = trigger.serialize()
    assert QueueDrainedTrigger(**kwargs).serialize() == trigger.serialize()


def test_deferrable_is_templated_so_a_run_can_choose_it(aws, context, monkeypatch):
    assert "deferrable" in QueueDrainedSensor.template_fields
    # As rendered from "{{ params.deferrable }}": text.
    with pytest.raises(TaskDeferred):
        sensor(deferrable="True").execute(context)
    pokes = []
    monkeypatch.setattr(QueueDrainedSensor, "poke", lambda self, ctx: pokes.append(ctx) or True)
    sensor(deferrable="False", poke_interval=1, timeout=60).execute(context)
    assert len(pokes) == 1  # the sync path: poked in the worker slot, no deferral


def test_default_comes_from_operators_default_deferrable():
    import inspect

    default = inspect.signature(QueueDrainedSensor.__init__).parameters["deferrable"].default
    assert default is False  # the test environment does not set [operators] default_deferrable
    assert sensor(mode="reschedule").mode == "reschedule"


def test_execute_complete_maps_events():
    drain = sensor()
    assert drain.execute_complete({}, {"status": "success", "summary": {"tasks_done": 3}}) == {
        "tasks_done": 3
    }
    with pytest.raises(AirflowFailException, match="no worker"):
        drain.execute_complete({}, {"status": "failure", "message": "no worker can run them"})
    with pytest.raises(AirflowException, match="error"):
        drain.execute_complete({}, {"status": "error", "message": "throttled"})
