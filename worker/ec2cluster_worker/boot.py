"""ec2cluster boot: an instance's first program (its user data runs ``python3 boot.py <boot.json>`` as root).

It fetches the cluster's bundle from S3 (the instance profile's credentials), checks its SHA-256,
unpacks it into <home>/bundles/<sha256> and makes <home>/venv, which sees it and not the system's packages.
A "booting" status item at each step shows the controller signs of life. Exit 0: the last stdout line names
the venv's python; 1: one stderr line "ec2cluster: startup-failed: <why>" (and a "stopped" status item); 4:
no venv (install python3-venv, run it again). Standard library only, Python 3.9+, one file: stock images
have no pip or boto3 (Debian 12) or an old Python (Amazon Linux 2023), and the user data carries it verbatim.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

CONSOLE_FAILURE_PREFIX = "ec2cluster: startup-failed: "  # = ec2cluster_worker.reachability's
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 60.0  # without a route, fail in seconds; botocore's read timeout
PROGRESS_SECONDS, CHUNK_BYTES = 10.0, 1 << 20
EXIT_NO_VENV = 4
PTH_NAME = "ec2cluster-bundle.pth"
COUNTERS = ("tasks_done", "tasks_failed", "messages_done", "messages_failed")


class BootError(Exception):
    """A start-up failure. ``service``: the one no connection opened to; ``status``: AWS's HTTP status."""

    def __init__(self, reason: str, exit_code: int = 1, service: str = "", status: int = 0):
        super().__init__(reason)
        self.exit_code, self.service, self.status = exit_code, service, status


@dataclass(frozen=True)
class BootConfig:
    """boot.json: {"region", "cluster_id", "state_table", "retention_seconds", "home" (default: boot.json's
    directory), "bundle": {"sha256", "size", "s3": {"bucket", "key"}}}."""

    region: str
    cluster_id: str
    state_table: str
    retention_seconds: int
    home: str
    sha256: str
    size: int
    s3: dict

    @classmethod
    def from_dict(cls, data: dict) -> BootConfig:
        try:
            b = data["bundle"]
            names = ("region", "cluster_id", "state_table", "retention_seconds", "home")
            region, cluster, table, retention, home = (data[name] for name in names)
            s3 = {"bucket": str(b["s3"]["bucket"]), "key": str(b["s3"]["key"])}
            config = cls(region, cluster, table, int(retention), home, str(b["sha256"]), int(b["size"]), s3)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise BootError(f"invalid boot configuration: {type(error).__name__}: {error}") from None
        if not re.fullmatch("[0-9a-f]{64}", config.sha256):  # a directory's name
            raise BootError('invalid boot configuration: its bundle needs a "sha256" of 64 hex digits')
        return config


def endpoint(service: str, region: str, environ=None) -> str:
    """As botocore resolves it: AWS_ENDPOINT_URL_<SERVICE>, else AWS_ENDPOINT_URL, else AWS's."""
    env = os.environ if environ is None else environ
    url = env.get("AWS_ENDPOINT_URL_" + service.upper()) or env.get("AWS_ENDPOINT_URL")
    aws = f"https://{service}.{region}.amazonaws.com" + (".cn" if region.startswith("cn-") else "")
    return url.rstrip("/") if url else aws


def s3_object_url(bucket: str, key: str, region: str, environ=None) -> str:
    """Virtual-hosted on AWS (unless the bucket is no DNS label), path-style on a custom endpoint."""
    base, path = endpoint("s3", region, environ), "/" + quote(key, safe="/~")
    if base == endpoint("s3", region, {}) and re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket):
        return base.replace("://", f"://{bucket}.", 1) + path
    return f"{base}/{quote(bucket, safe='')}{path}"


def canonical_request(method: str, url: str, headers: dict, payload_hash: str, service: str) -> tuple:
    """(canonical request, signed header names), as AWS documents them."""
    parts = urlsplit(url)
    path = parts.path or "/"
    if service != "s3":  # S3 signs the path as sent (encoded once); the others encode it again
        path = quote(path, safe="/~")
    query = "&".join("=".join(p) for p in sorted(q.partition("=")[::2] for q in parts.query.split("&") if q))
    signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items() if k.lower() != "user-agent"}
    names = ";".join(sorted(signed))
    lines = "".join(f"{name}:{signed[name]}\n" for name in sorted(signed))
    return "\n".join([method, path, query, lines, names, payload_hash]), names


