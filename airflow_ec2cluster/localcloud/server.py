"""The local cloud's AWS endpoint: moto's server app, threaded, on loopback, with the SQS speed-up.

``python -m airflow_ec2cluster.localcloud.server --host 127.0.0.1 --port N`` (N = 0: any free port) prints
one line ``EC2CLUSTER_LOCALCLOUD_READY <endpoint url>`` on stdout once it listens, then serves until SIGTERM
or SIGINT. It exits by itself when the process that started it goes away, so it is never left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

READY_PREFIX = "EC2CLUSTER_LOCALCLOUD_READY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
PARENT_CHECK_SECONDS = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The local cloud's moto server (loopback only).")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (the only address allowed)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 = any free port")
    parser.add_argument(
        "--no-sqs-speedup", action="store_true", help="serve moto's SQS unmodified (for comparisons)"
    )
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK_HOSTS:
        parser.error(
            f"--host must be 127.0.0.1: the local cloud never listens off loopback, not {args.host!r}"
        )
    return args


def exit_when_orphaned(parent_pid: int) -> None:
    """Exit the process when its parent is gone (reparented), so a crashed owner leaves no server."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(host: str, port: int, *, sqs_speedup: bool = True) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    if sqs_speedup:
        from airflow_ec2cluster.localcloud import sqs_speedup as speedup

        speedup.apply()
    # One log line per request would flood the server log of a busy cluster.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"{READY_PREFIX} http://127.0.0.1:{server.server_port}", flush=True)
    # Nothing else goes to stdout: the owner reads only the ready line (and may stop reading it).
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_when_orphaned(os.getppid())
    signal.signal(signal.SIGTERM, raise_system_exit)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.host, args.port, sqs_speedup=not args.no_sqs_speedup)


if __name__ == "__main__":
    main()
