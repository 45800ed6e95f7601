"""A handler that fails the tasks listed in a file until the file is emptied (the fix), and records every
run of a task, so a test can count executions across workers (put on PYTHONPATH of worker subprocesses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fail_listed(payload: dict[str, Any], context: Any) -> dict[str, Any]:
    with open(payload["runs_file"], "a", encoding="utf-8") as runs:
        runs.write(context.task_id + "\n")
    if context.task_id in Path(payload["fail_file"]).read_text().split():
        raise ValueError(f"bad payload {payload['n']}")
    return {"n": payload["n"]}
