"""Image-backed instances (ec2cluster_localcloud.rootfs_instance): isolated roots of their own.

One local cloud, three instances of the Debian 12 AMI (its root filesystem built once by debootstrap and
cached, ~/.cache/ec2cluster-localcloud/images):

- a probe, with gzip-compressed user data as cloud-init takes it: it runs as root in its own root (Debian 12,
  python3 without pip, PEP 668's marker), its PID 1 is the instance's init, it sees neither the host's
  processes nor its files, its environment is cloud-init's plus the endpoint variables (no credentials, no
  region), it reaches its metadata at http://169.254.169.254/ (IMDSv2) and DynamoDB through its endpoint
  variable with the instance profile's credentials (a SigV4-signed ListTables, standard library only), then
  runs ``shutdown -h now``: the instance is terminated and nothing of it is left;
- a sleeper, terminated through EC2: its processes get SIGTERM (its trap writes into its root) and then
  nothing of it is left either;
- an instance in a security group without egress: its metadata answers, its DynamoDB endpoint (the
  blackhole, in its own network) times out; ``poweroff`` terminates it.
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud, images
from ec2cluster_localcloud.rootfs_instance import RootfsInstance, pids_in_namespace
from ec2cluster_localcloud.runner import SERVICE_ENDPOINT_VARIABLES

from .helpers import instance_left_behind, instance_log, launch_instance, wait_for, wait_for_log_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROBE = r"""#!/bin/bash
python3 - <<'PY'
import datetime, hashlib, hmac, json, os, socket, subprocess, urllib.parse, urllib.request

IMDS = "http://169.254.169.254/latest/"
ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
request = urllib.request.Request(IMDS + "api/token", method="PUT", headers=ttl)
token = urllib.request.urlopen(request, timeout=5).read()

def meta(path):
    request = urllib.request.Request(IMDS + "meta-data/" + path, headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(request, timeout=5).read().decode()

region = meta("placement/region")
role = meta("iam/security-credentials/").split()[0]
credentials = json.loads(meta("iam/security-credentials/" + role))

def sign(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()

endpoint = os.environ["AWS_ENDPOINT_URL_DYNAMODB"]
body = b"{}"
now = datetime.datetime.now(datetime.timezone.utc)
amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
headers = {
    "content-type": "application/x-amz-json-1.0",
    "host": urllib.parse.urlsplit(endpoint).netloc,
    "x-amz-date": amz_date,
    "x-amz-security-token": credentials["Token"],
    "x-amz-target": "DynamoDB_20120810.ListTables",
}
signed = ";".join(sorted(headers))
canonical = "\n".join(["POST", "/", "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed,
                       hashlib.sha256(body).hexdigest()])
scope = f"{day}/{region}/dynamodb/aws4_request"
to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
key = ("AWS4" + credentials["SecretAccessKey"]).encode()
for part in (day, region, "dynamodb", "aws4_request"):
    key = sign(key, part)
signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials['AccessKeyId']}/{scope}, "
                            f"SignedHeaders={signed}, Signature={signature}")
del headers["host"]
tables = json.loads(urllib.request.urlopen(
    urllib.request.Request(endpoint + "/", data=body, headers=headers, method="POST"), timeout=10).read())

pip = subprocess.run(["python3", "-m", "pip", "--version"], capture_output=True, text=True)
try:  # the local cloud's endpoint on the host's loopback: not there, in the instance's own network
    socket.create_connection(("127.0.0.1", HOST_PORT), timeout=2).close()
    host_loopback = "connected"
except OSError as error:
    host_loopback = type(error).__name__
