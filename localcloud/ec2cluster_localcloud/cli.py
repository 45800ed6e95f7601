"""``ec2cluster-localcloud``: run the local cloud until Ctrl-C and print the environment to use it."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading

from ec2cluster_localcloud.cloud import LocalCloud


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    # SIGTERM and Ctrl-C end the run through the context manager's clean-up; SIGINT is set explicitly, as
    # a process started with it ignored (`cmd &` in a script) would otherwise never stop on it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    try:
        with LocalCloud(port=args.port, region=args.region, work_dir=args.work_dir) as cloud:
            print(f"Local cloud endpoint: {cloud.endpoint_url}")
            print(f"AMI: {cloud.ami_id}   instance profile: {cloud.instance_profile_name}")
            print(f"Instance logs: {cloud.work_dir}/logs")
            print("Export this environment to use it (boto3, AWS CLI, Airflow):")
            for name, value in {**cloud.env(), **cloud.airflow_conn_env()}.items():
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
