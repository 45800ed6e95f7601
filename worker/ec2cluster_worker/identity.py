"""Who this worker is: env EC2CLUSTER_WORKER_ID, else the EC2 instance id from instance metadata (IMDSv2).

The metadata address is EC2's link-local one unless EC2CLUSTER_IMDS_URL or AWS_EC2_METADATA_SERVICE_ENDPOINT
(botocore's own variable, which the local cloud sets for its instances) names another. Instance metadata is
contacted only when allowed: with EC2CLUSTER_WORKER_ID set and no address given (a worker run by hand) it
never is, so local runs send no traffic off loopback.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping

WORKER_ID_ENV = "EC2CLUSTER_WORKER_ID"
IMDS_URL_ENV = "EC2CLUSTER_IMDS_URL"
BOTOCORE_IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_IMDS_URL = "http://169.254.169.254"
TOKEN_TTL_SECONDS = 21600
TIMEOUT_SECONDS = 2.0
ATTEMPTS = 1
# botocore's own settings for its metadata calls (credentials): the user data raises them, as a busy
# instance can miss one short attempt. The worker's own metadata calls follow the same settings.
TIMEOUT_ENV = "AWS_METADATA_SERVICE_TIMEOUT"
ATTEMPTS_ENV = "AWS_METADATA_SERVICE_NUM_ATTEMPTS"


class MetadataUnavailable(Exception):
    """Instance metadata could not be reached or answered with an error."""


def imds_base_url(environ: Mapping[str, str]) -> str | None:
    """The metadata base URL to use, or None when this worker must not contact instance metadata."""
    explicit = explicit_imds_url(environ)
    if explicit:
        return explicit
    if environ.get(WORKER_ID_ENV, "").strip():
        return None
    if environ.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
        return None
    return DEFAULT_IMDS_URL


def explicit_imds_url(environ: Mapping[str, str]) -> str | None:
    """The metadata address the environment names, if it names one."""
    for name in (IMDS_URL_ENV, BOTOCORE_IMDS_ENDPOINT_ENV):
        value = environ.get(name, "").strip()
        if value:
            return value.rstrip("/")
    return None


def metadata_settings(environ: Mapping[str, str]) -> tuple[float, int]:
    """(timeout per attempt, attempts): botocore's variables when set, else 2 s and one attempt."""
    try:
        timeout = float(environ.get(TIMEOUT_ENV) or TIMEOUT_SECONDS)
    except ValueError:
        timeout = TIMEOUT_SECONDS
    try:
        attempts = max(1, int(environ.get(ATTEMPTS_ENV) or ATTEMPTS))
    except ValueError:
        attempts = ATTEMPTS
    return timeout, attempts


class InstanceMetadata:
    """A minimal IMDSv2 client: a session token first, then GETs carrying it.

    A request that gets no answer (timeout, refused connection) is made again, up to ``attempts`` times in
    all, as botocore does for its own metadata calls; an HTTP answer is final.
    """

    def __init__(self, base_url: str, timeout: float = TIMEOUT_SECONDS, attempts: int = ATTEMPTS) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.attempts = attempts
        self._token: str | None = None

    @classmethod
    def from_environ(cls, base_url: str, environ: Mapping[str, str]) -> InstanceMetadata:
        timeout, attempts = metadata_settings(environ)
        return cls(base_url, timeout, attempts)

    def _open(self, request: urllib.request.Request) -> str:
        for attempt in range(1, self.attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read().decode("utf-8")
            except urllib.error.HTTPError:
                raise
            except (urllib.error.URLError, OSError):
                if attempt == self.attempts:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> str | None:
        """The text at ``/latest/<path>``; None when it does not exist (404)."""
        try:
            return self._get(path)
        except urllib.error.HTTPError as error:
            if error.code == 401:  # token expired: fetch a new one, once
                self._token = None
                return self._get(path)
            raise

    def _get(self, path: str) -> str | None:
        request = urllib.request.Request(
            f"{self.base_url}/latest/{path}", headers={"X-aws-ec2-metadata-token": self._session_token()}
        )
        try:
            return self._open(request)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise
        except (urllib.error.URLError, OSError) as error:
            raise MetadataUnavailable(f"{self.base_url}: {error}") from error

    def _session_token(self) -> str:
        if self._token is None:
            request = urllib.request.Request(
                f"{self.base_url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
            )
            try:
                self._token = self._open(request)
            except (urllib.error.URLError, OSError) as error:
                raise MetadataUnavailable(f"{self.base_url}: no IMDSv2 token ({error})") from error
        return self._token


# Where the worker runs, from instance metadata, as its status item names it: the controller launches a
# rebalance-stopped worker's replacement in another pool (instance type, zone, market).
PLACEMENT_PATHS = {
    "instance_type": "meta-data/instance-type",
    "availability_zone": "meta-data/placement/availability-zone",
    "lifecycle": "meta-data/instance-life-cycle",  # "spot" or "on-demand" on EC2
}
PLACEMENT_VALUE_CHARS = 64  # keeps the status item small whatever an odd metadata service answers


def read_placement(metadata: InstanceMetadata) -> dict[str, str]:
    """{instance_type, availability_zone, lifecycle} as far as metadata knows them; what it does not (404,
    an empty answer) is left out. No metadata at all: {} at the first failure, without trying the rest."""
    placement: dict[str, str] = {}
    for name, path in PLACEMENT_PATHS.items():
        try:
            value = metadata.get(path)
        except MetadataUnavailable:
            return placement
        except urllib.error.HTTPError:
            continue
        value = (value or "").strip()
        if value:
            placement[name] = value[:PLACEMENT_VALUE_CHARS]
    return placement


def resolve_worker_id(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(worker id, where it came from). Falls back to host name and pid when metadata is unavailable."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(WORKER_ID_ENV, "").strip()
    if explicit:
        return explicit, "env"
    base_url = imds_base_url(environ)
    if base_url is not None:
        try:
            instance_id = InstanceMetadata.from_environ(base_url, environ).get("meta-data/instance-id")
        except (MetadataUnavailable, urllib.error.HTTPError):
            instance_id = None
        if instance_id:
            return instance_id.strip(), "imds"
    return f"{socket.gethostname()}-{os.getpid()}", "hostname"
