"""Handlers and a sink for the worker's tests (put on PYTHONPATH of worker subprocesses)."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

NOT_CALLABLE = 42


def echo(payload: Any, context: Any) -> dict[str, Any]:
    return {
        "echo": payload,
        "task_id": context.task_id,
        "attempt": context.attempt,
        "worker": context.worker_id,
    }


def fail_if_asked(payload: Any, context: Any) -> Any:
    if isinstance(payload, dict) and payload.get("fail"):
        raise ValueError(f"asked to fail: {payload['fail']}")
    if isinstance(payload, dict) and payload.get("sleep"):
        time.sleep(payload["sleep"])
    return {"ok": payload}


def sleepy(payload: Any, context: Any) -> Any:
    time.sleep(payload.get("sleep", 0.2) if isinstance(payload, dict) else 0.2)
    return payload


def hang_if_asked(payload: Any, context: Any) -> Any:
    if isinstance(payload, dict) and payload.get("hang"):
        with contextlib.suppress(Exception):  # a handler swallowing errors must still be interrupted
            time.sleep(3600)
    return {"ok": payload}


def noop(payload: Any, context: Any) -> None:
    return None


def not_serialisable(payload: Any, context: Any) -> Any:
    return {"when": object()}


class FileSink:
    """A custom sink: appends results as JSON lines to options["path"]."""

    def __init__(self, options: dict[str, Any], context: Any) -> None:
        self.path = options["path"]
        self.cluster_id = context.cluster_id

    def write(self, completed: list[Any]) -> dict[str, dict[str, Any]]:
        with open(self.path, "a", encoding="utf-8") as sink_file:
            for result in completed:
                sink_file.write(json.dumps({"task_id": result.task_id, "result": result.result}) + "\n")
        return {result.task_id: {"output": f"file://{self.path}"} for result in completed}


class BrokenSink:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        pass

    def write(self, completed: list[Any]) -> dict[str, dict[str, Any]]:
        raise RuntimeError("sink is broken")


def fail_first_attempt(payload: Any, context: Any) -> Any:
    if isinstance(payload, dict) and payload.get("fail_once") and context.attempt == 1:
        raise ValueError("fails on the first attempt only")
    return fail_if_asked(payload, context)


def hold_until_released(payload: Any, context: Any) -> Any:
    """Says it started (a file ``<dir>/<task id>.started``), then waits for ``<dir>/release``: a test holds
    tasks running for as long as it needs to observe them."""
    import os
    from pathlib import Path

    folder = Path(payload["dir"])
    (folder / f"{context.task_id}.started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (folder / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.02)
    return {"pid": os.getpid()}


_meetings: dict[str, Any] = {}
_meetings_lock = __import__("threading").Lock()


def meet(payload: Any, context: Any) -> Any:
    """Returns only when ``payload["parties"]`` tasks are inside it at once (fails after 30 s): tasks that
    ran one after another could never all get through."""
    import threading

    with _meetings_lock:
        barrier = _meetings.setdefault(payload["name"], threading.Barrier(payload["parties"], timeout=30))
    barrier.wait()
    return {"met": payload["parties"]}


def chatty(payload: Any, context: Any) -> Any:
    print("a handler printing to stdout", payload)
    return {"pid": __import__("os").getpid(), "attempt": context.attempt}
