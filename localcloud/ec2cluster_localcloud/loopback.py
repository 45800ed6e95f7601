"""A small HTTP server on a free loopback port, in a daemon thread: the metadata and control listeners.

``host``/``port`` bind another address (an image-backed instance's metadata listens at 169.254.169.254:80
in the instance's own network namespace); ``create`` runs the listener's creation, e.g. in that namespace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing (one line per request would flood the local cloud's log)."""

    def send_body(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass


class LoopbackServer:
    """``handler`` served on 127.0.0.1 (any free port, by default) until ``close()``."""

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        create: Callable[[Callable[[], ThreadingHTTPServer]], ThreadingHTTPServer] | None = None,
    ) -> None:
        def make() -> ThreadingHTTPServer:
            return ThreadingHTTPServer((host, port), handler)

        self._server: ThreadingHTTPServer | None = create(make) if create else make()
        self._server.daemon_threads = True
        bound = self._server.server_port
        self.url = f"http://{host}" if bound == 80 else f"http://{host}:{bound}"
        threading.Thread(target=self._server.serve_forever, name=name, daemon=True).start()

    def close(self) -> None:
        server, self._server = self._server, None  # closed once, whichever thread gets here first
        if server is not None:
            server.shutdown()
            server.server_close()
