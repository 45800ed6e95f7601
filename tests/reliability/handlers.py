"""Task handlers for the reliability tests (imported by worker processes from the repository root)."""

from __future__ import annotations

import os
import time
from typing import Any

GATE_LIMIT_SECONDS = 120


def double(payload: Any, context: Any) -> dict[str, Any]:
    """A fast task whose result is checkable: ``{"n": 2 * payload["n"]}``.

    Optionally after a short sleep, or once the file named by ``gate`` exists (the test creates it when it
    has done what must happen before the job can end).
    """
    time.sleep(payload.get("sleep", 0))
    gate = payload.get("gate")
    if gate:
        deadline = time.monotonic() + GATE_LIMIT_SECONDS
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gate {gate} never opened")
            time.sleep(0.05)
    return {"n": 2 * payload["n"]}


def poison_if_asked(payload: Any, context: Any) -> dict[str, Any]:
    if payload.get("poison"):
        raise RuntimeError(f"poison task {context.task_id}")
    return {"n": 2 * payload["n"]}


def hang_if_asked(payload: Any, context: Any) -> dict[str, Any]:
    if payload.get("hang"):
        try:
            time.sleep(3600)
        except Exception:  # a handler that swallows errors must still be stopped
            time.sleep(3600)
    return {"n": 2 * payload["n"]}
