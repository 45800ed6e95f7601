"""``python -m benchmarks NAME [NAME ...] [--json] [--size tiny|full]``: run benchmarks, print their figures.

Without ``--json``: a table per benchmark. With it: one JSON object per benchmark, one per line.
Exit status 1 when a target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable

from .cloud import shared_server
from .result import Result


def registry() -> dict[str, Callable[[str], Result]]:
    from . import boot, capacity, controller, costs, enqueue, localcloud_sqs, logs_cost, slots, workers

    return {
        "worker-calls": costs.worker_calls,
        "request-cost": costs.request_cost,
        "poke-calls": controller.poke_calls,
        "drain-latency": controller.drain_latency,
        "enqueue": enqueue.enqueue_rate,
        "worker-throughput": workers.worker_throughput,
        "worker-memory": workers.worker_memory,
        "enqueue-stream": enqueue.enqueue_stream,
        "launch-calls": controller.launch_calls,
        "localcloud-sqs": localcloud_sqs.localcloud_sqs,
        "boot-time": boot.boot_time,
        "bundle-size": boot.bundle_size,
        "scale-in": capacity.scale_in,
        "interruption-replacement": capacity.interruption_replacement,
        "logs-cost": logs_cost.logs_cost,
        "slot-throughput": slots.slot_throughput,
        "receive-sizing": slots.receive_sizing,
    }


NAMES = (
    "worker-calls",
    "request-cost",
    "poke-calls",
    "drain-latency",
    "enqueue",
    "worker-throughput",
    "worker-memory",
    "enqueue-stream",
    "launch-calls",
    "localcloud-sqs",
    "boot-time",
    "bundle-size",
    "scale-in",
    "interruption-replacement",
    "logs-cost",
    "slot-throughput",
    "receive-sizing",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="+", choices=(*NAMES, "all"), metavar="NAME", help=", ".join(NAMES))
    parser.add_argument("--json", action="store_true", help="one JSON object per benchmark")
    parser.add_argument(
        "--size", choices=("tiny", "full"), default="full", help="tiny: the smoke test's size"
    )
    args = parser.parse_args(argv)
    names = NAMES if "all" in args.names else args.names
    # Airflow's loggers write to stdout: the figures (and the JSON) get stdout to themselves.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    benchmarks = registry()
    logging.disable(logging.INFO)
    all_met = True
    with shared_server() if len(names) > 1 else contextlib.nullcontext():
        for name in names:
            started = time.monotonic()
            result = benchmarks[name](args.size)
            result.seconds = round(time.monotonic() - started, 1)
            all_met = all_met and result.met
            print(result.to_json() if args.json else result.table() + "\n", file=results, flush=True)
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
