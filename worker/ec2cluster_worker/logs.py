"""One JSON line per event, so that CloudWatch/journald queries can filter on worker_id and task_id."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

_write_lock = threading.Lock()

# Where lines go besides the console: (time, line), e.g. cloudwatch.LogShipper.add; it must not block.
LineSink = Callable[[float, str], None]


class EventLog:
    """Writes events as JSON lines; ``bind`` returns a log that adds fixed fields (worker_id, cluster_id)."""

    def __init__(self, stream: TextIO | None = None, sink: LineSink | None = None, **fields: Any) -> None:
        self._stream = stream
        self._sink = sink
        self._fields = fields

    def bind(self, **fields: Any) -> EventLog:
        return EventLog(self._stream, self._sink, **{**self._fields, **fields})

    def with_sink(self, sink: LineSink | None) -> EventLog:
        """This log, its lines also given to ``sink`` (None: the console only)."""
        return EventLog(self._stream, sink, **self._fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = time.time()
        line = json.dumps(
            {"ts": round(now, 3), "level": level, "event": event, **self._fields, **fields},
            default=str,
            separators=(",", ":"),
        )
        stream = self._stream or sys.stderr
        with _write_lock:
            stream.write(line + "\n")
            stream.flush()
        if self._sink is not None:
            # Shipping a line never breaks the work that logged it.
            with contextlib.suppress(Exception):
                self._sink(now, line)
