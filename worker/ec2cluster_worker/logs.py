"""One JSON line per event, so that CloudWatch/journald queries can filter on worker_id and task_id."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

_write_lock = threading.Lock()


class EventLog:
    """Writes events as JSON lines; ``bind`` returns a log that adds fixed fields (worker_id, cluster_id)."""

    def __init__(self, stream: TextIO | None = None, **fields: Any) -> None:
        self._stream = stream
        self._fields = fields

    def bind(self, **fields: Any) -> EventLog:
        return EventLog(self._stream, **{**self._fields, **fields})

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        line = json.dumps(
            {"ts": round(time.time(), 3), "level": level, "event": event, **self._fields, **fields},
            default=str,
            separators=(",", ":"),
        )
        stream = self._stream or sys.stderr
        with _write_lock:
            stream.write(line + "\n")
            stream.flush()
