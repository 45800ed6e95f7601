"""Where an instance's unreachable traffic goes: a connection that times out, as on AWS.

The network model (``ec2cluster_localcloud.network``) decides what each instance reaches; this module makes
it so, in three parts:

- ``Blackhole``: a loopback TCP listener (in the instance runner's process) that never completes a
  connection. It listens with a backlog of 0 and fills its own accept queue with connections it never
  accepts, so that the kernel drops every further SYN: a client's connect() gets no answer and times out,
  as one to an address with no route does on EC2. The runner points an instance's endpoint variables at it
  for what the instance cannot reach.
- ``ReachabilityFile``: the runner's verdicts, per instance, in a JSON file in the local cloud's work dir
  (written atomically, read mtime-cached), for the server, a process of its own.
- ``hold_then_drop``: the server's side (defence in depth, for a client that is given the endpoint some
  other way): a request signed by an instance's role session for a destination it cannot reach is held
  unanswered until the client gives up (or ``UNREACHABLE_HOLD_SECONDS``), then the connection is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ec2cluster_localcloud.network import Reachability, destination_of

log = logging.getLogger(__name__)

FILL_ATTEMPTS = 8
FILL_WAIT_SECONDS = 0.2
# Longer than botocore's default read timeout (60 s): the client gives up first, as on AWS.
UNREACHABLE_HOLD_SECONDS = 120.0
HOLD_POLL_SECONDS = 0.5
REACHABILITY_FILE = "reachability.json"


class BlackholeError(RuntimeError):
    """The kernel completed every connection: no listener that times connections out can be built."""


class Blackhole:
    """A loopback address whose connections time out; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._fillers: list[socket.socket] = []
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(0)
            self.port = self._listener.getsockname()[1]
            self._fill()
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def _fill(self) -> None:
        """Connect until a connection is not completed: then the accept queue is full."""
        for _ in range(FILL_ATTEMPTS):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            _, writable, _ = select.select([], [filler], [], FILL_WAIT_SECONDS)
            if writable and filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                self._fillers.append(filler)  # in the accept queue, never accepted
                continue
            filler.close()  # its SYN was dropped: the queue is full
            return
        raise BlackholeError(
            f"every one of {FILL_ATTEMPTS} connections to a listener with backlog 0 completed: this kernel "
            "does not drop SYNs when an accept queue is full"
        )

    def close(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers = []
        self._listener.close()


class ReachabilityFile:
    """Instance id -> its ``Reachability``, in one JSON file: the runner writes it, the server reads it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._table: dict[str, Reachability] = {}

    def write(self, table: Mapping[str, Reachability]) -> None:
        """Replace the file's contents atomically (a reader sees the old table or the new one)."""
        data = {instance_id: verdicts.to_dict() for instance_id, verdicts in table.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".reachability-", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def read(self) -> dict[str, Reachability]:
        """The table as last written (re-read only when the file changed); {} before the first write."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                self._table = {i: Reachability.from_dict(i, d) for i, d in data.items()}
                self._stamp = stamp
            return self._table

    def lookup(self, instance_id: str) -> Reachability | None:
        return self.read().get(instance_id)


def session_instance_id(principal_arn: str) -> str | None:
    """The instance a role session stands for: the runner's AssumeRole names the session after it."""
    if ":assumed-role/" not in principal_arn:
        return None
    session = principal_arn.rsplit("/", 1)[-1]
    return session if session.startswith("i-") else None


def hold_then_drop(environ: Mapping[str, Any], hold_seconds: float = UNREACHABLE_HOLD_SECONDS) -> None:
    """Answer nothing: wait until the client closes its connection (or ``hold_seconds``), then drop it.

    Raises ConnectionAbortedError, which the server (werkzeug) takes for a dropped connection and so writes
    no response.
    """
    connection: socket.socket | None = environ.get("werkzeug.socket")
    deadline = time.monotonic() + hold_seconds
    if connection is None:  # not werkzeug's server: hold all the same
        time.sleep(hold_seconds)
    while connection is not None and time.monotonic() < deadline:
        readable, _, _ = select.select([connection], [], [], HOLD_POLL_SECONDS)
        if not readable:
            continue
        try:
            if not connection.recv(1, socket.MSG_PEEK):
                break  # the client gave up and closed
        except OSError:
            break
        time.sleep(HOLD_POLL_SECONDS)  # it sent more: keep holding
    if connection is not None:
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
    raise ConnectionAbortedError("unreachable: the connection is dropped unanswered")


class UnreachableGuard:
    """The server's check: ``check(principal_arn, signing_name, environ)`` holds and drops a request signed
    by an instance's role session for a destination the instance does not reach; returns for any other."""

    def __init__(self, table: ReachabilityFile, hold_seconds: float = UNREACHABLE_HOLD_SECONDS) -> None:
        self.table = table
        self.hold_seconds = hold_seconds
        self.held = 0

    def __call__(self, principal_arn: str, signing_name: str, environ: Mapping[str, Any]) -> None:
        instance_id = session_instance_id(principal_arn)
        verdicts = self.table.lookup(instance_id) if instance_id else None
        destination = destination_of(signing_name)
        if verdicts is None or verdicts.reaches(destination):
            return
        self.held += 1
        log.info(
            "instance %s does not reach %s (%s): its %s request is held unanswered, then dropped",
            instance_id,
            destination,
            verdicts.unreachable.get(destination, "not in its reachability"),
            signing_name,
        )
        hold_then_drop(environ, self.hold_seconds)
