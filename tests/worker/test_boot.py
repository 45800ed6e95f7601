"""ec2cluster_worker.boot: the instance's first program (standard library only), against the local cloud.

The local cloud runs with IAM enforced: every request boot.py signs is checked (signature, then the worker
role's policy) as AWS checks it, with the role's temporary credentials that a metadata service of the local
cloud's (IMDSv2) hands out, as on EC2. boot.py runs as the user data runs it: a copy of its source, in a
subprocess of the base interpreter without site-packages (so it can import nothing but the standard library),
in an environment without AWS credentials.
"""

from __future__ import annotations

import ast
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from decimal import Decimal
from pathlib import Path

import boto3
import botocore.auth
import pytest
from boto3.dynamodb.types import TypeSerializer
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from ec2cluster_localcloud import LocalCloud, images
from ec2cluster_localcloud.blackhole import Blackhole
from ec2cluster_localcloud.metadata import InstanceFacts, InstanceMetadataService
from ec2cluster_worker import boot, reachability, records
from ec2cluster_worker import status as worker_status

from ..localcloud.helpers import launch_instance, wait_for_log_line

BOOT_SOURCE = Path(boot.__file__)
REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = "ec2cluster-worker"
BUCKET = f"boot-bundles-{uuid.uuid4().hex[:8]}"
TABLE = f"boot-state-{uuid.uuid4().hex[:8]}"
RETENTION = 3600
# A key that needs URI-encoding: spaces, non-ASCII, a plus sign.
BUNDLE_KEY = "bundles/run 1/wörker+bundle.zip"
# The whole user data (boot.py, the worker configuration, the bash around them) must fit in EC2's 16 KB,
# gzip-compressed: boot.py may take half of it.
SOURCE_BUDGET_BYTES = 23 * 1024
GZIP_BUDGET_BYTES = 8 * 1024
# The base interpreter (not this virtual environment): with -S, boot.py sees the standard library only.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
WORKER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/bundles/*"},
        {
            "Effect": "Allow",
            "Action": ["dynamodb:PutItem"],
            "Resource": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{TABLE}",
        },
    ],
}


def bundle_zip(padding: int = 0) -> bytes:
    """A bundle as the launch builds one: the worker package, the user's code, the dependencies' tree."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ec2cluster_worker/__init__.py", "WHERE = 'the bundle'\n")
        archive.writestr("ec2cluster_worker/__main__.py", "print('worker')\n")
        archive.writestr("code/mytasks.py", "def hello():\n    return 'hello from code/'\n")
        archive.writestr("site/somedep/__init__.py", "VERSION = '1.2.3'\n")
        if padding:  # incompressible: a download of this many bytes
            archive.writestr(zipfile.ZipInfo("site/somedep/blob.bin"), os.urandom(padding))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with LocalCloud(work_dir=tmp_path_factory.mktemp("boot-cloud"), package_upstream=None) as started:
        started.client("s3").create_bucket(Bucket=BUCKET)
        started.client("dynamodb").create_table(TableName=TABLE, **records.STATE_TABLE_SCHEMA)
        started.set_worker_policy(WORKER_POLICY)
        yield started


class Instance:
    """What an instance has at boot: its metadata (IMDSv2, the worker role's credentials from STS)."""

    def __init__(self, cloud: LocalCloud, role: str | None = ROLE) -> None:
        self.cloud = cloud
        self.instance_id = "i-" + uuid.uuid4().hex[:17]
        self.cluster_id = "boot-" + uuid.uuid4().hex[:8]
        sts = cloud.client("sts")
        role_arn = f"arn:aws:iam::{ACCOUNT}:role/{role}" if role else None
        facts = InstanceFacts(
            instance_id=self.instance_id,
            instance_type="t3.micro",
            availability_zone=f"{REGION}a",
            region=REGION,
            image_id="ami-12345678",
            role_name=role,
            role_arn=role_arn,
        )
        self.metadata = InstanceMetadataService(
            facts,
            lambda facts: sts.assume_role(RoleArn=facts.role_arn, RoleSessionName=facts.instance_id)[
                "Credentials"
            ],
        )
        self.metadata_url = self.metadata.start()

    def env(self, **extra: str) -> dict[str, str]:
        """The user data's environment: no credentials, no region; the endpoint and metadata variables."""
        return {
            "PATH": os.environ["PATH"],
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.metadata_url,
            "AWS_ENDPOINT_URL": self.cloud.endpoint_url,
            **extra,
        }

    def status_item(self) -> dict | None:
        key = {"pk": {"S": records.workers_pk(self.cluster_id)}, "sk": {"S": self.instance_id}}
        answer = self.cloud.client("dynamodb").get_item(TableName=TABLE, Key=key, ConsistentRead=True)
        return answer.get("Item")


@pytest.fixture
def instance(cloud):
    started = Instance(cloud)
    yield started
    started.metadata.close()


def boot_json(instance: Instance, home: Path, data: bytes, s3: dict | None = None) -> dict:
    source = {"s3": s3 or {"bucket": BUCKET, "key": BUNDLE_KEY}}
    return {
        "region": REGION,
        "cluster_id": instance.cluster_id,
        "state_table": TABLE,
        "retention_seconds": RETENTION,
        "home": str(home),
        "bundle": {"sha256": sha256(data), "size": len(data), **source},
    }


def run_boot(
    tmp_path: Path, config: dict, env: dict, python: str = BASE_PYTHON
) -> subprocess.CompletedProcess:
    """boot.py as the user data runs it: a verbatim copy of its source, ``python3 boot.py boot.json``."""
    (tmp_path / "boot.py").write_text(BOOT_SOURCE.read_text())
    (tmp_path / "boot.json").write_text(json.dumps(config))
    return subprocess.run(
        [python, "-S", "boot.py", "boot.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def venv_python(home: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(home / "venv" / "bin" / "python"), "-c", code],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )


def failure_line(result: subprocess.CompletedProcess) -> str:
    """The one console line of a failed boot (there must be exactly one)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith(boot.CONSOLE_FAILURE_PREFIX)]
    assert len(lines) == 1, result.stderr
    return lines[0]


# The source: standard library only, Python 3.9, small


def test_the_source_runs_on_python_3_9_imports_the_standard_library_only_and_fits_in_user_data():
    source = BOOT_SOURCE.read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the user data carries the file alone"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        # Python 3.9 has neither match statements nor X | Y at run time (annotations are strings here).
        assert not isinstance(node, ast.Match)
    assert imported - {"__future__"} <= sys.stdlib_module_names
    assert "annotations" in {alias.name for node in tree.body[:3] for alias in getattr(node, "names", [])}
    size, compressed = len(source.encode()), len(gzip.compress(source.encode(), 9))
    assert size <= SOURCE_BUDGET_BYTES, f"{size} bytes of source, over {SOURCE_BUDGET_BYTES}"
    assert compressed <= GZIP_BUDGET_BYTES, f"{compressed} bytes gzip-compressed, over {GZIP_BUDGET_BYTES}"


def test_the_console_prefix_is_the_one_the_controller_reads():
    assert boot.CONSOLE_FAILURE_PREFIX == reachability.CONSOLE_FAILURE_PREFIX


def test_boot_config_reads_the_bundles_place_and_names_what_is_wrong():
    base = {"region": REGION, "cluster_id": "c", "state_table": "t", "retention_seconds": 60, "home": "/h"}
    digest = "ab" * 32
    config = boot.BootConfig.from_dict(
        {**base, "bundle": {"sha256": digest, "size": 3, "s3": {"bucket": "b", "key": "k"}}}
    )
    assert (config.s3, config.sha256, config.size) == ({"bucket": "b", "key": "k"}, digest, 3)
    for bundle in (
        {"sha256": digest, "size": 3},  # no place
        {"sha256": digest, "size": 3, "s3": {"bucket": "b"}},  # no key
        {"sha256": "../../etc", "size": 3, "s3": {"bucket": "b", "key": "k"}},  # not a SHA-256
    ):
        with pytest.raises(boot.BootError, match="invalid boot configuration"):
            boot.BootConfig.from_dict({**base, "bundle": bundle})
    with pytest.raises(boot.BootError, match="invalid boot configuration: KeyError: 'region'"):
        boot.BootConfig.from_dict({"bundle": {}})


# Signature Version 4: the same Authorization header as botocore's


CREDENTIALS = {
    "AccessKeyId": "ASIAEXAMPLEEXAMPLE01",
    "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "Token": "IQoJb3JpZ2luX2VjEXAMPLE//token+with/odd=chars",
}
WHEN = datetime.datetime(2024, 2, 29, 23, 59, 58)


def botocore_headers(monkeypatch, signer, service, method, url, headers, body, credentials) -> dict:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *args, **kwargs: WHEN)
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    keys = Credentials(credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials.get("Token"))
    signer(keys, service, REGION).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [True, False], ids=["temporary credentials", "an access key"])
@pytest.mark.parametrize(
    "url", ["https://dynamodb.us-east-1.amazonaws.com/", "http://127.0.0.1:5123/"], ids=["aws", "local"]
)
def test_dynamodb_requests_are_signed_as_botocore_signs_them(monkeypatch, token, url):
    credentials = CREDENTIALS if token else {k: v for k, v in CREDENTIALS.items() if k != "Token"}
    headers = {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "DynamoDB_20120810.PutItem"}
    body = json.dumps({"TableName": "t", "Item": {"pk": {"S": "C#ü  two spaces"}}}).encode()
    ours = boot.sign(
        "POST",
        url,
        region=REGION,
        service="dynamodb",
        credentials=credentials,
        headers=headers,
        body=body,
        now=WHEN,
    )
    theirs = botocore_headers(monkeypatch, SigV4Auth, "dynamodb", "POST", url, headers, body, credentials)
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Date"] == theirs["X-Amz-Date"] == "20240229T235958Z"
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token")
    assert "SignedHeaders=content-type;host;x-amz-date;" in ours["Authorization"]
    assert ours["Host"] == ("dynamodb.us-east-1.amazonaws.com" if "https" in url else "127.0.0.1:5123")


@pytest.mark.parametrize(
    "bucket,key,environ",
    [
        ("my-bucket", "bundles/my file ü+x~y (1).zip", {}),  # virtual-hosted, https
        ("my.dotted.bucket", "a  b/ü/worker.zip", {}),  # path-style on AWS
        ("my-bucket", "bundles/my file ü+x~y (1).zip", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:5123"}),
    ],
)
def test_s3_get_object_is_signed_as_botocore_signs_it(monkeypatch, bucket, key, environ):
    url = boot.s3_object_url(bucket, key, REGION, environ)
    ours = boot.sign("GET", url, region=REGION, service="s3", credentials=CREDENTIALS, now=WHEN)
    theirs = botocore_headers(monkeypatch, S3SigV4Auth, "s3", "GET", url, {}, b"", CREDENTIALS)
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Content-SHA256"] == theirs["X-Amz-Content-SHA256"] == hashlib.sha256(b"").hexdigest()
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," in ours["Authorization"]
    # A query string, sorted by name then value.
    url += "?versionId=v%2B1&partNumber=2&a=2&a=1"
    ours = boot.sign("GET", url, region=REGION, service="s3", credentials=CREDENTIALS, now=WHEN)
    theirs = botocore_headers(monkeypatch, S3SigV4Auth, "s3", "GET", url, {}, b"", CREDENTIALS)
    assert ours["Authorization"] == theirs["Authorization"]


# Endpoints: as botocore resolves them


ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_DYNAMODB")


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:4566"},
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:4566", "AWS_ENDPOINT_URL_DYNAMODB": "http://localhost:8000/"},
        {
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
            "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:8000",
        },
    ],
)
@pytest.mark.parametrize("region", ["eu-west-1", "cn-north-1", "us-gov-west-1"])
def test_endpoints_are_the_ones_botocore_resolves(monkeypatch, environ, region):
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    for service in ("dynamodb", "s3"):
        theirs = boto3.client(service, region_name=region).meta.endpoint_url
        assert boot.endpoint(service, region, environ) == theirs.rstrip("/")
        assert boot.endpoint(service, region) == theirs.rstrip("/")  # os.environ by default


def test_s3_us_east_1_is_its_regional_endpoint():
    # botocore still says s3.amazonaws.com (the legacy global endpoint); both serve us-east-1's buckets.
    assert boot.endpoint("s3", "us-east-1", {}) == "https://s3.us-east-1.amazonaws.com"


@pytest.mark.parametrize(
    "bucket,environ",
    [
        ("my-bucket", {}),  # https://my-bucket.s3.eu-west-1.amazonaws.com/...
        ("my.dotted.bucket", {}),  # no DNS label: https://s3.eu-west-1.amazonaws.com/my.dotted.bucket/...
        ("my-bucket", {"AWS_ENDPOINT_URL": "http://127.0.0.1:4566"}),  # path-style
    ],
)
def test_s3_object_urls_are_the_ones_botocore_requests(monkeypatch, bucket, environ):
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    key = "bundles/run 1/wörker+bundle~v1.zip"
    client = boto3.client("s3", region_name="eu-west-1")
    sent = []

    class Sent(Exception):
        pass

    def capture(request, **kwargs):
        sent.append(request.url)
        raise Sent

    client.meta.events.register("before-send.s3.GetObject", capture)
    with pytest.raises(Sent):
        client.get_object(Bucket=bucket, Key=key)
    assert boot.s3_object_url(bucket, key, "eu-west-1", environ) == sent[0]


# The status item: the worker's own, plus the step


def test_the_status_item_has_the_key_and_attributes_the_worker_writes():
    started, now = 1_700_000_000.1234, 1_700_000_012.98765
    ours = boot.status_item("c1", "i-0abc", "fetching bundle", started, now, RETENTION)
    snapshot = worker_status.WorkerStatus(started_at=started).snapshot()
    worker = worker_status.status_item(
        snapshot, cluster_id="c1", worker_id="i-0abc", now=now, retention_seconds=RETENTION
    )
    serializer = TypeSerializer()
    theirs = {name: serializer.serialize(value) for name, value in worker.items()}
    for name in ("pk", "sk", "worker_id", "cluster_id", "started_at", "heartbeat_at", "busy", "expires_at"):
        assert ours[name] == theirs[name], name
    for name in boot.COUNTERS:
        assert ours[name] == theirs[name] == {"N": "0"}
    assert ours["state"] == {"S": "booting"} and ours["step"] == {"S": "fetching bundle"}
    assert "stop_reason" not in ours
    stopped = boot.status_item("c1", "i-0abc", "fetching bundle", started, now, RETENTION, "stopped", "why")
    assert stopped["state"] == {"S": "stopped"} and stopped["stop_reason"] == {"S": "why"}


# Whole boots on the local cloud


def assert_booted(instance: Instance, home: Path, data: bytes, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    python = home / "venv" / "bin" / "python"
    assert result.stdout.splitlines()[-1] == f"ec2cluster: environment ready: {python}"
    bundle = home / "bundles" / sha256(data)
    pth = next((home / "venv" / "lib").glob(f"python3.*/site-packages/{boot.PTH_NAME}"))
    assert pth.read_text().splitlines() == [f"{bundle}/code", str(bundle), f"{bundle}/site"]
    assert not (home / "bundle.zip").exists() and not (home / "bundle.zip.part").exists()
    # The venv's python finds the worker package, the user's code and the dependencies in the bundle...
    probe = venv_python(
        home,
        "import json, sys, ec2cluster_worker, mytasks, somedep\n"
        "print(json.dumps([ec2cluster_worker.WHERE, ec2cluster_worker.__file__, mytasks.hello(), "
        "somedep.VERSION, sys.prefix]))",
    )
    assert probe.returncode == 0, probe.stderr
    where, worker_file, hello, version, prefix = json.loads(probe.stdout)
    assert (where, hello, version) == ("the bundle", "hello from code/", "1.2.3")
    assert worker_file == str(bundle / "ec2cluster_worker" / "__init__.py")
    assert prefix == str(home / "venv")
    # ...and none of this test environment's packages (nor the system's).
    for module in ("pytest", "boto3"):
        assert "ModuleNotFoundError" in venv_python(home, f"import {module}").stderr
    item = instance.status_item()
    assert item["state"] == {"S": "booting"} and item["step"] == {"S": "starting worker"}
    assert item["worker_id"] == {"S": instance.instance_id} and item["cluster_id"] == {
        "S": instance.cluster_id
    }
    assert item["busy"] == {"BOOL": False} and item["tasks_done"] == {"N": "0"}
    started, heartbeat = Decimal(item["started_at"]["N"]), Decimal(item["heartbeat_at"]["N"])
    assert started <= heartbeat <= Decimal(time.time())
    assert int(item["expires_at"]["N"]) == int(heartbeat) + RETENTION
    for step in ("fetching bundle", "unpacking bundle", "creating environment", "starting worker"):
        assert f"ec2cluster: boot: booting: {step}" in result.stderr


