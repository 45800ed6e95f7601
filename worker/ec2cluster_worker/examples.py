"""Example handlers, shipped so that a cluster can be tried without writing one."""

from __future__ import annotations

from typing import Any


def count_smileys(payload: dict[str, Any], context: Any) -> dict[str, Any]:
    """``{"id": ..., "text": ...}`` -> ``{"id": ..., "smileys": <number of ":)" in the text>}``."""
    text = payload.get("text") or ""
    if not isinstance(text, str):
        raise TypeError(f"payload text must be a string, not {type(text).__name__}")
    return {"id": payload.get("id"), "smileys": text.count(":)")}
