"""Task handlers for the reliability tests (imported by worker processes from the repository root)."""

from __future__ import annotations

import time
from typing import Any


def double(payload: Any, context: Any) -> dict[str, Any]:
    """A fast task whose result is checkable: ``{"n": 2 * payload["n"]}`` (optionally after a short sleep)."""
    time.sleep(payload.get("sleep", 0))
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
