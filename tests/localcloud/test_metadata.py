"""The local cloud's instance metadata service: IMDSv2's rules, the role's credentials, injected notices."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud, cli
from ec2cluster_localcloud.metadata import (
    CREDENTIAL_SECONDS,
    RENEW_BEFORE_SECONDS,
    InstanceFacts,
    InstanceMetadataService,
    credentials_due,
    listing,
    token_ttl,
)

from .helpers import wait_for

FACTS = InstanceFacts(
    instance_id="i-0123456789abcdef0",
    instance_type="c7g.large",
    availability_zone="us-east-1a",
    region="us-east-1",
    image_id="ami-12345678",
    instance_profile_arn="arn:aws:iam::123456789012:instance-profile/ec2cluster-worker",
    instance_profile_id="AIPAEXAMPLE",
    role_name="ec2cluster-worker",
    role_arn="arn:aws:iam::123456789012:role/ec2cluster-worker",
)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def issuer(clock: Clock):
    issued: list[str] = []

    def issue(facts: InstanceFacts) -> dict:
        issued.append(facts.role_arn)
        n = len(issued)
        expiration = dt.datetime.fromtimestamp(clock() + CREDENTIAL_SECONDS, dt.timezone.utc)
        return {
            "AccessKeyId": f"ASIA{n:016d}",
            "SecretAccessKey": "s" * 40,
            "SessionToken": f"t{n}",
            "Expiration": expiration,
        }

    return issue, issued


def token(service: InstanceMetadataService, ttl: str = "60") -> str:
    status, body, headers = service.answer(
        "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    )
    assert status == 200 and headers == {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    return body


def get(service: InstanceMetadataService, path: str, session_token: str) -> tuple[int, str]:
    status, body, _ = service.answer(
        "GET", f"/latest/meta-data/{path}", {"X-aws-ec2-metadata-token": session_token}
    )
    return status, body


def test_imdsv2_rules():
    clock = Clock()
    issue, _ = issuer(clock)
    service = InstanceMetadataService(FACTS, issue, clock=clock)
    # Tokens: a TTL of 1..21600 s is required; a relayed request (X-Forwarded-For) gets none.
    for bad in (None, "0", "21601", "ten"):
        headers = {} if bad is None else {"X-aws-ec2-metadata-token-ttl-seconds": bad}
        assert service.answer("PUT", "/latest/api/token", headers)[0] == 400
    relayed = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.9"}
    assert service.answer("PUT", "/latest/api/token", relayed)[0] == 403
    # IMDSv1 (no token) and unknown tokens are refused; an expired token too.
    assert service.answer("GET", "/latest/meta-data/instance-id", {})[0] == 401
    assert get(service, "instance-id", "not-a-token")[0] == 401
    session = token(service, "60")
    assert get(service, "instance-id", session) == (200, FACTS.instance_id)
    assert get(service, "instance-type", session) == (200, "c7g.large")
    assert get(service, "instance-life-cycle", session) == (200, "on-demand")
    assert get(service, "placement/availability-zone", session) == (200, "us-east-1a")
    assert get(service, "placement/region", session) == (200, "us-east-1")
    assert get(service, "iam/security-credentials/", session) == (200, "ec2cluster-worker")
    assert get(service, "no/such/thing", session)[0] == 404
    clock.now += 61
    assert get(service, "instance-id", session)[0] == 401


def test_credentials_are_the_roles_and_renewed_before_they_expire():
    clock = Clock()
    issue, issued = issuer(clock)
    service = InstanceMetadataService(FACTS, issue, clock=clock)
    session = token(service, "21600")
    status, body = get(service, "iam/info", session)
    assert status == 200 and json.loads(body)["InstanceProfileArn"] == FACTS.instance_profile_arn
    first = json.loads(get(service, "iam/security-credentials/ec2cluster-worker", session)[1])
    assert first["Code"] == "Success" and first["Type"] == "AWS-HMAC" and first["Token"] == "t1"
    assert issued == [FACTS.role_arn]
    # The same credentials while they have more than RENEW_BEFORE_SECONDS left; fresh ones after.
    clock.now += CREDENTIAL_SECONDS - RENEW_BEFORE_SECONDS - 1
    assert json.loads(get(service, "iam/security-credentials/ec2cluster-worker", session)[1])["Token"] == "t1"
    clock.now += 2
    second = json.loads(get(service, "iam/security-credentials/ec2cluster-worker", session)[1])
    assert second["Token"] == "t2" and second["Expiration"] > first["Expiration"]
    assert len(issued) == 2


def test_no_instance_profile_means_no_credentials():
    clock = Clock()
    issue, issued = issuer(clock)
    bare = InstanceFacts(
        **{**FACTS.__dict__, "instance_profile_arn": None, "role_name": None, "role_arn": None}
    )
    service = InstanceMetadataService(bare, issue, clock=clock)
    session = token(service)
    assert get(service, "iam/info", session)[0] == 404
    assert get(service, "iam/security-credentials/", session)[0] == 404
    assert issued == []


def test_notices_are_404_until_injected():
    clock = Clock()
    service = InstanceMetadataService(FACTS, issuer(clock)[0], clock=clock)
    session = token(service)
    assert get(service, "spot/instance-action", session)[0] == 404
    assert get(service, "events/recommendations/rebalance", session)[0] == 404
    service.inject_spot_interruption(clock() + 120)
    service.inject_rebalance_recommendation()
    status, body = get(service, "spot/instance-action", session)
    assert status == 200 and json.loads(body) == {"action": "terminate", "time": "2027-01-15T08:02:00Z"}
    assert json.loads(get(service, "events/recommendations/rebalance", session)[1]) == {
        "noticeTime": "2027-01-15T08:00:00Z"
    }
    assert get(service, "spot/", session) == (200, "instance-action")


def test_pure_helpers():
    assert token_ttl("1") == 1 and token_ttl("21600") == 21600 and token_ttl("21601") is None
    assert listing(["a", "b/c", "b/d", "e/f/g"], "") == "a\nb/\ne/"
    assert listing(["a", "b/c"], "x/") is None
    expiration = dt.datetime.fromtimestamp(1000.0, dt.timezone.utc)
    assert credentials_due(None, 0, 60)
    assert not credentials_due({"Expiration": expiration}, 939.0, 60)
    assert credentials_due({"Expiration": expiration}, 941.0, 60)


# What an instance's user data sees: run as the instance, it writes a report into its home.
REPORT = r"""
import json, os, sys, time
import boto3
from ec2cluster_worker.identity import InstanceMetadata, imds_base_url, resolve_worker_id
session = boto3.session.Session()
credentials = session.get_credentials()
report = {
    "env": sorted(name for name in os.environ if name.startswith(("AWS_", "EC2CLUSTER_"))),
    "worker_id": resolve_worker_id(),
    "credential_method": credentials.method,
    "access_key_prefix": credentials.access_key[:4],
    "caller": boto3.client("sts", region_name="us-east-1").get_caller_identity()["Arn"],
}
home = os.environ["HOME"]
def publish(name, text):  # whole or not at all: the test reads it while this runs
    with open(f"{home}/{name}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{home}/{name}.tmp", f"{home}/{name}")