print("probe:", json.dumps({
    "uid": os.getuid(),
    "debian_version": open("/etc/debian_version").read().strip(),
    "pip": pip.stderr.strip(),
    "externally_managed": os.path.exists("/usr/lib/python3.11/EXTERNALLY-MANAGED"),
    "pid1": open("/proc/1/cmdline").read().split("\0"),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "host_marker_seen": os.path.exists("HOST_MARKER"),
    "env": dict(os.environ),
    "instance_id": meta("instance-id"),
    "tables": tables.get("TableNames"),
    "host_loopback": host_loopback,
}), flush=True)
PY
shutdown -h now
"""
SLEEPER = """#!/bin/bash
trap 'echo term > /root/got-term; exit 0' TERM
echo "sleeper: up"
while true; do sleep 0.1; done
"""
# In a security group without egress: only its metadata answers; its endpoints are the blackhole.
CLOSED = r"""#!/bin/bash
python3 - <<'PY'
import json, os, socket, time, urllib.parse, urllib.request

token = urllib.request.urlopen(urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
    headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=5).read()
endpoint = urllib.parse.urlsplit(os.environ["AWS_ENDPOINT_URL_DYNAMODB"])
started = time.monotonic()
try:
    socket.create_connection((endpoint.hostname, endpoint.port), timeout=1.5).close()
    dynamodb = "connected"
except OSError as error:
    dynamodb = type(error).__name__
print("closed:", json.dumps({"token": bool(token), "dynamodb": dynamodb,
                             "waited": time.monotonic() - started}), flush=True)