def test_a_boot_fetches_the_bundle_from_s3_and_makes_a_venv_of_its_own(cloud, instance, tmp_path):
    data = bundle_zip()
    cloud.client("s3").put_object(Bucket=BUCKET, Key=BUNDLE_KEY, Body=data)
    home = tmp_path / "home"
    result = run_boot(tmp_path, boot_json(instance, home, data), instance.env())
    assert_booted(instance, home, data, result)


def test_a_second_run_reuses_the_unpacked_bundle(cloud, instance, tmp_path):
    data = bundle_zip()
    key = f"bundles/{uuid.uuid4().hex}.zip"
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    home = tmp_path / "home"
    config = boot_json(instance, home, data, s3={"bucket": BUCKET, "key": key})
    assert_booted(instance, home, data, run_boot(tmp_path, config, instance.env()))
    unpacked = (home / "bundles" / sha256(data) / "code" / "mytasks.py").stat()
    # The object is gone: the second run (a reboot, a retry) does not fetch it again.
    cloud.client("s3").delete_object(Bucket=BUCKET, Key=key)
    result = run_boot(tmp_path, config, instance.env())
    assert result.returncode == 0, result.stderr
    assert "fetching bundle" not in result.stderr
    assert (home / "bundles" / sha256(data) / "code" / "mytasks.py").stat().st_ino == unpacked.st_ino
    assert venv_python(home, "import mytasks, ec2cluster_worker, somedep").returncode == 0
    assert instance.status_item()["step"] == {"S": "starting worker"}