publish("report.json", json.dumps(report))
metadata = InstanceMetadata(imds_base_url(os.environ))
while metadata.get("meta-data/spot/instance-action") is None:
    time.sleep(0.2)
publish("notice.json", metadata.get("meta-data/spot/instance-action"))
while True:  # reclaimed by EC2 at the end of the notice
    time.sleep(0.2)
"""


def test_an_instance_finds_its_identity_and_role_credentials_in_metadata(tmp_path: Path):
    worker_src = Path(__file__).resolve().parents[2] / "worker"
    # The host is the image of a process-backed instance; this one's Python has boto3 (as a DLAMI's has).
    run = f"PYTHONPATH={worker_src} exec {shlex.quote(sys.executable)} report.py"
    script = f"cat > report.py <<'EOF'\n{REPORT}\nEOF\n{run}\n"
    with LocalCloud(work_dir=tmp_path, grace_seconds=5) as cloud:
        ec2 = cloud.client("ec2")
        instance_id = ec2.run_instances(
            ImageId=cloud.ami_id,
            MinCount=1,
            MaxCount=1,
            UserData=script,
            IamInstanceProfile={"Name": cloud.instance_profile_name},
        )["Instances"][0]["InstanceId"]
        home = tmp_path / "instances" / instance_id
        report = json.loads(wait_for(lambda: _read(home / "report.json"), 60, "the instance's report"))
        # Given only the metadata address and the routes to the endpoints (the stand-in for DNS, per
        # service as the network model decides): no id, credentials or region.
        assert report["env"] == [
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
            "AWS_ENDPOINT_URL_DYNAMODB",
            "AWS_ENDPOINT_URL_EC2",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL_SQS",
            "AWS_ENDPOINT_URL_STS",
            "EC2CLUSTER_CLOUD_DIR",
            "EC2CLUSTER_HOME",
        ]
        assert report["worker_id"] == [instance_id, "imds"]
        assert report["credential_method"] == "iam-role" and report["access_key_prefix"] == "ASIA"
        assert report["caller"].endswith(f":assumed-role/ec2cluster-worker/{instance_id}")

        # An unknown instance is refused by name; a notice reaches the instance, which is then reclaimed.
        control = ["--control-url", cloud.control_url]
        assert cli.main(["spot-interrupt", "i-00000000000000000", *control]) == 1
        assert cli.main(["spot-interrupt", instance_id, "--notice-seconds", "1", *control]) == 0
        notice = json.loads(
            wait_for(lambda: _read(home / "notice.json"), 60, "the notice to reach the instance")
        )
        assert notice["action"] == "terminate"
        wait_for(lambda: _state(ec2, instance_id) == "terminated", 60, "the instance to be reclaimed")
        wait_for(lambda: not cloud.worker_processes()[instance_id]["alive"], 60, "its processes to stop")
        assert cloud.worker_processes()[instance_id]["reclaimed"]
        with pytest.raises(KeyError):
            cloud.inject_rebalance_recommendation("i-00000000000000000")


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def _state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"][
        "Name"
    ]