def sign(method, url, *, region, service, credentials, headers=None, body=b"", now=None) -> dict:
    """Signature Version 4: ``headers`` plus Host, X-Amz-Date, X-Amz-Security-Token, X-Amz-Content-SHA256
    (S3) and Authorization. ``credentials``: AccessKeyId, SecretAccessKey, Token (as metadata has them)."""
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    payload_hash, parts = hashlib.sha256(body).hexdigest(), urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in str(parts.hostname) else str(parts.hostname)
    if parts.port not in (None, {"http": 80, "https": 443}[parts.scheme]):
        host += f":{parts.port}"
    signed = {"Host": host, **(headers or {}), "X-Amz-Date": stamp}
    if credentials.get("Token"):
        signed["X-Amz-Security-Token"] = credentials["Token"]
    if service == "s3":
        signed["X-Amz-Content-SHA256"] = payload_hash
    canonical, names = canonical_request(method, url, signed, payload_hash, service)
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    key = ("AWS4" + credentials["SecretAccessKey"]).encode()
    text = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    for part in (stamp[:8], region, service, "aws4_request", text):  # the signing key, then the signature
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signed["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials['AccessKeyId']}/{scope}, "
        f"SignedHeaders={names}, Signature={key.hex()}"
    )
    return signed


def unreachable_reason(service: str, target: str, what: str) -> str:
    """Cause and fix, as ec2cluster_worker.reachability words them."""
    reason = f"cannot reach {service} ({target}): {what}"
    if any(marker in what for marker in ("timed out", "unreachable", "no route")):
        return reason + (
            f"; this subnet needs a route to it: a NAT gateway, a VPC endpoint for {service}, or a public IP "
            f"with an internet gateway (and security groups that allow outbound TCP {target.split(':')[-1]})"
        )
    if "not resolved" in what:
        return reason + (
            f"; the name of {service} does not resolve: check the endpoint URL and the VPC's DNS "
            "(enableDnsSupport; private DNS on an interface endpoint)"
        )
    if "refused" in what:
        return reason + f"; nothing accepts connections at {service}'s address: check the endpoint URL"
    return reason


def aws_request(service, method, url, *, region, credentials, headers=None, body=b"", tries=3):
    """A signed request's 2xx response (body unread). Server errors, throttling and broken connections are
    tried again, as botocore does; a connection that does not open is not (no proxy)."""
    parts = urlsplit(url)
    host, port = str(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80)
    for attempt in range(1, tries + 1):
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(host, port, timeout=CONNECT_TIMEOUT)
        try:
            connection.connect()
        except socket.timeout:  # noqa: UP041 (not TimeoutError on Python 3.9)
            what = f"connection timed out after {CONNECT_TIMEOUT:g} s"
        except ConnectionRefusedError:
            what = "connection refused"
        except socket.gaierror:
            what = "name not resolved"
        except OSError as error:
            what = (error.strerror or str(error) or type(error).__name__).lower()
        else:
            what = ""
        if what:
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise BootError(unreachable_reason(service, target, what), service=service)
        connection.sock.settimeout(READ_TIMEOUT)
        signed = sign(
            method, url, region=region, service=service, credentials=credentials, headers=headers, body=body
        )
        try:
            connection.request(
                method, url[len(f"{parts.scheme}://{parts.netloc}") :] or "/", body or None, signed
            )
            response = connection.getresponse()
            if response.status < 300:
                return response
            error = aws_error(response.status, response.read())
            retry = response.status >= 500 or "Throttl" in str(error) or "Exceeded" in str(error)
        except (OSError, http.client.HTTPException) as problem:  # broken: tried again; no answer: not
            error = BootError(f"{service} ({parts.netloc}) did not answer: {problem!r}")
            retry = not isinstance(problem, socket.timeout)  # noqa: UP041
        connection.close()
        if not retry or attempt == tries:
            raise error
        time.sleep(attempt)


def aws_error(status: int, body: bytes) -> BootError:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        code, message = data.get("__type", "").split("#")[-1], data.get("message") or data.get("Message")
    except ValueError:
        found = (re.search(f"<{tag}>(.*?)</{tag}>", text, re.S) for tag in ("Code", "Message"))
        code, message = (match.group(1) if match else "" for match in found)
    code = code or http.client.responses.get(status, "Error")
    return BootError(f"{status} {code}: {message}" if message else f"{status} {code}", status=status)


