"""``ec2cluster-localcloud``: run the local cloud until Ctrl-C and print the environment to use it.

``ec2cluster-localcloud spot-interrupt <instance-id> [--notice-seconds N]`` and
``ec2cluster-localcloud rebalance <instance-id>`` inject those EC2 events into the running local cloud named
by ``EC2CLUSTER_LOCALCLOUD_CONTROL_URL`` (printed by the run). So do:

- ``ec2cluster-localcloud capacity [--pool TYPE ZONE MARKET COUNT]... [--vcpu-quota MARKET GROUP VCPUS]...
  [--file DOCUMENT.json]``: change its capacity (COUNT/VCPUS ``unlimited`` lifts a limit) and print the
  document now (``ec2cluster_localcloud.capacity``);
- ``ec2cluster-localcloud spot-interruptions --rate-per-hour R [--notice-seconds N] [--seed S]``: random
  spot interruptions (R 0: none);
- ``ec2cluster-localcloud spot-interrupt-oldest [--cluster-id C] [--tag KEY=VALUE]... [--count N]
  [--notice-seconds N]``: a notice to the oldest running spot instances now; prints their ids.

``ec2cluster-localcloud --capacity DOCUMENT.json`` starts the local cloud with that capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading

from ec2cluster_localcloud.capacity import CapacityError, load, parse_pool
from ec2cluster_localcloud.cloud import LocalCloud
from ec2cluster_localcloud.control import (
    CAPACITY,
    CONTROL_URL_ENV,
    INTERRUPT_OLDEST_SPOT,
    REBALANCE_RECOMMENDATION,
    SPOT_INTERRUPTION,
    SPOT_INTERRUPTIONS,
    ControlError,
    post,
)
from ec2cluster_localcloud.package_index import PYPI_SIMPLE
from ec2cluster_localcloud.runner import SPOT_NOTICE_SECONDS

EVENT_COMMANDS = ("spot-interrupt", "rebalance")
CONTROL_COMMANDS = ("capacity", "spot-interruptions", "spot-interrupt-oldest")


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
        "--capacity",
        default=None,
        metavar="FILE",
        help="a capacity document (JSON: pools and vCPU quotas; default: everything unlimited)",
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


def build_control_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ec2cluster-localcloud", description="Change a running local cloud's capacity or spot market."
    )
    parser.add_argument(
        "--control-url",
        default=os.environ.get(CONTROL_URL_ENV),
        help=f"the running local cloud's control address (default: ${CONTROL_URL_ENV})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    capacity = commands.add_parser("capacity", help="set pools' capacity and vCPU quotas; print the document")
    capacity.add_argument(
        "--pool",
        action="append",
        default=[],
        nargs=4,
        metavar=("TYPE", "ZONE", "MARKET", "COUNT"),
        help="a pool's capacity: e.g. c5.large us-east-1a spot 0 (COUNT 'unlimited' lifts it)",
    )
    capacity.add_argument(
        "--vcpu-quota",
        action="append",
        default=[],
        nargs=3,
        metavar=("MARKET", "GROUP", "VCPUS"),
        help="a vCPU quota: e.g. on-demand standard 64 (VCPUS 'unlimited' lifts it)",
    )
    capacity.add_argument("--file", default=None, help="replace the whole document with this JSON file's")
    interruptions = commands.add_parser("spot-interruptions", help="interrupt spot instances at random")
    interruptions.add_argument(
        "--rate-per-hour", type=float, required=True, help="per instance-hour; 0: none"
    )
    interruptions.add_argument("--notice-seconds", type=float, default=SPOT_NOTICE_SECONDS)
    interruptions.add_argument("--seed", type=int, default=None)
    oldest = commands.add_parser(
        "spot-interrupt-oldest", help="a notice to the oldest running spot instances"
    )
    oldest.add_argument("--cluster-id", default=None)
    oldest.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    oldest.add_argument("--count", type=int, default=1)
    oldest.add_argument("--notice-seconds", type=float, default=SPOT_NOTICE_SECONDS)
    return parser


def control(argv: list[str]) -> int:
    parser = build_control_parser()
    # The command comes first on the command line; the parser wants its options before it.
    args = parser.parse_args(_options_first(argv))
    if not args.control_url:
        parser.error(f"no local cloud named: export {CONTROL_URL_ENV} as its run printed, or --control-url")
    try:
        if args.command == "capacity":
            answer = None
            if args.file:
                answer = post(args.control_url, CAPACITY, {"document": load(args.file)})
            for pool in args.pool:
                instance_type, zone, market, count = parse_pool(" ".join(pool))
                body = {"instance_type": instance_type, "availability_zone": zone, "market": market}
                answer = post(args.control_url, CAPACITY, {"pool": {**body, "capacity": count}})
            for market, group, vcpus in args.vcpu_quota:
                limit = None if vcpus == "unlimited" else int(vcpus)
                answer = post(
                    args.control_url,
                    CAPACITY,
                    {"vcpu_quota": {"market": market, "group": group, "vcpus": limit}},
                )
            answer = answer or post(args.control_url, CAPACITY, {})
            print(json.dumps(answer["capacity"], indent=2, sort_keys=True))
        elif args.command == "spot-interruptions":
            body = {
                "rate_per_hour": args.rate_per_hour,
                "notice_seconds": args.notice_seconds,
                "seed": args.seed,
            }
            post(args.control_url, SPOT_INTERRUPTIONS, body)
            print(
                f"spot interruptions: {args.rate_per_hour:g} per instance-hour, "
                f"{args.notice_seconds:g} s notice"
            )
        else:
            tags = dict(tag.split("=", 1) for tag in args.tag if "=" in tag)
            body = {
                "count": args.count,
                "notice_seconds": args.notice_seconds,
                "cluster_id": args.cluster_id,
                "tags": tags,
            }
            for instance_id in post(args.control_url, INTERRUPT_OLDEST_SPOT, body)["instance_ids"]:
                print(instance_id)
    except (ControlError, CapacityError, ValueError) as error:
        print(f"ec2cluster-localcloud {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


def _options_first(argv: list[str]) -> list[str]:
    """``COMMAND ... --control-url URL ...`` as argparse wants it: the global option before the command."""
    rest, found, n = [], [], 0
    while n < len(argv):
        if argv[n] == "--control-url" and n + 1 < len(argv):
            found += argv[n : n + 2]
            n += 2
            continue
        if argv[n].startswith("--control-url="):
            found.append(argv[n])
        else:
            rest.append(argv[n])
        n += 1
    return found + rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in EVENT_COMMANDS:
        return inject_event(argv)
    if argv and argv[0] in CONTROL_COMMANDS:
        return control(argv)
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
            capacity=args.capacity,
        ) as cloud:
            print(f"Local cloud endpoint: {cloud.endpoint_url}")
            print(f"AMI: {cloud.ami_id}   instance profile: {cloud.instance_profile_name}")
            print(f"Instance logs: {cloud.work_dir}/logs")
            print(
                "Capacity (pools and vCPU quotas; edit it, or `ec2cluster-localcloud capacity`): "
                f"{cloud.capacity_file}"
            )
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
