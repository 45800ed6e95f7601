"""``ec2cluster-localcloud``: run the local cloud until Ctrl-C and print the environment to use it.

``ec2cluster-localcloud spot-interrupt <instance-id> [--notice-seconds N]`` and
``ec2cluster-localcloud rebalance <instance-id>`` inject those EC2 events into the running local cloud named
by ``EC2CLUSTER_LOCALCLOUD_CONTROL_URL`` (printed by the run).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading

from ec2cluster_localcloud.cloud import LocalCloud
from ec2cluster_localcloud.control import (
    CONTROL_URL_ENV,
    REBALANCE_RECOMMENDATION,
    SPOT_INTERRUPTION,
    ControlError,
    post,
)
from ec2cluster_localcloud.package_index import PYPI_SIMPLE
from ec2cluster_localcloud.runner import SPOT_NOTICE_SECONDS

EVENT_COMMANDS = ("spot-interrupt", "rebalance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ec2cluster-localcloud",
        description="Run the local cloud on 127.0.0.1: a moto server, and a runner that turns every "
        "launched instance into a local process running its user data. Prints the environment to export.",
    )
    parser.add_argument("--port", type=int, default=0, help="port for the endpoint (default: any free port)")
    parser.add_argument("--region", default="us-east-1", help="AWS region to emulate (default us-east-1)")
    parser.add_argument(
        "--work-dir", default=None, help="where instance homes and logs go (default: a temp dir)"
    )
    parser.add_argument(
        "--wheel-cache",
        default=None,
        help="the package index's wheel cache, the instances' internet "
        "(default ~/.cache/ec2cluster-localcloud/wheels)",
    )
    parser.add_argument(
        "--no-upstream",
        action="store_true",
        help="the package index serves the wheel cache only (default: fetches what it lacks from PyPI, once)",
    )
    return parser


def build_event_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ec2cluster-localcloud",
        description="Inject an EC2 event into a running local cloud's instance metadata.",
    )
    parser.add_argument("event", choices=EVENT_COMMANDS)
    parser.add_argument("instance_id", help="the instance, e.g. i-0123456789abcdef0")
    parser.add_argument(
        "--notice-seconds",
        type=float,
        default=SPOT_NOTICE_SECONDS,
        help="spot-interrupt: seconds until the instance is terminated (EC2 gives 120)",
    )
    parser.add_argument(
        "--control-url",
        default=os.environ.get(CONTROL_URL_ENV),
        help=f"the running local cloud's control address (default: ${CONTROL_URL_ENV})",
    )
    return parser


def inject_event(argv: list[str]) -> int:
    parser = build_event_parser()
    args = parser.parse_args(argv)
    if not args.control_url:
        parser.error(f"no local cloud named: export {CONTROL_URL_ENV} as its run printed, or --control-url")
    if args.notice_seconds < 0:
        parser.error(f"--notice-seconds must be 0 or more, not {args.notice_seconds:g}")
    if args.event == "spot-interrupt":
        path = SPOT_INTERRUPTION
        body = {"instance_id": args.instance_id, "notice_seconds": args.notice_seconds}
    else:
        path, body = REBALANCE_RECOMMENDATION, {"instance_id": args.instance_id}
    try:
        post(args.control_url, path, body)
    except ControlError as error:
        print(f"ec2cluster-localcloud {args.event}: {error}", file=sys.stderr)
        return 1
    print(f"{args.event}: posted in the metadata of {args.instance_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in EVENT_COMMANDS:
        return inject_event(argv)
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    # SIGTERM and Ctrl-C end the run through the context manager's clean-up; SIGINT is set explicitly, as
    # a process started with it ignored (`cmd &` in a script) would otherwise never stop on it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    try:
        with LocalCloud(
            port=args.port,
            region=args.region,
            work_dir=args.work_dir,
            wheel_cache=args.wheel_cache,
            package_upstream=None if args.no_upstream else PYPI_SIMPLE,
        ) as cloud:
            print(f"Local cloud endpoint: {cloud.endpoint_url}")
            print(f"AMI: {cloud.ami_id}   instance profile: {cloud.instance_profile_name}")
            print(f"Instance logs: {cloud.work_dir}/logs")
            print(
                f"Package index (the instances' internet): {cloud.package_index_url} "
                f"(wheel cache {cloud.wheel_cache.directory})"
            )
            print("Export this environment to use it (boto3, AWS CLI, Airflow):")
            for name, value in {**cloud.env(), **cloud.airflow_conn_env(), **cloud.control_env()}.items():
                print(f"export {name}={shlex.quote(value)}")
            print("Running until Ctrl-C.", flush=True)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    print("Local cloud stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