class Metadata:
    """Instance metadata, IMDSv2 (a session token, then GETs with it), never through a proxy."""

    def __init__(self) -> None:
        base = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254/"
        self.base, self.token, self.cached = base.rstrip("/") + "/latest/", "", {}
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(self, path: str) -> str | None:
        """latest/<path>'s text (api/token: a new token), None for a 404."""
        # An instance's first seconds can be slow to answer, and no botocore is here to try again: 5 tries.
        put = path == "api/token"
        for attempt in range(5):
            time.sleep(attempt / 2)
            if not (put or self.token):
                self.token = self.fetch("api/token") or ""
            headers = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"} if put else {}
            headers["X-aws-ec2-metadata-token"] = self.token
            request = urllib.request.Request(
                self.base + path, method="PUT" if put else "GET", headers=headers
            )
            try:
                with self.opener.open(request, timeout=2) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code < 500 and error.code not in (401, 429):  # 401: the token expired
                    raise BootError(f"instance metadata answered {error.code} to {path}") from None
                self.token, problem = "", f"HTTP {error.code}"
            except (OSError, http.client.HTTPException) as error:
                problem = str(getattr(error, "reason", error))
        raise BootError(f"cannot reach the instance metadata service ({self.base}): {problem}")

    def credentials(self) -> dict:
        """The instance profile's credentials (fetched again 5 minutes before they expire)."""
        expires = self.cached.get("Expiration", "2000-01-01T00:00:00Z").replace("Z", "+00:00")
        if datetime.datetime.fromisoformat(expires).timestamp() - time.time() > 300:
            return self.cached
        roles = (self.fetch("meta-data/iam/security-credentials/") or "").split()
        data = (
            json.loads(self.fetch(f"meta-data/iam/security-credentials/{roles[0]}") or "{}") if roles else {}
        )
        if not data.get("AccessKeyId"):
            code = f" ({data['Code']})" if data.get("Code") else ""
            raise BootError(
                f"no instance profile credentials in instance metadata{code} (launch with an instance "
                "profile)"
            )
        self.cached = data
        return data


def status_item(cluster_id, worker_id, step, started_at, now, retention_seconds, state="booting", reason=""):
    """A booting worker's status item (DynamoDB JSON), with the key and attributes of the worker's own
    (ec2cluster_worker.status.status_item), which overwrites it once the worker runs."""
    item = {"pk": {"S": f"C#{cluster_id}#W"}, "sk": {"S": worker_id}, "worker_id": {"S": worker_id}}
    item.update(cluster_id={"S": cluster_id}, state={"S": state}, step={"S": step}, busy={"BOOL": False})
    item.update(started_at={"N": str(round(started_at, 3))}, heartbeat_at={"N": str(round(now, 3))})
    item.update({name: {"N": "0"} for name in COUNTERS}, expires_at={"N": str(int(now) + retention_seconds)})
    if reason:
        item["stop_reason"] = {"S": reason}
    return item


def log(text: str) -> None:
    # The time (epoch seconds) last: the console's "ec2cluster: boot: booting: <step>" stays searchable, and
    # a boot's phases can be timed from the console alone (benchmarks/boot.py).
    print(f"ec2cluster: boot: {text} (t={time.time():.3f})", file=sys.stderr, flush=True)


class Boot:
    """One boot: its steps (run), each announced by a status item (status)."""

    def __init__(self, config: BootConfig, started_at: float) -> None:
        self.config, self.started_at, self.metadata = config, started_at, Metadata()
        self.instance_id, self.step = "", "starting"

    def call(self, service: str, method: str, url: str, headers=None, body=b"") -> http.client.HTTPResponse:
        credentials = self.metadata.credentials()
        return aws_request(
            service,
            method,
            url,
            region=self.config.region,
            credentials=credentials,
            headers=headers,
            body=body,
        )

    def dynamodb(self, action: str, payload: dict) -> dict:
        url, body = endpoint("dynamodb", self.config.region) + "/", json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": f"DynamoDB_20120810.{action}",
        }
        return json.loads(self.call("dynamodb", "POST", url, headers, body).read())

    def status(self, step: str, state: str = "booting", reason: str = "") -> None:
        """Write the status item. An error answer is logged; no connection to DynamoDB fails the boot."""
        self.step, c = step, self.config
        log(f"{state}: {step}")
        now, retention = time.time(), c.retention_seconds
        item = status_item(
            c.cluster_id, self.instance_id, step, self.started_at, now, retention, state, reason
        )
        try:
            self.dynamodb("PutItem", {"TableName": c.state_table, "Item": item})
        except BootError as error:
            if error.service:
                raise
            log(f"writing the status item failed: {error}")

    def run(self) -> Path:
        home = Path(self.config.home).absolute()
        home.mkdir(parents=True, exist_ok=True)
        self.instance_id = (self.metadata.fetch("meta-data/instance-id") or "").strip()
        if not self.instance_id:
            raise BootError("no instance-id in instance metadata")
        self.metadata.credentials()
        bundle = home / "bundles" / self.config.sha256
        if not bundle.is_dir():  # else unpacked by an earlier run (a reboot): complete (see unpack), reused
            self.status("fetching bundle")
            archive = self.fetch_bundle(home / "bundle.zip.part")
            self.status("unpacking bundle")
            unpack(archive, bundle)
            archive.unlink()
        self.status("creating environment")
        python = make_venv(home / "venv", bundle)
        self.status("starting worker")
        return python

    def fetch_bundle(self, part: Path) -> Path:
        c, digest = self.config, hashlib.sha256()
        where = f"s3://{c.s3['bucket']}/{c.s3['key']}"
        try:
            with open(part, "wb") as out:
                for chunk in self.download():
                    out.write(chunk)
                    digest.update(chunk)
        except BootError as error:
            if error.service:
                raise
            hint = " (the instance profile needs s3:GetObject on it)" if "AccessDenied" in str(error) else ""
            raise BootError(f"cannot fetch the worker bundle {where}: {error}{hint}") from None
        except (OSError, http.client.HTTPException) as error:
            raise BootError(f"cannot fetch the worker bundle {where}: {error!r}") from None
        if digest.hexdigest() != c.sha256:
            part.unlink()
            raise BootError("the worker bundle's SHA-256 differs from the launch's")
        return part.replace(part.with_suffix(""))

    def download(self):
        # Signs of life during a long download, not too many: a status item every PROGRESS_SECONDS.
        c = self.config
        response = self.call("s3", "GET", s3_object_url(c.s3["bucket"], c.s3["key"], c.region))
        total, done, reported = int(response.getheader("Content-Length") or c.size), 0, time.monotonic()
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
            yield chunk
            done += len(chunk)
            if time.monotonic() - reported >= PROGRESS_SECONDS:
                self.status(f"fetching bundle ({done / 1e6:.0f} of {total / 1e6:.0f} MB)")
                reported = time.monotonic()


