"""Can this worker reach the AWS services it needs? One parallel round of TCP connects, at start.

On AWS, an instance in a subnet with no way to a service (no public IP behind an internet gateway, no NAT
gateway, no VPC endpoint) gets no answer at all: its connections time out. Without this check the worker
would wait out botocore's connect timeout and retries on its first call, and the cluster would keep
launching instances that die the same way. With it, the worker says which service it cannot reach, on its
console (stdout: ``GetConsoleOutput`` shows it) and on its status item when DynamoDB is reachable, and stops.

The endpoints probed are the ones the worker's own clients use: botocore resolves them (the region's
endpoint, or ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>``), and a proxy that botocore would go
through (``HTTPS_PROXY``, ``NO_PROXY``) is probed instead of the endpoint behind it. A healthy start pays one
connect per service, in parallel: milliseconds.

The console line is ``ec2cluster: startup-failed: <reason>`` (``CONSOLE_FAILURE_PREFIX``): the controller
finds the last one in an instance's console output with ``failure_from_console``; the reason is the stop
reason without its ``startup-failed: `` prefix, so ``status.startup_failure_reason(failure_from_console(t))``
is what the worker's status item says. Reasons name no instance, time or port of this worker's own: workers
failing alike say the same, and the controller stops after a few identical failures.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit

from .config import S3OutputSpec, WorkerConfig

CONSOLE_FAILURE_PREFIX = "ec2cluster: startup-failed: "
# The stop reason's own prefix (status.STARTUP_FAILED + ": "), which the console line's prefix ends with.
STOP_REASON_PREFIX = "startup-failed: "
DEFAULT_TIMEOUT_SECONDS = 5.0
# A probe still busy this long after its timeout is stuck in name resolution (which has no timeout of its
# own): the check reports it and leaves its thread behind.
RESOLUTION_GRACE_SECONDS = 2.0
# The order services are named in a reason: fixed, so that workers failing alike say the same.
SERVICE_ORDER = ("dynamodb", "sqs", "s3", "logs")

NAME_NOT_RESOLVED = "name not resolved"
CONNECTION_REFUSED = "connection refused"
# Problems that mean "no way there" (a packet dropped by routing or a security group), whose fix is a route.
_NO_ROUTE_MARKERS = ("timed out", "no answer", "unreachable", "no route")


def services_needed(config: WorkerConfig) -> list[str]:
    """The services a worker with this configuration calls: the state table's and the queue's, and S3 for an
    S3 output (a DynamoDB output table is DynamoDB too). A custom sink's services are its own affair. The
    worker ships no logs to CloudWatch Logs (its events go to stderr), so "logs" is never needed."""
    needed = ["dynamodb", "sqs"]
    if isinstance(config.output, S3OutputSpec):
        needed.append("s3")
    return needed


def endpoint_of(service: str, region: str, session: Any = None) -> tuple[str, str, int]:
    """(endpoint URL, host, port) that a client of ``service`` in ``region`` sends its requests to.

    botocore resolves it (no network call): the region's endpoint, or AWS_ENDPOINT_URL_<SERVICE> /
    AWS_ENDPOINT_URL. ``session``: the boto3 session the worker makes its clients with (default: a new one).
    """
    if session is None:
        import boto3

        session = boto3.session.Session()
    url = session.client(service, region_name=region).meta.endpoint_url
    return (url, *_host_port(url))


def _host_port(url: str) -> tuple[str, int]:
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return parts.hostname or "", parts.port or default_port


def proxy_of(url: str) -> tuple[str, int] | None:
    """(host, port) of the proxy botocore would connect to for ``url`` (HTTP(S)_PROXY, NO_PROXY), if any."""
    from botocore.utils import get_environ_proxies

    proxy = get_environ_proxies(url).get(urlsplit(url).scheme)
    return _host_port(proxy) if proxy else None


def probe(host: str, port: int, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout`` seconds, else why not, briefly.

    What ``socket.create_connection`` does, except that all of the host's addresses share the one timeout.
    The answers: "connection timed out after 5 s", "connection refused", "name not resolved", or the
    system's word ("network is unreachable", "no route to host").
    """
    deadline = time.monotonic() + timeout
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return NAME_NOT_RESOLVED
    problem = None
    for family, kind, protocol, _, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(remaining)
            sock.connect(address)
            return None
        except socket.timeout:  # noqa: UP041 (on Python 3.9, the worker's floor, it is not TimeoutError)
            problem = None  # the time is up: reported below
        except ConnectionRefusedError:
            problem = CONNECTION_REFUSED
        except OSError as error:
            problem = (error.strerror or type(error).__name__).lower()
        finally:
            sock.close()
    return problem or f"connection timed out after {timeout:g} s"


