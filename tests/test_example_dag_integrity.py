"""The example DAG loads without import errors and is wired as designed."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parent.parent / "dags"


@pytest.fixture(scope="module")
def dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dag_bag):
    assert dag_bag.import_errors == {}
    assert "ec2_cluster_example" in dag_bag.dags


def test_the_chain_is_enqueue_launch_drain_report_with_teardown(dag_bag):
    dag = dag_bag.dags["ec2_cluster_example"]
    downstream = {task_id: set(task.downstream_task_ids) for task_id, task in dag.task_dict.items()}
    assert downstream == {
        "enqueue": {"launch"},
        "launch": {"drain", "teardown"},
        "drain": {"report", "teardown"},
        "report": set(),
        "teardown": set(),
    }
    assert dag.task_dict["teardown"].is_teardown
    setups = [task.task_id for task in dag.task_dict["teardown"].upstream_list if task.is_setup]
    assert setups == ["launch"]


def test_params_a_ui_run_can_change(dag_bag):
    params = dag_bag.dags["ec2_cluster_example"].params
    expected = {"workers", "instance_type", "idle_timeout", "spot", "tweets", "fail_on_dead_letters"}
    assert expected <= set(params)
