"""The no-op task handler the benchmarks' workers run (payload in, a tiny result out)."""

from __future__ import annotations

from typing import Any


def noop(payload: Any, context: Any) -> dict[str, Any]:
    return {"ok": True}


def burn(payload: Any, context: Any) -> dict[str, Any]:
    """CPU-bound: the same arithmetic for every task (``payload["n"]`` steps), no I/O."""
    total = 0
    for i in range(payload["n"]):
        total += i * i % 7
    return {"total": total}


def sleep_for(payload: Any, context: Any) -> dict[str, Any]:
    """Waits ``payload["s"]`` seconds (a task whose length, not its CPU, is what matters)."""
    import time

    time.sleep(payload["s"])
    return {"ok": True}
