"""EC2's events injected into a running local cloud from another process (the CLI's ``spot-interrupt``).

The local cloud listens on a loopback port of its own (``EC2CLUSTER_LOCALCLOUD_CONTROL_URL``) for POSTs with
a JSON body; the answer is ``{"ok": true, ...}`` with what the action returns:

- ``/spot-interruption`` ``{"instance_id", "notice_seconds"}``; ``/rebalance-recommendation``
  ``{"instance_id"}``;
- ``/capacity`` ``{"document": {...}}`` (replace it), ``{"pool": {"instance_type", "availability_zone",
  "market", "capacity"}}``, ``{"vcpu_quota": {"market", "group", "vcpus"}}`` (null: unlimited), any of
  them or none; answers ``{"capacity": <the document now>}``;
- ``/spot-interruptions`` ``{"rate_per_hour", "notice_seconds", "seed"}``: random interruptions of running
  spot instances (rate 0: none);
- ``/interrupt-oldest-spot`` ``{"count", "notice_seconds", "cluster_id", "tags"}``: notices to the oldest
  running spot instances (of that cluster, with those tags); answers ``{"instance_ids": [...]}``.

In Python, call the LocalCloud's methods instead.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ec2cluster_localcloud.loopback import LoopbackServer, QuietHandler

CONTROL_URL_ENV = "EC2CLUSTER_LOCALCLOUD_CONTROL_URL"
SPOT_INTERRUPTION = "/spot-interruption"
REBALANCE_RECOMMENDATION = "/rebalance-recommendation"
CAPACITY = "/capacity"
SPOT_INTERRUPTIONS = "/spot-interruptions"
INTERRUPT_OLDEST_SPOT = "/interrupt-oldest-spot"


class ControlError(RuntimeError):
    """The local cloud refused or could not take an injected event."""


class ControlServer:
    """Calls ``actions[path](body)`` per POST: 404 for an unknown instance (KeyError), 400 for bad input."""

    def __init__(self, actions: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]]) -> None:
        self.actions = actions
        self._server: LoopbackServer | None = None

    def start(self) -> str:
        actions = self.actions

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                action = actions.get(self.path)
                if action is None:
                    return self._send(404, {"error": f"no such control: {self.path}"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                    result = action(body) or {}
                except KeyError as error:
                    return self._send(404, {"error": str(error.args[0] if error.args else error)})
                except (ValueError, TypeError) as error:
                    return self._send(400, {"error": str(error)})
                self._send(200, {"ok": True, **result})

            def _send(self, status: int, document: dict[str, Any]) -> None:
                self.send_body(status, json.dumps(document).encode(), {"Content-Type": "application/json"})

        self._server = LoopbackServer(Handler, "localcloud-control")
        return self._server.url

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


def post(control_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one event to a running local cloud; its answer; ControlError with its reason when it refuses."""
    request = urllib.request.Request(
        control_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        reason = json.loads(error.read() or b"{}").get("error", error.reason)
        raise ControlError(reason) from None
    except OSError as error:
        raise ControlError(f"no local cloud answers at {control_url}: {error}") from None