def assert_stopped(instance: Instance, result: subprocess.CompletedProcess, reason: str, step: str) -> None:
    """One console line with ``reason`` (as the controller reads it back), and a stopped status item."""
    assert result.returncode == 1, result.stderr
    assert failure_line(result) == boot.CONSOLE_FAILURE_PREFIX + reason
    assert reachability.failure_from_console(result.stderr) == reason
    assert "environment ready" not in result.stdout
    item = instance.status_item()
    assert item["state"] == {"S": "stopped"} and item["step"] == {"S": step}
    assert item["stop_reason"] == {"S": worker_status.startup_failure_reason(reason)}
    assert instance.instance_id not in result.stderr.splitlines()[-1]


def test_a_bundle_with_another_sha256_is_refused(cloud, instance, tmp_path):
    data = bundle_zip()
    key = f"bundles/{uuid.uuid4().hex}.zip"
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data + b"tampered")
    home = tmp_path / "home"
    result = run_boot(
        tmp_path, boot_json(instance, home, data, s3={"bucket": BUCKET, "key": key}), instance.env()
    )
    assert_stopped(
        instance, result, "the worker bundle's SHA-256 differs from the launch's", "fetching bundle"
    )
    assert not (home / "bundles").exists() and not list(home.glob("bundle.zip*"))


