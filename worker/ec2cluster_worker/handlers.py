"""Running one task: a Python function ``fn(payload, context)`` or a command (argv, never a shell).

Both get a per-task timeout. A Python handler is interrupted with SIGALRM in the main thread (TaskTimeout is a
BaseException so that a handler's ``except Exception`` cannot swallow it); off the main thread (the worker's
slots, ``slots.py``) it runs on a daemon thread kept per slot, abandoned at the deadline (a thread cannot
be killed) and replaced for the slot's next task. With ``isolation:
"process"`` it runs in a child process instead (``isolation.py``), killed at the deadline. A command runs in
its own process group, killed whole at the deadline.

A failed task's ``error`` is what a person reads in a report: the exception's type and message, or a
command's exit status and the last line it wrote on stderr (``error_summary``, ``command_error``). The whole
traceback, or the end of the command's stderr, goes with it as the task's ``error_detail``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import PAYLOAD_PLACEHOLDER, CommandHandlerSpec, HandlerSpec, PythonHandlerSpec

STDERR_TAIL_CHARS = 1500
# A task's error is a summary: its first lines, at most this many characters.
SUMMARY_LINES = 3
SUMMARY_CHARS = 500


class HandlerError(Exception):
    """The configured handler cannot be used (import failed, not callable, program not found)."""


class TaskFailure(Exception):
    """A task failed: the message says why (task log ``error``), ``detail`` says more (``error_detail``)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class TaskTimeout(BaseException):
    """A task ran past task_timeout_seconds."""


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    attempt: int
    worker_id: str
    cluster_id: str


def load_target(target: str, field: str) -> Any:
    """The object named by 'package.module:attribute' (attribute may be dotted)."""
    module_name, _, attribute_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as error:  # any import-time error of user code
        raise HandlerError(
            f"{field}: cannot import module {module_name!r} ({type(error).__name__}: {error}); "
            "install it on the instance (requirements) or fix the import path"
        ) from error
    for name in attribute_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise HandlerError(
                f"{field}: module {module_name!r} has no attribute {attribute_path!r}; fix the name after ':'"
            ) from None
    return obj


def run_with_timeout(call: Callable[[], Any], timeout: float) -> Any:
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _run_with_alarm(call, timeout)
    return _run_in_thread(call, timeout)


def _raise_timeout(signum: int, frame: Any) -> None:
    raise TaskTimeout()


def _run_with_alarm(call: Callable[[], Any], timeout: float) -> Any:
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


