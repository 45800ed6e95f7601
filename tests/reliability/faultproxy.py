"""A fault-injecting HTTP proxy in front of the local cloud: a share of AWS calls get throttled or a 5xx.

Each refused request never reaches the server (so a retry is always safe to make); what a client sees is
exactly what AWS sends when it throttles: ``ThrottlingException`` (JSON protocols: SQS, DynamoDB) or a
503 (query/XML protocols: EC2, IAM, S3). botocore's retry modes must absorb all of them.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def action_of(headers, body: bytes) -> str:
    target = headers.get("X-Amz-Target")
    if target:
        return target.rsplit(".", 1)[-1]
    values = parse_qs(body.decode("utf-8", "replace")).get("Action")
    return values[0] if values else "other"


EC2_ERROR = (
    "<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
    "<RequestID>r</RequestID></Response>"
)
QUERY_ERROR = (
    "<ErrorResponse><Error><Type>Receiver</Type><Code>{code}</Code><Message>{message}</Message></Error>"
    "<RequestId>r</RequestId></ErrorResponse>"
)
REST_ERROR = "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>r</RequestId></Error>"


def error_response(headers, body: bytes, *, throttle: bool) -> tuple[int, bytes, str]:
    """(status, body, content type) of a throttling (400) or 503 answer in the call's protocol."""
    if headers.get("X-Amz-Target"):
        code = "ThrottlingException" if throttle else "ServiceUnavailable"
        payload = json.dumps({"__type": code, "message": "injected by the fault proxy"}).encode()
        return (400 if throttle else 503), payload, "application/x-amz-json-1.0"
    text = body.decode("utf-8", "replace")
    if "Action=" in text:
        template = EC2_ERROR if "Version=2016-11-15" in text else QUERY_ERROR
        code = "RequestLimitExceeded" if template is EC2_ERROR else "Throttling"
        status = 400 if throttle else 503
        code = code if throttle else "ServiceUnavailable"
    else:
        template, code, status = REST_ERROR, "SlowDown", 503
    return status, template.format(code=code, message="injected by the fault proxy").encode(), "text/xml"


class FaultProxy:
    def __init__(self, upstream: str, share: float, seed: int = 7) -> None:
        self.upstream = urlparse(upstream)
        self.share = share
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter = Counter()
        self.forwarded: Counter = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def should_fail(self, action: str) -> bool:
        with self.lock:
            # Every call type made more than once is hit at least once, whatever the dice say: a worker
            # that makes ~15 BatchWriteItem calls would escape a 15 % share one run in eleven.
            if not self.injected[action] and self.forwarded[action]:
                return True
            return self.random.random() < self.share

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = action_of(self.headers, body)
                if proxy.should_fail(action):
                    with proxy.lock:
                        proxy.injected[action] += 1
                    self._reply(*error_response(self.headers, body, throttle=proxy.random.random() < 0.5))
                    return
                with proxy.lock:
                    proxy.forwarded[action] += 1
                self._forward(body)

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes) -> None:
                connection = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        return Handler