def test_a_bundle_the_role_may_not_read_names_the_permission(cloud, instance, tmp_path):
    data = bundle_zip()
    key = f"elsewhere/{uuid.uuid4().hex}.zip"
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    result = run_boot(
        tmp_path,
        boot_json(instance, tmp_path / "home", data, s3={"bucket": BUCKET, "key": key}),
        instance.env(),
    )
    # The role session is named after the instance: the reason says <worker>, alike on every instance.
    reason = (
        f"cannot fetch the worker bundle s3://{BUCKET}/{key}: 403 AccessDenied: User: arn:aws:sts::{ACCOUNT}:"
        f"assumed-role/{ROLE}/<worker> is not authorized to perform: s3:GetObject on resource: "
        f"arn:aws:s3:::{BUCKET}/{key} because no identity-based policy allows the s3:GetObject action (the "
        "instance profile needs s3:GetObject on it)"
    )
    assert_stopped(instance, result, reason, "fetching bundle")


def test_an_unreachable_s3_fails_in_seconds_saying_what_route_is_missing(cloud, instance, tmp_path):
    data = bundle_zip()
    hole = Blackhole()  # connections to it time out, as to an address without a route
    try:
        started = time.monotonic()
        result = run_boot(
            tmp_path, boot_json(instance, tmp_path / "home", data), instance.env(AWS_ENDPOINT_URL_S3=hole.url)
        )
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert boot.CONNECT_TIMEOUT <= elapsed < boot.CONNECT_TIMEOUT + 10, elapsed
    target = f"127.0.0.1:{hole.port}"
    # Word for word what the worker's own reachability check says.
    reason = reachability.unreachable_reason({"s3": f"{target}: connection timed out after 5 s"})
    assert reason.startswith(
        f"cannot reach s3 ({target}): connection timed out after 5 s; this subnet needs a route"
    )
    assert_stopped(instance, result, reason, "fetching bundle")