PY
poweroff
"""
BASH_VARIABLES = {"PWD", "SHLVL", "_", "OLDPWD"}


def state(ec2, instance_id: str) -> str:
    answer = ec2.describe_instances(InstanceIds=[instance_id])
    return answer["Reservations"][0]["Instances"][0]["State"]["Name"]


def closed_group(ec2) -> str:
    """A security group of the default VPC with its egress rule removed."""
    group = ec2.create_security_group(GroupName="no-egress", Description="no egress")["GroupId"]
    ec2.revoke_security_group_egress(
        GroupId=group, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    return group


def nothing_left(image: dict) -> bool:
    """No process of the instance, none of this process in its namespaces, its overlay not on the host."""
    return not instance_left_behind(image)


def test_debian_12_instance_boots_isolated_and_powers_off(tmp_path: Path):
    host_marker = Path("/tmp") / f"ec2cluster-host-marker-{uuid.uuid4().hex}"
    host_marker.write_text("the host's\n")
    try:
        with LocalCloud(work_dir=tmp_path, grace_seconds=10, package_upstream=None) as cloud:
            started = time.monotonic()
            ami_id = cloud.register_rootfs_image("debian-12")
            print(f"image ready in {time.monotonic() - started:.1f} s")
            assert cloud.client("ec2").describe_images(ImageIds=[ami_id])["Images"][0]["Tags"] == [
                {"Key": "ec2cluster-localcloud:rootfs", "Value": "debian-12"}
            ]
            cloud.set_worker_policy(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "dynamodb:ListTables", "Resource": "*"}],
                }
            )
            cloud.client("dynamodb").create_table(
                TableName="seen-from-the-instance",
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
            ec2 = cloud.client("ec2")

            launched = time.monotonic()
            user_data = PROBE.replace("HOST_MARKER", str(host_marker))
            user_data = user_data.replace("HOST_PORT", str(urllib.parse.urlsplit(cloud.endpoint_url).port))
            probe = launch_instance(cloud, gzip.compress(user_data.encode()), ami_id)
            sleeper = launch_instance(cloud, SLEEPER, ami_id)
            text = wait_for_log_line(cloud, probe, "probe: ", timeout=60)
            print(f"probe's user data reported {time.monotonic() - launched:.1f} s after launch")
            report = json.loads(next(line for line in text.splitlines() if line.startswith("probe: "))[7:])

            # Its own root: Debian 12 as a bootstrap finds it, as root.
            assert report["uid"] == 0
            assert report["debian_version"].startswith("12.")
            assert "No module named pip" in report["pip"]
            assert report["externally_managed"]
            # Its own PID namespace, whose PID 1 is its init; none of the host's processes or files.
            assert report["pid1"][:2] == ["/bin/bash", "/usr/sbin/ec2cluster-init"]
            assert len(report["pids"]) < 15, report["pids"]
            assert not report["host_marker_seen"]
            # cloud-init's environment plus the endpoint variables: no credentials, no region.
            env = report["env"]
            expected = {"PATH", "HOME", "LANG", "AWS_ENDPOINT_URL", "PIP_INDEX_URL"}
            assert set(env) - BASH_VARIABLES == expected | set(SERVICE_ENDPOINT_VARIABLES.values())
            assert env["HOME"] == "/root"
            # Its metadata at the real address, and DynamoDB through its endpoint, as its role.
            assert report["instance_id"] == probe
            assert report["tables"] == ["seen-from-the-instance"]
            assert report["host_loopback"] == "ConnectionRefusedError"
            image = cloud.worker_processes()[probe]["image"]
            assert image["flavour"] == "debian-12" and image["pid_namespace"]

            # shutdown -h now: the instance is terminated and nothing of it is left.
            wait_for(lambda: state(ec2, probe) == "terminated", 30, "the probe to terminate")
            wait_for(lambda: nothing_left(image), 60, "nothing left of the probe")
            assert "ec2cluster-localcloud: power off" in instance_log(cloud, probe)

            # Terminated through EC2: SIGTERM reaches its processes, then nothing of it is left.
            wait_for_log_line(cloud, sleeper, "sleeper: up", timeout=60)
            sleeper_image = cloud.worker_processes()[sleeper]["image"]
            assert pids_in_namespace(sleeper_image["pid_namespace"], "pid")
            assert instance_left_behind(sleeper_image)  # its init, its overlay: the check sees a live one
            ec2.terminate_instances(InstanceIds=[sleeper])
            wait_for(lambda: not cloud.worker_processes()[sleeper]["alive"], 30, "the sleeper to end")
            wait_for(lambda: nothing_left(sleeper_image), 10, "nothing left of the sleeper")
            upper = Path(sleeper_image["root"]).parent / "upper"
            assert (upper / "root" / "got-term").read_text().strip() == "term"
            assert not cloud.worker_processes()[sleeper]["killed"]

            # No egress: its metadata answers, its endpoints time out; poweroff ends it too.
            closed = launch_instance(cloud, CLOSED, ami_id, SecurityGroupIds=[closed_group(ec2)])
            text = wait_for_log_line(cloud, closed, "closed: ", timeout=60)
            report = json.loads(next(line for line in text.splitlines() if line.startswith("closed: "))[8:])
            assert report["token"] and report["dynamodb"] == "TimeoutError", report
            assert report["waited"] >= 1.4
            closed_image = cloud.worker_processes()[closed]["image"]
            wait_for(lambda: state(ec2, closed) == "terminated", 30, "the closed instance to terminate")
            wait_for(lambda: nothing_left(closed_image), 10, "nothing left of the closed instance")
    finally:
        host_marker.unlink()


def test_building_an_image_without_debootstrap_names_the_missing_tool(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images, "find_tool", lambda name: None)
    with pytest.raises(images.ImageError, match="apt-get install debootstrap"):
        images.ensure_rootfs("debian-12", cache_dir=tmp_path)
    with pytest.raises(images.ImageError, match="unknown image flavour"):
        images.ensure_rootfs("windows-2022", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / ".debian-12.lock"]  # no half-built image left


def test_a_failed_boot_is_on_the_console_and_powers_the_instance_off(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(RootfsInstance, "_launcher", lambda self, ready: "echo 'no root here' >&2; exit 3\n")
    with LocalCloud(work_dir=tmp_path, grace_seconds=10, package_upstream=None) as cloud:
        ami_id = cloud.register_rootfs_image("debian-12")
        instance_id = launch_instance(cloud, "#!/bin/bash\necho never\n", ami_id)
        ec2 = cloud.client("ec2")
        wait_for(lambda: state(ec2, instance_id) == "terminated", 30, "the instance to terminate")
        console = instance_log(cloud, instance_id)
        assert "no root here" in console and "ec2cluster-localcloud: boot failed" in console
        assert "never" not in console
