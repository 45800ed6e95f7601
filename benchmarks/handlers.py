"""The no-op task handler the benchmarks' workers run (payload in, a tiny result out)."""

from __future__ import annotations

from typing import Any


def noop(payload: Any, context: Any) -> dict[str, Any]:
    return {"ok": True}
