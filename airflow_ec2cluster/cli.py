"""The ``ec2cluster`` command.

Each subcommand is a ``register(subparsers)`` function that adds its parser and sets ``handler`` (a
function of the parsed arguments returning the exit status); add new ones to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from airflow_ec2cluster.commands import iam_policy, redrive, status

SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "status": status.register,
    "redrive": redrive.register,
    "iam-policy": iam_policy.register,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ec2cluster", description="airflow-ec2cluster tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS.values():
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
