"""A loopback HTTP proxy in front of the moto server that shows which AWS calls a worker has in flight.

Tests read progress from it instead of the clock: ``in_flight["ReceiveMessage"] == 1`` means the worker
sits in a long poll right now. It can also hold back ReceiveMessage answers that carry messages until a
gate opens, to deliver messages to a worker at a chosen moment (e.g. after it stopped).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
HOLD_LIMIT_SECONDS = 60  # a held answer is let go after this, whatever the gate says (a safety net)


class CallProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlparse(upstream)
        self.lock = threading.Lock()
        self.started: Counter = Counter()  # requests received, by action
        self.in_flight: Counter = Counter()  # received and not yet answered, by action
        self.held = 0  # ReceiveMessage answers with messages held back now
        self.gate = threading.Event()
        self.gate.set()  # open: nothing is held
        self.on_request: Callable[[str, bytes], None] | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> CallProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    def count(self, counter: str, action: str) -> int:
        with self.lock:
            return getattr(self, counter)[action]

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = (self.headers.get("X-Amz-Target") or "other").rsplit(".", 1)[-1]
                with proxy.lock:
                    proxy.started[action] += 1
                    proxy.in_flight[action] += 1
                try:
                    if proxy.on_request is not None:
                        proxy.on_request(action, body)
                    status, headers, payload = self._forward(body)
                    if action == "ReceiveMessage" and b'"Messages"' in payload and not proxy.gate.is_set():
                        with proxy.lock:
                            proxy.held += 1
                        proxy.gate.wait(HOLD_LIMIT_SECONDS)
                        with proxy.lock:
                            proxy.held -= 1
                    self._reply(status, headers, payload)
                except OSError:  # the client went away (a worker that exited): nothing to answer
                    self.close_connection = True
                finally:
                    with proxy.lock:
                        proxy.in_flight[action] -= 1

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    connection.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        return Handler