class _Runner:
    """A daemon thread that runs calls for one caller thread (a slot), so that a call past its time limit can
    be abandoned: the caller stops waiting, and a new runner serves its next call. One thread per slot,
    not one per task: starting a thread costs ten times the hand-over."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], list[Any], threading.Lock]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._run, name="ec2cluster-task", daemon=True).start()

    def _run(self) -> None:
        while True:
            call, outcome, done = self._requests.get()
            try:
                outcome.append((True, call()))
            except BaseException as error:  # handed to the caller's thread
                outcome.append((False, error))
            done.release()

    def call(self, call: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
        """(True, result) or (False, the exception); raises TaskTimeout after ``timeout`` s."""
        outcome: list[Any] = []
        done = threading.Lock()
        done.acquire()
        self._requests.put((call, outcome, done))
        if not done.acquire(timeout=timeout):
            raise TaskTimeout()
        return outcome[0]


_runners = threading.local()


def _run_in_thread(call: Callable[[], Any], timeout: float) -> Any:
    runner = getattr(_runners, "runner", None) or _Runner()
    _runners.runner = None  # abandoned if the call times out
    succeeded, value = runner.call(call, timeout)
    _runners.runner = runner
    if succeeded:
        return value
    raise value


class PythonHandler:
    def __init__(self, function: Callable[[Any, TaskContext], Any]) -> None:
        self.function = function

    def __call__(self, payload: Any, context: TaskContext, timeout: float) -> Any:
        return run_with_timeout(lambda: self.function(payload, context), timeout)


class CommandHandler:
    def __init__(self, argv: tuple[str, ...], payload_mode: str) -> None:
        self.argv = argv
        self.payload_mode = payload_mode

    def command_line(self, payload_json: str) -> list[str]:
        if self.payload_mode != "argv":
            return list(self.argv)
        return [payload_json if arg == PAYLOAD_PLACEHOLDER else arg for arg in self.argv]

    def __call__(self, payload: Any, context: TaskContext, timeout: float) -> Any:
        payload_json = json.dumps(payload)
        env = {
            **os.environ,
            "EC2CLUSTER_TASK_ID": context.task_id,
            "EC2CLUSTER_ATTEMPT": str(context.attempt),
            "EC2CLUSTER_WORKER_ID": context.worker_id,
            "EC2CLUSTER_CLUSTER_ID": context.cluster_id,
        }
        stdin_text = payload_json if self.payload_mode == "stdin" else None
        try:
            process = subprocess.Popen(
                self.command_line(payload_json),
                stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, so a timeout kills its children too
            )
        except OSError as error:
            raise TaskFailure(f"cannot start {self.argv[0]!r}: {error}") from error
        stdout, stderr = _communicate(process, stdin_text, timeout)
        if process.returncode != 0:
            tail = stderr.decode("utf-8", "replace")[-STDERR_TAIL_CHARS:].strip()
            raise TaskFailure(command_error(process.returncode, tail), detail=tail or None)
        return parse_command_output(stdout.decode("utf-8", "replace"))


def _communicate(process: subprocess.Popen, stdin_text: str | None, timeout: float) -> tuple[bytes, bytes]:
    data = stdin_text.encode("utf-8") if stdin_text is not None else None
    try:
        return process.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        # Bounded: a grandchild that left the group could keep the pipes open forever.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=5)
        raise TaskTimeout() from None
    except BaseException:
        _kill_group(process)  # e.g. KeyboardInterrupt: leave no orphan behind
        process.wait()
        raise


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def first_lines(text: str, lines: int = SUMMARY_LINES, chars: int = SUMMARY_CHARS) -> str:
    """The first non-blank ``lines`` of ``text``, joined, at most ``chars`` characters."""
    kept = [line.rstrip() for line in text.strip().splitlines() if line.strip()][:lines]
    joined = "\n".join(kept)
    return joined if len(joined) <= chars else joined[: chars - 3] + "..."


def error_summary(error: BaseException) -> str:
    """``ValueError: bad payload 7``: the exception's type (module-qualified unless built in) and message."""
    kind = type(error)
    name = (
        kind.__qualname__
        if kind.__module__ in ("builtins", "__main__")
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    message = first_lines(str(error))
    return f"{name}: {message}" if message else name


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def error_detail(error: BaseException) -> str:
    """The traceback of a handler's exception from the handler's own frames (the worker's are noise)."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frames = frames.tb_next
    return "".join(traceback.format_exception(type(error), error, frames or error.__traceback__))


def command_error(returncode: int, stderr_tail: str) -> str:
    """A failed command's error: its exit status and the last line it wrote on stderr."""
    lines = [line.strip() for line in stderr_tail.splitlines() if line.strip()]
    if not lines:
        return f"command exited with status {returncode} (nothing on stderr)"
    return f"command exited with status {returncode}: {first_lines(lines[-1], lines=1)}"


def parse_command_output(text: str) -> Any:
    """A command's result: its stdout as JSON when it is JSON, else the text (None when empty)."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text.rstrip("\r\n")


Handler = Callable[[Any, TaskContext, float], Any]


def build_handler(spec: HandlerSpec) -> Handler:
    """The handler for a configuration, checked now so that a bad one fails at start, not per task."""
    if isinstance(spec, PythonHandlerSpec):
        function = load_target(spec.target, "handler.target")
        if not callable(function):
            raise HandlerError(
                f"handler.target: {spec.target!r} is a {type(function).__name__}, not a function; "
                "give the import path of a function fn(payload, context)"
            )
        if spec.in_processes:
            from .isolation import ProcessHandler  # imports this module

            # Loaded here too: a bad target stops the worker at start, as in thread isolation.
            return ProcessHandler(spec.target)
        return PythonHandler(function)
    if isinstance(spec, CommandHandlerSpec):
        program = spec.argv[0]
        if shutil.which(program) is None:
            raise HandlerError(
                f"handler.argv[0]: {program!r} is not an executable program on PATH; "
                "install it on the instance or give its absolute path"
            )
        return CommandHandler(spec.argv, spec.payload)
    raise HandlerError(f"handler: unsupported handler {spec!r}")
