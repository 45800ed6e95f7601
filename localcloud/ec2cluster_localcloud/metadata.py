"""The local cloud's instance metadata service: IMDSv2 only, one listener per instance.

On EC2 every instance reaches its own metadata at 169.254.169.254; here each instance gets a listener on a
loopback port of its own, and the instance runner gives the worker its address in
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (the variable botocore and the AWS CLI read), nothing else: the
worker learns its instance id from here, and boto3 finds the instance profile's credentials here as it does
on EC2.

As on an instance launched with ``HttpTokens=required``: a session token comes from ``PUT /latest/api/token``
(TTL header 1 to 21600 s, 400 otherwise; 403 for a request that carries ``X-Forwarded-For``), every GET
needs a live token (401 otherwise), and an unknown path is 404. The credentials are the role's temporary
credentials from the local cloud's STS (AssumeRole), there before the instance's user data runs and renewed
in the background RENEW_BEFORE_SECONDS before they expire, so a client always finds ones with time left and
never waits for STS (botocore gives metadata one second), as on EC2. A spot interruption notice and a
rebalance recommendation are 404 until injected.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ec2cluster_localcloud.loopback import LoopbackServer, QuietHandler

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL_SECONDS = 21600
META_PREFIX = "/latest/meta-data/"
CREDENTIAL_SECONDS = 3600  # STS AssumeRole's default; the minimum is 900
RENEW_BEFORE_SECONDS = 20 * 60  # botocore refreshes 15 min before expiry: it must find fresher ones then
SPOT_ACTION_PATH = "spot/instance-action"
REBALANCE_PATH = "events/recommendations/rebalance"

Credentials = Mapping[str, Any]  # STS's Credentials: AccessKeyId, SecretAccessKey, SessionToken, Expiration


@dataclass(frozen=True)
class InstanceFacts:
    """What the metadata of one instance says about it."""

    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    image_id: str
    instance_profile_arn: str | None = None
    instance_profile_id: str | None = None
    role_name: str | None = None  # the instance profile's role: None without a profile
    role_arn: str | None = None
    lifecycle: str = "on-demand"  # instance-life-cycle: "spot" or "on-demand"


def iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expiration_seconds(credentials: Credentials) -> float:
    expiration = credentials["Expiration"]
    if isinstance(expiration, str):
        expiration = dt.datetime.fromisoformat(expiration.replace("Z", "+00:00"))
    return expiration.timestamp()


def credentials_due(credentials: Credentials | None, now: float, renew_before: float) -> bool:
    """True when the role's credentials must be (re)issued: none yet, or less than ``renew_before`` left."""
    return credentials is None or expiration_seconds(credentials) - now < renew_before


def token_ttl(value: str | None) -> int | None:
    """The TTL a token PUT asks for, or None when it is missing or outside 1..21600 (a 400 on AWS)."""
    try:
        ttl = int(value or "")
    except ValueError:
        return None
    return ttl if 1 <= ttl <= MAX_TOKEN_TTL_SECONDS else None


def listing(paths: list[str], directory: str) -> str | None:
    """The text of a metadata directory (children, subdirectories with a trailing /), None when empty."""
    children: list[str] = []
    for path in paths:
        if path.startswith(directory) and path != directory:
            rest = path[len(directory) :]
            child = rest.split("/", 1)[0] + ("/" if "/" in rest else "")
            if child not in children:
                children.append(child)
    return "\n".join(children) if children else None