def check(
    services: Iterable[str], region: str, timeout: float = DEFAULT_TIMEOUT_SECONDS, session: Any = None
) -> dict[str, str]:
    """Service -> problem, for each of ``services`` that cannot be reached (empty: all reachable).

    Every service is probed at once, each in a thread, so the check costs one timeout, not one per service.
    A problem reads ``<host>:<port>: <what happened>`` (``... via proxy <host>:<port>: ...`` through a
    proxy); ``unreachable_reason`` makes the stop reason of them.
    """
    targets: dict[str, tuple[str, str, int]] = {}
    for service in dict.fromkeys(services):
        url, host, port = endpoint_of(service, region, session)
        proxy = proxy_of(url)
        if proxy is None:
            targets[service] = (_hostport(host, port), host, port)
        else:
            targets[service] = (f"{_hostport(host, port)} via proxy {_hostport(*proxy)}", *proxy)
    results: dict[str, str | None] = {}

    def run(service: str, host: str, port: int) -> None:
        results[service] = probe(host, port, timeout)

    threads = [
        threading.Thread(
            target=run, args=(service, host, port), name=f"ec2cluster-probe-{service}", daemon=True
        )
        for service, (_, host, port) in targets.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + RESOLUTION_GRACE_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    problems: dict[str, str] = {}
    for service, (target, _, _) in targets.items():
        if service not in results:  # still resolving its name: left behind (a daemon thread)
            problems[service] = f"{target}: no answer within {timeout:g} s (name resolution)"
        elif results[service] is not None:
            problems[service] = f"{target}: {results[service]}"
    return problems


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ordered(services: Iterable[str]) -> list[str]:
    known = {name: n for n, name in enumerate(SERVICE_ORDER)}
    return sorted(services, key=lambda name: (known.get(name, len(known)), name))


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def unreachable_reason(problems: Mapping[str, str]) -> str:
    """One line saying what cannot be reached and what would fix it; the same on every instance alike.

    ``cannot reach sqs (sqs.us-east-1.amazonaws.com:443): connection timed out after 5 s; this subnet needs
    a route to it: a NAT gateway, a VPC endpoint for sqs, or a public IP with an internet gateway (and
    security groups that allow outbound TCP 443)``
    """
    parts = []
    no_route: list[str] = []
    no_route_ports: set[int] = set()
    unresolved: list[str] = []
    refused: list[str] = []
    for service in _ordered(problems):
        target, separator, what = problems[service].partition(": ")
        if not separator:
            target, what = "", problems[service]
        what = " ".join(what.split())
        parts.append(
            f"cannot reach {service} ({target}): {what}" if target else f"cannot reach {service}: {what}"
        )
        if any(marker in what for marker in _NO_ROUTE_MARKERS):
            no_route.append(service)
            port = target.rsplit(":", 1)[-1]
            no_route_ports.add(int(port) if port.isdigit() else 443)
        elif NAME_NOT_RESOLVED in what:
            unresolved.append(service)
        elif CONNECTION_REFUSED in what:
            refused.append(service)
    if no_route:
        it, endpoints = ("it", "a VPC endpoint") if len(no_route) == 1 else ("them", "VPC endpoints")
        ports = _and([str(port) for port in sorted(no_route_ports)])
        parts.append(
            f"this subnet needs a route to {it}: a NAT gateway, {endpoints} for {_and(no_route)}, "
            f"or a public IP with an internet gateway (and security groups that allow outbound TCP {ports})"
        )
    if unresolved:
        parts.append(
            f"the name of {_and(unresolved)} does not resolve: check the endpoint URL and the VPC's DNS "
            "(enableDnsSupport; private DNS on an interface endpoint)"
        )
    if refused:
        parts.append(f"nothing accepts connections at {_and(refused)}'s address: check the endpoint URL")
    return "; ".join(parts)


def console_line(stop_reason: str) -> str:
    """The console line of a start-up failure, from its stop reason (``startup-failed: ...``) or its reason.

    One line (a reason's line breaks become " | "), starting with ``CONSOLE_FAILURE_PREFIX``.
    """
    reason = (
        stop_reason[len(STOP_REASON_PREFIX) :] if stop_reason.startswith(STOP_REASON_PREFIX) else stop_reason
    )
    return CONSOLE_FAILURE_PREFIX + " | ".join(line.strip() for line in reason.strip().splitlines())


def print_console_failure(stop_reason: str, stream: TextIO | None = None) -> None:
    """Print ``console_line(stop_reason)`` to stdout (the instance's console), flushed at once."""
    stream = stream or sys.stdout
    stream.write(console_line(stop_reason) + "\n")
    stream.flush()


def failure_from_console(text: str) -> str | None:
    """The reason of the last start-up failure line in console output (``GetConsoleOutput``), or None.

    A line may carry a prefix of the console's own (``[   31.2] cloud-init[1021]: ec2cluster: ...``);
    what follows ``CONSOLE_FAILURE_PREFIX`` is the reason.
    """
    found = None
    for line in text.splitlines():
        _, prefix, reason = line.partition(CONSOLE_FAILURE_PREFIX)
        if prefix and reason.strip():
            found = reason.strip()
    return found