def test_without_a_venv_module_the_boot_exits_4_and_a_second_run_completes_it(cloud, instance, tmp_path):
    """As on an image whose Python lacks the venv module: the script around boot.py may then install the
    distribution's venv package and run it again, which finds the bundle unpacked."""
    data = bundle_zip()
    key = f"bundles/{uuid.uuid4().hex}.zip"
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    home = tmp_path / "home"
    config = boot_json(instance, home, data, s3={"bucket": BUCKET, "key": key})
    no_venv = tmp_path / "venv.py"  # beside boot.py: first on its sys.path, before the standard library's
    no_venv.write_text("raise ImportError('No module named venv (no python3-venv)')\n")
    result = run_boot(tmp_path, config, instance.env())
    assert result.returncode == boot.EXIT_NO_VENV == 4
    reason = failure_line(result)[len(boot.CONSOLE_FAILURE_PREFIX) :]
    assert reason.startswith("cannot create a virtual environment with ")
    assert reason.endswith(
        ": ImportError: No module named venv (no python3-venv) (install the distribution's venv package: "
        "python3-venv)"
    )
    item = instance.status_item()
    assert item["state"] == {"S": "stopped"} and item["step"] == {"S": "creating environment"}
    assert item["stop_reason"] == {"S": f"startup-failed: {reason}"}
    no_venv.unlink()
    result = run_boot(tmp_path, config, instance.env())
    assert "fetching bundle" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert venv_python(home, "import mytasks, ec2cluster_worker, somedep").returncode == 0
    assert instance.status_item()["state"] == {"S": "booting"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_closed_s3_port_is_refused_at_once(cloud, instance, tmp_path):
    port = closed_port()
    env = instance.env(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
    result = run_boot(tmp_path, boot_json(instance, tmp_path / "home", bundle_zip()), env)
    reason = reachability.unreachable_reason({"s3": f"127.0.0.1:{port}: connection refused"})
    assert reason.endswith("nothing accepts connections at s3's address: check the endpoint URL")
    assert_stopped(instance, result, reason, "fetching bundle")


def test_an_unreachable_dynamodb_fails_before_anything_is_installed(cloud, instance, tmp_path):
    port = closed_port()
    env = instance.env(AWS_ENDPOINT_URL_DYNAMODB=f"http://127.0.0.1:{port}")
    home = tmp_path / "home"
    result = run_boot(tmp_path, boot_json(instance, home, bundle_zip()), env)
    assert result.returncode == 1
    reason = reachability.unreachable_reason({"dynamodb": f"127.0.0.1:{port}: connection refused"})
    assert failure_line(result) == boot.CONSOLE_FAILURE_PREFIX + reason
    assert "writing the status item" not in result.stderr  # no second try at an unreachable table
    assert not (home / "bundles").exists() and not (home / "venv").exists()


def test_an_instance_without_a_profile_says_so(cloud, tmp_path):
    instance = Instance(cloud, role=None)
    try:
        result = run_boot(tmp_path, boot_json(instance, tmp_path / "home", bundle_zip()), instance.env())
    finally:
        instance.metadata.close()
    assert result.returncode == 1
    assert failure_line(result) == (
        boot.CONSOLE_FAILURE_PREFIX
        + "no instance profile credentials in instance metadata (launch with an instance profile)"
    )
    assert instance.status_item() is None  # no credentials: nothing could be written


def test_without_metadata_the_boot_fails_after_a_few_tries(tmp_path):
    port = closed_port()
    config = {
        "region": REGION,
        "cluster_id": "c",
        "state_table": TABLE,
        "retention_seconds": 60,
        "home": str(tmp_path / "home"),
        "bundle": {"sha256": "0" * 64, "size": 1, "s3": {"bucket": "b", "key": "k"}},
    }
    env = {"PATH": os.environ["PATH"], "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{port}"}
    result = run_boot(tmp_path, config, env)
    assert result.returncode == 1
    line = failure_line(result)
    assert line.startswith(
        boot.CONSOLE_FAILURE_PREFIX
        + f"cannot reach the instance metadata service (http://127.0.0.1:{port}/latest/)"
    )
    assert "Connection refused" in line


def test_a_long_download_rewrites_the_status_item_as_it_goes(cloud, instance, tmp_path, monkeypatch):
    """In this process (to watch the status writes), with a progress period of 0 and small chunks."""
    data = bundle_zip(padding=3_000_000)
    key = f"bundles/{uuid.uuid4().hex}.zip"
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in instance.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boot, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(boot, "CHUNK_BYTES", 1_000_000)
    steps = []
    write = boot.Boot.status

    def status(self, step, *args, **kwargs):
        write(self, step, *args, **kwargs)
        steps.append((step, instance.status_item()["step"]["S"]))  # written: the table says so

    monkeypatch.setattr(boot.Boot, "status", status)
    home = tmp_path / "home"
    config = boot_json(instance, home, data, s3={"bucket": BUCKET, "key": key})
    (tmp_path / "boot.json").write_text(json.dumps(config))
    assert boot.main([str(tmp_path / "boot.json")]) == 0
    assert [written for step, written in steps] == [step for step, written in steps]
    assert [step for step, _ in steps] == [
        "fetching bundle",
        "fetching bundle (1 of 3 MB)",
        "fetching bundle (2 of 3 MB)",
        "fetching bundle (3 of 3 MB)",
        "fetching bundle (3 of 3 MB)",  # the zip's last few bytes
        "unpacking bundle",
        "creating environment",
        "starting worker",
    ]


def python39() -> str | None:
    """A Python 3.9 interpreter that runs (a pyenv shim may not), if this machine has one."""
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")), shutil.which("python3.9")]
    for candidate in filter(None, candidates):
        if subprocess.run([str(candidate), "-c", "pass"], capture_output=True).returncode == 0:
            return str(candidate)
    return None


@pytest.mark.skipif(python39() is None, reason="no Python 3.9 interpreter on this machine")
def test_a_boot_on_python_3_9(cloud, instance, tmp_path):
    """Amazon Linux 2023 and Debian 11 have Python 3.9: the whole boot on it, its venv a 3.9 one."""
    data = bundle_zip()
    cloud.client("s3").put_object(Bucket=BUCKET, Key=BUNDLE_KEY, Body=data)
    home = tmp_path / "home"
    result = run_boot(tmp_path, boot_json(instance, home, data), instance.env(), python=python39())
    assert_booted(instance, home, data, result)
    assert venv_python(home, "import sys; print(sys.version_info[:2])").stdout.strip() == "(3, 9)"


# On a Debian 12 image: python3.11 without pip, PEP 668, as root, metadata at 169.254.169.254

DEBIAN_USER_DATA = """#!/bin/bash
mkdir -p /opt/ec2cluster
cat > /opt/ec2cluster/boot.py <<'EC2CLUSTER_EOF'
@SOURCE@EC2CLUSTER_EOF
cat > /opt/ec2cluster/boot.json <<'EC2CLUSTER_EOF'
@CONFIG@
EC2CLUSTER_EOF
python3 /opt/ec2cluster/boot.py /opt/ec2cluster/boot.json
echo "boot-exit: $?"
/opt/ec2cluster/venv/bin/python -c 'import ec2cluster_worker, mytasks, somedep, sys; print("in:", sys.prefix)'
/opt/ec2cluster/venv/bin/python -c 'import pip' 2>&1 | tail -1
echo "user-data: done"
shutdown -h now
"""


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_boot_on_a_debian_12_image(cloud):
    try:
        image_id = cloud.register_rootfs_image("debian-12")
    except images.ImageError as error:
        pytest.skip(f"no Debian 12 image here: {error}")
    data = bundle_zip()
    key = f"bundles/{uuid.uuid4().hex}.zip"
    cloud.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data)
    cluster_id = "boot-" + uuid.uuid4().hex[:8]
    config = {
        "region": REGION,
        "cluster_id": cluster_id,
        "state_table": TABLE,
        "retention_seconds": RETENTION,
        "home": "/opt/ec2cluster",
        "bundle": {"sha256": sha256(data), "size": len(data), "s3": {"bucket": BUCKET, "key": key}},
    }
    user_data = DEBIAN_USER_DATA.replace("@SOURCE@", BOOT_SOURCE.read_text()).replace(
        "@CONFIG@", json.dumps(config)
    )
    instance_id = launch_instance(cloud, gzip.compress(user_data.encode()), image_id)
    console = wait_for_log_line(cloud, instance_id, "user-data: done", timeout=180)
    assert "boot-exit: 0" in console, console
    assert "ec2cluster: environment ready: /opt/ec2cluster/venv/bin/python" in console
    assert "in: /opt/ec2cluster/venv" in console
    assert "ModuleNotFoundError: No module named 'pip'" in console  # the venv has no pip: none needed
    key = {"pk": {"S": records.workers_pk(cluster_id)}, "sk": {"S": instance_id}}
    item = cloud.client("dynamodb").get_item(TableName=TABLE, Key=key, ConsistentRead=True)["Item"]
    assert item["state"] == {"S": "booting"} and item["step"] == {"S": "starting worker"}
