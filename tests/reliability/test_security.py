"""Security: no credential leaks anywhere, hardened instances and queues, no shell for message text."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
from pathlib import Path

import boto3
import pytest
from ec2cluster_worker.handlers import CommandHandler, TaskContext

from airflow_ec2cluster.userdata import ACCESS_KEY_RE, parse_user_data

from .harness import HANDLERS_MODULE, Job

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_no_credential_in_user_data_logs_xcom_or_task_log(cloud_env, caplog):
    # The controller's access key (an IAM user's: the local cloud enforces IAM) must appear nowhere.
    key_id = cloud_env.controller_credentials["AccessKeyId"]
    secret = cloud_env.controller_credentials["SecretAccessKey"]
    assert json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])["login"] == key_id
    caplog.set_level("DEBUG", logger="airflow")
    job = Job(cloud_env, "secret")
    job.enqueue([{"n": n} for n in range(50)])
    job.launch(2, "handlers:double")
    job.drain(timeout=60)
    job.teardown()
    job.assert_nothing_left()

    ec2 = cloud_env.client("ec2")
    places = {}
    for iid in job.instance_ids():
        encoded = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"]
        places[f"user data of {iid}"] = parse_user_data(base64.b64decode(encoded))
        places[f"log of {iid}"] = (Path(cloud_env.work_dir) / "logs" / f"{iid}.log").read_text()
    places["xcom"] = json.dumps({"returned": job.xcom, "pushed": job.ti.pushed}, default=str)
    places["task log"] = json.dumps(job.results(), default=str)
    places["airflow logs"] = caplog.text
    assert len(places) >= 7
    for where, text in places.items():
        assert not ACCESS_KEY_RE.search(text), f"an access key id in the {where}"
        assert key_id not in text and secret not in text, f"the controller's key in the {where}"


def test_instances_and_queues_are_hardened(aws_job):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    reservations = ec2.describe_instances()["Reservations"]
    launched = [i for r in reservations for i in r["Instances"]]
    assert launched
    for instance in launched:
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        # Public mode (the default, for a default VPC): a public IP, in the cluster's own group, which
        # admits nothing inbound.
        groups = [g["GroupId"] for g in instance["NetworkInterfaces"][0]["Groups"]]
        assert groups
        described = ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]
        assert [g["GroupName"] for g in described] == [f"ec2cluster-{instance_cluster(instance)}"]
        assert all(g["IpPermissions"] == [] for g in described)
        # moto does not echo IamInstanceProfile back; the launch template carries it (below).
    from airflow_ec2cluster.aws.fleet import launch_template_data
    from airflow_ec2cluster.cluster import LaunchSpec

    spec = LaunchSpec(
        image_id="ami-1", instance_type="t3.micro", user_data_b64="", root_device_name="/dev/xvda"
    )
    params = launch_template_data("c", spec)
    assert params["IamInstanceProfile"] == {"Name": "ec2cluster-worker"}
    assert params["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False
    assert params["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True
    volumes = ec2.describe_volumes()["Volumes"]
    assert volumes and all(volume["Encrypted"] for volume in volumes)
    sqs = boto3.client("sqs", region_name="us-east-1")
    for url in sqs.list_queues()["QueueUrls"]:
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["SqsManagedSseEnabled"])
        assert attributes["Attributes"]["SqsManagedSseEnabled"] == "true", url


def instance_cluster(instance: dict) -> str:
    return next(t["Value"] for t in instance["Tags"] if t["Key"] == "ec2cluster:cluster-id")


@pytest.fixture
def aws_job(monkeypatch):
    from ec2cluster_localcloud.server import make_ec2_like_aws
    from moto import mock_aws

    from airflow_ec2cluster.operators import EC2ClusterEnqueueOperator, EC2ClusterLaunchOperator

    from .harness import TaskInstance

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    make_ec2_like_aws()  # AWS's EC2 behaviours, a default VPC's internet gateway among them
    with mock_aws():
        boto3.client("iam", region_name="us-east-1").create_instance_profile(
            InstanceProfileName="ec2cluster-worker"
        )
        ti = TaskInstance("reliability", "manual__hardened")
        context = {"ti": ti, "run_id": ti.run_id}
        common = {"cluster_id": "hardened", "aws_conn_id": None, "region_name": "us-east-1"}
        EC2ClusterEnqueueOperator(task_id="enqueue", tasks=[1, 2], **common).execute(context)
        EC2ClusterLaunchOperator(
            task_id="launch",
            num_workers=2,
            image_id="ami-03cf127a",
            instance_type="t3.micro",
            handler={"type": "python", "target": "handlers:double"},
            code=[str(HANDLERS_MODULE)],
            **common,
        ).execute(context)
        yield


HOSTILE_PAYLOADS = [
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "' ; touch {marker}; '",
    '"; touch {marker}; echo "',
    "| touch {marker}",
    "&& touch {marker}\n",
]


@pytest.mark.parametrize("mode", ["argv", "stdin"])
def test_message_text_never_reaches_a_shell(tmp_path, mode):
    marker = tmp_path / "pwned"
    argv = ("python3", "-c", "import sys; print(sys.stdin.read() if len(sys.argv) < 2 else sys.argv[1])")
    handler = CommandHandler(argv + (("{payload}",) if mode == "argv" else ()), mode)
    context = TaskContext("t1", 1, "w", "c")
    for template in HOSTILE_PAYLOADS:
        payload = {"text": template.format(marker=marker)}
        assert handler(payload, context, 10) == payload  # the command got the JSON intact
        assert not marker.exists()


def test_the_worker_has_no_shell_eval_or_exec():
    forbidden = {"eval", "exec", "system", "popen", "getoutput", "getstatusoutput"}
    offenders = []
    for path in sorted((REPO_ROOT / "worker" / "ec2cluster_worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                shell = any(
                    k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                    for k in node.keywords
                )
                if name in forbidden or shell:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    assert re.search(r"PAYLOAD_PLACEHOLDER", (REPO_ROOT / "worker/ec2cluster_worker/handlers.py").read_text())
