"""The ``ec2cluster`` command.

Each subcommand is a ``register(subparsers)`` function that adds its parser and sets ``handler`` (a
function of the parsed arguments returning the exit status); add new ones to SUBCOMMANDS.

Stdout carries the command's own output only; library logs go to stderr, INFO only with ``--verbose``. A
failure prints one line (its traceback too with ``--verbose``) and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from botocore.exceptions import BotoCoreError, ClientError

from airflow_ec2cluster.commands import doctor, iam_policy, logs, redrive, refresh_prices, status
from airflow_ec2cluster.commands.common import configure_logging

SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "status": status.register,
    "redrive": redrive.register,
    "iam-policy": iam_policy.register,
    "doctor": doctor.register,
    "refresh-prices": refresh_prices.register,
    "logs": logs.register,
}
VERBOSE_HELP = "log INFO lines (the provider's, botocore's) to stderr, and a failure's traceback"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ec2cluster", description="airflow-ec2cluster tools")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS.values():
        register(subparsers)
    # Also after the subcommand (`ec2cluster status X --verbose`); SUPPRESS keeps the top level's value.
    for subparser in subparsers.choices.values():
        if "--verbose" not in subparser._option_string_actions:
            subparser.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
            )
    return parser


def failure_line(command: str, error: BaseException, *, verbose: bool = False) -> str:
    """One line naming the failure: AWS errors say their code and operation themselves."""
    if isinstance(error, (ClientError, BotoCoreError)):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    hint = "" if verbose else " (--verbose for the traceback)"
    return f"ec2cluster {command}: {' '.join(text.split())}{hint}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    configure_logging(verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): nothing to tell it; stdout is closed so exit stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as error:  # a command's failure is one line for a person, not a traceback
        if verbose:
            traceback.print_exc()
        print(failure_line(args.command, error, verbose=verbose), file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
