"""``ec2cluster-worker --config PATH`` (or env EC2CLUSTER_WORKER_CONFIG = a path or the JSON text).

Exit codes: 0 after a normal stop (idle, lifetime, signal, spot notice, queue deleted), 1 on an unexpected
error, 2 on a bad configuration, 3 when start-up failed (a needed service unreachable, the handler cannot be
loaded, the state table not writable).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import CONFIG_ENV, ConfigError, WorkerConfig

EXIT_BAD_CONFIG = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ec2cluster-worker", description="Run airflow-ec2cluster tasks from an SQS queue until stopped."
    )
    parser.add_argument("--config", help=f"path of the JSON configuration (default: env {CONFIG_ENV})")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration, print it with defaults, and exit"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = WorkerConfig.load(args.config)
    except ConfigError as error:
        print(f"ec2cluster-worker: bad configuration: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.check:
        print(config.to_json())
        return 0
    # Imported here so that --check and config errors need no boto3.
    from .runtime import run_worker

    return run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
