"""Every module loads on its own, as the triggerer, the dag-processor and a worker's interpreter load them.

A module that only imports because some other module was imported first (a circular import hidden by
import order) fails here: each module is imported in a process where none of this project's modules has
been imported yet. One fresh interpreter first imports the third-party libraries every component already
has loaded (Airflow, boto3: the triggerer has them before it loads a trigger), forgets any of our modules
that came with them, then forks one child per module, so each import starts from that state without
paying Airflow's start-up again (a subprocess per module took ~85 s, and over 300 s on a busy machine).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import ec2cluster_localcloud
import ec2cluster_worker

import airflow_ec2cluster
from airflow_ec2cluster.drain.round import DrainSettings
from airflow_ec2cluster.triggers.ec2cluster import QueueDrainedTrigger

PACKAGES = (airflow_ec2cluster, ec2cluster_worker, ec2cluster_localcloud)

# Runs in a fresh interpreter: reads module names on stdin, prints one JSON line per module.
IMPORT_EACH_IN_A_FORK = r"""
import json, os, sys, traceback
import airflow.sdk, airflow.providers.amazon.aws.hooks.base_aws, boto3, botocore.session
names = json.loads(sys.argv[1])
prefixes = tuple(json.loads(sys.argv[2]))
# Airflow's provider discovery imports our get_provider_info (a real triggerer has it too): forget it, so
# each child imports every module of ours itself.
for loaded in [m for m in sys.modules if m.split(".")[0] in prefixes]:
    del sys.modules[loaded]
for name in names:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            __import__(name)
            error = ""
        except BaseException:
            error = traceback.format_exc()[-2000:]
        os.write(write_end, error.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    error = b"".join(chunks).decode()
    if status != 0 and not error:
        error = f"child exited with status {status}"
    print(json.dumps({"module": name, "error": error}), flush=True)
"""


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            names.append(info.name)
    return sorted(names)


def test_every_module_imports_with_none_of_ours_loaded_before_it():
    modules = all_modules()
    assert "airflow_ec2cluster.triggers.ec2cluster" in modules
    prefixes = [package.__name__ for package in PACKAGES]
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_IN_A_FORK, json.dumps(modules), json.dumps(prefixes)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failures = [f"{report['module']}:\n{report['error']}" for report in reports if report["error"]]
    assert not failures, "\n\n".join(failures)
    assert [report["module"] for report in reports] == modules


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
