"""A Python handler run in child processes (``handler.isolation = "process"``): one per busy slot.

One interpreter runs one thread of Python at a time (the GIL): slots that share the worker's interpreter use
one core between them for a CPU-bound function. With process isolation each task runs in a child process
that imports the handler once and runs task after task, so N slots compute on N cores; a task past
``task_timeout_seconds`` is killed with its child's whole process group (a thread can only be abandoned), and
a handler that crashes its interpreter fails its task, not the worker.

Parent and child speak JSON lines over the child's stdin and a copy of its stdout (its own stdout and prints
go to stderr, so a print in the handler cannot break the protocol): the child says ``{"ready": true}`` once
it has imported the handler, then ``{"payload": ..., "context": {...}}`` in, ``{"result": ...}`` or
``{"error": ..., "detail": ...}`` out. Payloads and results are JSON anyway (the message body and the task
log), so nothing else needs to cross.

The worker starts a child per slot before its first receive and waits until each is ready
(``ProcessHandler.start``): an interpreter's start and the handler's import (a tenth of a second, or
seconds for a heavy library) are paid once, before any message is held, not inside each slot's first task;
and a child that cannot import the handler stops the worker at start, as a bad target does.

Run as ``python -m ec2cluster_worker.isolation MODULE:FUNCTION``: the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .handlers import (
    HandlerError,
    TaskContext,
    TaskFailure,
    TaskTimeout,
    error_detail,
    error_summary,
    load_target,
)

READ_CHUNK = 65536
DIED_EXIT_WAIT_SECONDS = 2.0
READY_TIMEOUT_SECONDS = 300.0  # a child's start and the handler's import (a large library on a slow disk)


class ChildProcess:
    """One child: a request written, the answer line read within a deadline."""

    def __init__(self, target: str) -> None:
        env = dict(os.environ)
        # The child imports what this process imports (the bundle's code/ and site/, or a test's paths).
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ec2cluster_worker.isolation", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills what the handler started too
        )
        self._buffer = b""
        self._ready = False

    def wait_ready(self, timeout: float) -> None:
        """Wait for the child's ready line (it has imported the handler): raises TaskFailure when it dies
        first, TaskTimeout when it takes longer than ``timeout`` s (then it is killed)."""
        if self._ready:
            return
        answer = self._read_line(time.monotonic() + timeout, when="while importing the handler")
        if answer != {"ready": True}:
            self.kill()
            raise TaskFailure(f"the handler's process answered {answer!r} instead of ready (a bug)")
        self._ready = True

    def call(self, payload: Any, context: TaskContext, timeout: float) -> Any:
        request = {
            "payload": payload,
            "context": {
                "task_id": context.task_id,
                "attempt": context.attempt,
                "worker_id": context.worker_id,
                "cluster_id": context.cluster_id,
            },
        }
        assert self.process.stdin is not None
        deadline = time.monotonic() + timeout
        # A child started for this task: its start counts in the task's time.
        self.wait_ready(deadline - time.monotonic())
        try:
            self.process.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise self._died("before the task") from error
        answer = self._read_line(deadline)
        if "error" in answer:
            raise TaskFailure(answer["error"], detail=answer.get("detail"))
        return answer.get("result")

    def _read_line(self, deadline: float, when: str = "while running the task") -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise TaskTimeout()
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                raise self._died(when)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _died(self, when: str) -> TaskFailure:
        # Its end of the pipe closes as it exits: give it a moment to finish, so its own status is told.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=DIED_EXIT_WAIT_SECONDS)
        self.kill()
        code = self.process.returncode
        killed = code is not None and code < 0
        how = f"was killed by signal {-code}" if killed else f"exited with status {code}"
        return TaskFailure(f"the handler's process {how} {when} (handler.isolation 'process')")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        """Ask it to end (end of its input); killed when it does not within a few seconds."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()


class ProcessHandler:
    """The handler interface (``handler(payload, context, timeout)``), each call in an idle child process
    (started when none is idle: one per busy slot, kept for the next task)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._idle: list[ChildProcess] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self, count: int, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Start ``count`` children (one per slot) at once and wait until every one is ready; raises
        HandlerError (the children killed) when one cannot import the handler or is not ready in time."""
        children = [ChildProcess(self.target) for _ in range(count)]
        deadline = time.monotonic() + timeout
        try:
            for child in children:
                child.wait_ready(max(0.0, deadline - time.monotonic()))
        except (TaskFailure, TaskTimeout) as error:
            for child in children:
                child.kill()
            why = (
                str(error)
                if isinstance(error, TaskFailure)
                else f"it was not ready within {timeout:g} s (handler.isolation 'process')"
            )
            raise HandlerError(
                f"handler.target: {self.target!r} could not be loaded in a child process: {why}; the "
                "child's error is on the worker's stderr"
            ) from error
        with self._lock:
            self._idle.extend(children)

    def __call__(self, payload: Any, context: TaskContext, timeout: float) -> Any:
        with self._lock:
            child = self._idle.pop() if self._idle else None
        if child is None or not child.alive:
            child = ChildProcess(self.target)
        # A child that timed out or died was killed: it is not kept.
        value = child.call(payload, context, timeout)
        self._keep(child)
        return value

    def _keep(self, child: ChildProcess) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return
        child.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            children, self._idle = self._idle, []
        for child in children:
            child.close()


def _answer(function: Any, payload: Any, context: TaskContext) -> str:
    try:
        value = function(payload, context)
    except Exception as error:  # the handler's own error: the task fails, the child goes on
        return json.dumps({"error": error_summary(error), "detail": error_detail(error)})
    try:
        return json.dumps({"result": value}, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        return json.dumps({"error": f"result is not JSON-serialisable: {error}"})


def _child_main(target: str) -> int:
    # The protocol gets the real stdout; the handler's prints go to stderr with the worker's log.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when its tasks stop
    try:
        function = load_target(target, "handler.target")
    except HandlerError as error:
        print(f"ec2cluster-worker isolation: {error}", file=sys.stderr)
        return 2
    protocol.write('{"ready":true}\n')
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        protocol.write(_answer(function, request["payload"], TaskContext(**request["context"])) + "\n")
        protocol.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
