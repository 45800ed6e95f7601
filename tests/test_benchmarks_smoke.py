"""Every benchmark at a tiny size, so they cannot rot: they run, print one JSON object each, and meet the
call-count targets (counts do not vary from run to run). Wall-clock figures are never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A ceiling for a hung benchmark, not a speed target: ~35 s alone, minutes on a busy 2-core machine.
# One xdist group: every test here reads the one module-scoped run of the benchmarks, which xdist would
# otherwise set up again on each worker that it sends one of these tests to (`make test` runs two).
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("benchmarks")]

REPO_ROOT = Path(__file__).resolve().parents[1]
# drain-latency and boot-time run the whole local cloud (boot-time: one Debian 12 instance) and spend most of
# their time waiting: they run in a process of their own, beside the others.
# Three processes on a 2-core machine, balanced by their time at the tiny size (~20-40 s each alone).
GROUPS = (
    ("worker-calls", "request-cost", "enqueue", "launch-calls", "enqueue-stream", "bundle-size", "logs-cost"),
    ("poke-calls", "worker-throughput", "worker-memory", "receive-sizing"),
    ("drain-latency", "localcloud-sqs", "boot-time"),
    ("scale-in", "interruption-replacement", "slot-throughput"),
)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = {key: value for key, value in os.environ.items() if key != "AWS_ENDPOINT_URL"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks", *names, "--json", "--size", "tiny"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for names in GROUPS
    ]
    found: dict[str, dict] = {}
    for process in processes:
        out, err = process.communicate(timeout=840)
        assert process.returncode in (0, 1), err[-3000:]
        for line in out.splitlines():
            result = json.loads(line)
            found[result["name"]] = result
    return found


def rows(result: dict) -> dict[str, dict]:
    return {row["what"]: row for row in result["rows"]}


def test_every_benchmark_ran(results):
    assert sorted(results) == sorted(name for names in GROUPS for name in names)
    for result in results.values():
        assert result["rows"], result


def test_worker_calls_per_task(results):
    packed, single = [
        r for r in results["worker-calls"]["rows"] if r["what"].startswith("AWS calls per task")
    ]
    assert "10 tasks/message" in packed["what"] and "1 task/message" in single["what"]
    assert packed["met"] and packed["value"] <= 0.4 and single["value"] <= 0.4
    assert packed["reference"] >= 4


def test_receive_sizing_meets_its_call_target_and_compares_the_rules(results):
    figures = rows(results["receive-sizing"])
    (short,) = [row for what, row in figures.items() if what.startswith("AWS calls per task (")]
    assert short["met"] and 0 < short["value"] <= 0.05
    for rule in ("sized", "before slots", "always 10"):
        assert any(what.startswith(f"mix, {rule}") and row["value"] > 0 for what, row in figures.items())


def test_slot_throughput_reports_each_slot_count(results):
    figures = rows(results["slot-throughput"])
    assert any(what.startswith("tasks/s, 1 slot") and row["value"] > 0 for what, row in figures.items())


def test_request_cost_counts_items(results):
    figures = {row["what"].strip(): row for row in results["request-cost"]["rows"]}
    items = figures["DynamoDB items written per 1M tasks"]
    # The naive loop writes two items per task; the worker one per 10-task message plus its status items.
    assert items["reference"] == 2_000_000
    assert 100_000 <= items["value"] < 200_000
    ratio = figures["cost ratio worker / naive"]
    assert ratio["met"] and ratio["value"] < 1 / 3
    # One task per message: one item per task, over the target (why messages carry groups).
    assert figures["ratio with 1 task/message (tasks_per_message=1)"]["value"] > 1 / 3


def test_poke_calls_flat_and_at_most_five(results):
    calls = [row for row in results["poke-calls"]["rows"] if row["what"].startswith("calls per poke,")]
    assert len(calls) == 4
    assert {row["value"] for row in calls} == {calls[0]["value"]}
    assert all(row["value"] <= 5 for row in calls)


def test_enqueue_calls(results):
    packed, single = [r for r in results["enqueue"]["rows"] if r["what"].strip().startswith("SQS send calls")]
    # 200 tasks: 20 messages of 10 in 2 calls by default, 200 messages in 20 calls one task a message.
    assert (packed["value"], single["value"], single["reference"]) == (2, 20, 200)
    assert packed["met"] and single["met"]


def test_launch_is_one_run_instances_call(results):
    (row,) = [r for r in results["launch-calls"]["rows"] if r["what"].startswith("CreateFleet")]
    assert row["value"] == 1


def test_process_benchmarks_report_figures(results):
    assert any(row["what"].startswith("tasks/s") for row in results["worker-throughput"]["rows"])
    assert all(row["value"] > 0 for row in results["worker-memory"]["rows"])
    assert any(row["what"].startswith("peak RSS growth") for row in results["enqueue-stream"]["rows"])
    (latency, *_) = results["drain-latency"]["rows"]
    assert latency["value"] > 0


def test_boot_time_reports_every_phase(results):
    figures = {row["what"].strip(): row for row in results["boot-time"]["rows"]}
    (install,) = [row for what, row in figures.items() if what.startswith("install + worker start, s")]
    assert install["value"] > 0 and install["target"]
    for phase in ("(a) OS start", "(b) install", "(c) worker start", "(d) first task"):
        (row,) = [row for what, row in figures.items() if what.startswith(phase)]
        assert row["value"] >= 0, row


def test_bundle_size_reports_cold_and_warm_builds(results):
    figures = {row["what"].strip(): row for row in results["bundle-size"]["rows"]}
    (size,) = [row for what, row in figures.items() if what.endswith("zip, MB")]
    assert size["value"] > 1  # the worker with boto3 and botocore
    assert {"build, cold (fresh cache dir: pip runs), s", "build, warm (cache hit: no pip), s"} <= set(
        figures
    )


def test_scale_in_one_queue_read_per_idle_stop(results):
    (row,) = [r for r in results["scale-in"]["rows"] if r["what"].startswith("GetQueueAttributes per")]
    assert row["value"] == 1 and row["reference"] == 0 and row["met"]


def test_rebalance_replacement_goes_to_another_pool(results):
    figures = {row["what"].strip(): row for row in results["interruption-replacement"]["rows"]}
    assert figures["rebalance replacement in another pool (DescribeInstances: type, zone)"]["value"] is True
    assert figures["stop_reason of the recommended worker"]["value"] == "rebalance-recommendation"
    assert any(w.startswith("s from spot notice posted") for w in figures)


def test_logs_cost_ships_every_line_in_few_calls(results):
    figures = {row["what"]: row for row in results["logs-cost"]["rows"]}
    (calls,) = [row for what, row in figures.items() if what.startswith("PutLogEvents calls (")]
    assert calls["met"] and calls["value"] >= 1
    assert figures["CloudWatch Logs events per task"]["value"] >= 1  # a task.done line each, and a few more
    assert figures["bytes of one failed task's line (3-frame traceback)"]["value"] > 300