def unpack(archive: Path, target: Path) -> None:
    """Extract into a new directory beside ``target``, then rename it: ``target`` exists only complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".unpack-", dir=target.parent)
    try:
        os.chmod(temporary, 0o755)
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(temporary)
        os.rename(temporary, target)
    except OSError:
        if not target.is_dir():  # else another run unpacked it first
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def make_venv(env_dir: Path, bundle: Path) -> Path:
    """A venv of this interpreter, without pip or the system's packages, seeing the bundle: its code/, the
    bundle itself (the ec2cluster_worker package) and site/ (the dependencies), in this order."""
    try:
        import venv

        venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True, symlinks=True).create(env_dir)
        python = env_dir / "bin" / "python"
        purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
        site = subprocess.run([str(python), "-I", "-c", purelib], capture_output=True, text=True, timeout=60)
        if site.returncode or not site.stdout.strip():
            raise OSError(site.stderr.strip()[-300:] or "its python does not run")
        Path(site.stdout.strip(), PTH_NAME).write_text(f"{bundle}/code\n{bundle}\n{bundle}/site\n")
    except Exception as error:  # no venv module, or a broken one
        raise BootError(
            f"cannot create a virtual environment with {sys.executable}: {type(error).__name__}: {error} "
            "(install the distribution's venv package: python3-venv)",
            EXIT_NO_VENV,
        ) from None
    return python


def fail(boot: Boot | None, error: BootError) -> int:
    reason = " | ".join(line.strip() for line in str(error).strip().splitlines()) or type(error).__name__
    if boot and boot.instance_id:  # workers failing alike say the same
        reason = reason.replace(boot.instance_id, "<worker>")
    print(CONSOLE_FAILURE_PREFIX + reason, file=sys.stderr, flush=True)
    if boot and boot.metadata.cached and error.service != "dynamodb":
        try:
            boot.status(boot.step, "stopped", f"startup-failed: {reason}"[:1000])
        except Exception as problem:  # the console line is out: that is what matters
            log(f"writing the status item failed: {problem}")
    return error.exit_code


def main(argv: list[str] | None = None) -> int:
    started_at, argv, boot = time.time(), sys.argv[1:] if argv is None else argv, None
    try:
        if len(argv) != 1:
            raise BootError("usage: boot.py <boot.json>")
        try:
            data = {"home": str(Path(argv[0]).absolute().parent), **json.loads(Path(argv[0]).read_text())}
        except (OSError, ValueError) as error:
            raise BootError(f"cannot read the boot configuration {argv[0]}: {error}") from None
        boot = Boot(BootConfig.from_dict(data), started_at)
        python = boot.run()
    except BootError as error:
        return fail(boot, error)
    except Exception as error:  # unforeseen: still one console line
        return fail(boot, BootError(f"{type(error).__name__}: {error}"))
    print(f"ec2cluster: environment ready: {python}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
