"""Every module loads on its own, as the triggerer, the dag-processor and a worker's interpreter load them.

A module that only imports because some other module was imported first (a circular import hidden by
import order) fails here: each module is imported in a fresh interpreter.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import ec2cluster_localcloud
import ec2cluster_worker

import airflow_ec2cluster
from airflow_ec2cluster.drain.round import DrainSettings
from airflow_ec2cluster.triggers.ec2cluster import QueueDrainedTrigger

PACKAGES = (airflow_ec2cluster, ec2cluster_worker, ec2cluster_localcloud)


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            names.append(info.name)
    return sorted(names)


def import_alone(module: str) -> tuple[str, int, str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=240
    )
    return module, result.returncode, result.stderr[-2000:]


def test_every_module_imports_in_a_fresh_interpreter():
    modules = all_modules()
    assert "airflow_ec2cluster.triggers.ec2cluster" in modules
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(import_alone, modules))
    failures = [f"{module}:\n{stderr}" for module, code, stderr in results if code != 0]
    assert not failures, "\n\n".join(failures)


def test_the_trigger_loads_by_its_serialized_classpath_in_a_fresh_process():
    """What the triggerer does (``TriggerRunner``): import the class by the path serialize() gave, with
    Airflow's own ``import_string``, rebuild it from the kwargs, serialize again."""
    trigger = QueueDrainedTrigger(cluster_id="c-1", settings=DrainSettings().to_dict(), poll_interval=5)
    classpath, kwargs = trigger.serialize()
    script = (
        "import json, sys\n"
        "from airflow._shared.module_loading import import_string\n"
        "classpath, kwargs = json.loads(sys.stdin.read())\n"
        "trigger = import_string(classpath)(**kwargs)\n"
        "print(json.dumps(trigger.serialize()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([classpath, kwargs]),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [classpath, kwargs]
    assert classpath == "airflow_ec2cluster.triggers.ec2cluster.QueueDrainedTrigger"