class InstanceMetadataService:
    """One instance's metadata: answers requests (``answer``), and serves them on loopback once started."""

    def __init__(
        self,
        facts: InstanceFacts,
        issue_credentials: Callable[[InstanceFacts], Credentials],
        *,
        clock: Callable[[], float] = time.time,
        renew_before_seconds: float = RENEW_BEFORE_SECONDS,
    ) -> None:
        self.facts = facts
        self.issue_credentials = issue_credentials
        self.clock = clock
        self.renew_before_seconds = renew_before_seconds
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry
        self._credentials: Credentials | None = None
        self._credentials_updated_at = 0.0
        self._notices: dict[str, str] = {}  # metadata path -> JSON document, once injected
        self._server: LoopbackServer | None = None
        self._closed = threading.Event()
        self.credentials_issued = 0

    # Serving

    def start(self, host: str = "127.0.0.1", port: int = 0, create: Callable | None = None) -> str:
        """Issue the role's credentials, listen on a free loopback port; the base URL (http://127.0.0.1:N).

        ``host``, ``port`` and ``create``: another address, e.g. 169.254.169.254:80 created in an
        image-backed instance's network namespace (``ec2cluster_localcloud.loopback.LoopbackServer``)."""
        service = self
        if self.facts.role_name:
            self.current_credentials()
            threading.Thread(
                target=self._renew, name=f"imds-renew-{self.facts.instance_id}", daemon=True
            ).start()

        class Handler(QuietHandler):
            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                self._send(*service.answer("PUT", self.path, self.headers))

            def do_GET(self) -> None:  # noqa: N802
                self._send(*service.answer("GET", self.path, self.headers))

            def _send(self, status: int, body: str, headers: dict[str, str]) -> None:
                self.send_body(status, body.encode("utf-8"), {"Content-Type": "text/plain", **headers})

        self._server = LoopbackServer(
            Handler, f"imds-{self.facts.instance_id}", host=host, port=port, create=create
        )
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return self._server.url

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            self._server.close()
            self._server = None

    # Injected events

    def inject_spot_interruption(self, action_time: float, action: str = "terminate") -> None:
        """The notice EC2 posts two minutes before it reclaims a spot instance."""
        with self._lock:
            self._notices[SPOT_ACTION_PATH] = json.dumps({"action": action, "time": iso(action_time)})

    def inject_rebalance_recommendation(self) -> None:
        with self._lock:
            self._notices[REBALANCE_PATH] = json.dumps({"noticeTime": iso(self.clock())})

    # Answers

    def answer(
        self, method: str, raw_path: str, headers: Mapping[str, str]
    ) -> tuple[int, str, dict[str, str]]:
        """(HTTP status, body, headers) for one request, as IMDSv2 answers it."""
        path = raw_path.split("?", 1)[0]
        if method == "PUT":
            if path != TOKEN_PATH:
                return 405, "", {}
            if headers.get("X-Forwarded-For"):  # IMDSv2 refuses tokens to requests relayed by a proxy
                return 403, "", {}
            ttl = token_ttl(headers.get(TOKEN_TTL_HEADER))
            if ttl is None:
                return 400, "", {}
            token = secrets.token_urlsafe(40)
            with self._lock:
                now = self.clock()
                self._tokens = {t: expiry for t, expiry in self._tokens.items() if expiry > now}
                self._tokens[token] = now + ttl
            return 200, token, {TOKEN_TTL_HEADER: str(ttl)}
        if method != "GET":
            return 405, "", {}
        with self._lock:
            expiry = self._tokens.get(headers.get(TOKEN_HEADER) or "")
            if expiry is None or expiry <= self.clock():
                return 401, "", {}
        if path.startswith(META_PREFIX) or path + "/" == META_PREFIX:
            body = self.meta_data(path[len(META_PREFIX) :] if path.startswith(META_PREFIX) else "")
            return (404, "", {}) if body is None else (200, body, {})
        return 404, "", {}

    def meta_data(self, path: str) -> str | None:
        """The text at ``/latest/meta-data/<path>``, None for a 404."""
        documents = self.documents()
        if path in documents:
            return documents[path]()
        if path == "" or path.endswith("/"):
            return listing(list(documents), path)
        return None

    def documents(self) -> dict[str, Callable[[], str]]:
        facts = self.facts
        documents: dict[str, Callable[[], str]] = {
            "ami-id": lambda: facts.image_id,
            "instance-id": lambda: facts.instance_id,
            "instance-type": lambda: facts.instance_type,
            "instance-life-cycle": lambda: facts.lifecycle,
            "placement/availability-zone": lambda: facts.availability_zone,
            "placement/region": lambda: facts.region,
        }
        if facts.role_name:
            documents["iam/info"] = self._iam_info
            documents[f"iam/security-credentials/{facts.role_name}"] = self._role_credentials
        with self._lock:
            for notice_path, document in self._notices.items():
                documents[notice_path] = lambda document=document: document
        return documents

    def _iam_info(self) -> str:
        return json.dumps(
            {
                "Code": "Success",
                "LastUpdated": iso(self.clock()),
                "InstanceProfileArn": self.facts.instance_profile_arn,
                "InstanceProfileId": self.facts.instance_profile_id,
            }
        )

    def current_credentials(self) -> tuple[Credentials, float]:
        """(the role's credentials, when they were issued), issuing new ones when they are due."""
        with self._lock:
            now = self.clock()
            if credentials_due(self._credentials, now, self.renew_before_seconds):
                self._credentials = self.issue_credentials(self.facts)
                self._credentials_updated_at = now
                self.credentials_issued += 1
            return self._credentials, self._credentials_updated_at

    def _renew(self) -> None:
        while True:
            with self._lock:
                left = expiration_seconds(self._credentials) - self.clock() - self.renew_before_seconds
            if self._closed.wait(max(left, 1.0)):
                return
            try:
                self.current_credentials()
            except Exception:  # STS unreachable for a moment: requests renew them, or the next round does
                log.exception("instance %s: renewing the role's credentials failed", self.facts.instance_id)

    def _role_credentials(self) -> str:
        credentials, updated_at = self.current_credentials()
        return json.dumps(
            {
                "Code": "Success",
                "LastUpdated": iso(updated_at),
                "Type": "AWS-HMAC",
                "AccessKeyId": credentials["AccessKeyId"],
                "SecretAccessKey": credentials["SecretAccessKey"],
                "Token": credentials["SessionToken"],
                "Expiration": iso(expiration_seconds(credentials)),
            }
        )
