"""The local cloud's server handles EC2 requests one at a time (moto's EC2 backend is not thread-safe)."""

from __future__ import annotations

import threading

from ec2cluster_localcloud.server import serialised, signed_service

EC2_HEADER = "AWS4-HMAC-SHA256 Credential=testing/20261124/us-east-1/ec2/aws4_request, SignedHeaders=host"
SQS_HEADER = EC2_HEADER.replace("/ec2/", "/sqs/")


def test_signed_service_reads_the_credential_scope():
    assert signed_service({"HTTP_AUTHORIZATION": EC2_HEADER}) == "ec2"
    assert signed_service({"HTTP_AUTHORIZATION": SQS_HEADER}) == "sqs"
    assert signed_service({}) is None


def test_only_the_named_services_run_under_the_lock():
    lock = threading.Lock()

    def app(environ, start_response):
        return [b"locked" if lock.locked() else b"free"]

    wrapped = serialised(app, ("ec2",), lock)
    assert wrapped({"HTTP_AUTHORIZATION": EC2_HEADER}, None) == [b"locked"]
    assert wrapped({"HTTP_AUTHORIZATION": SQS_HEADER}, None) == [b"free"]
    assert not lock.locked()


def test_terminating_a_terminated_instance_succeeds_as_on_aws(monkeypatch):
    import boto3
    from ec2cluster_localcloud.server import make_terminate_idempotent
    from moto import mock_aws
    from moto.ec2.models.instances import Instance

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(Instance, "terminate", Instance.terminate)  # undone after the test
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        ec2.terminate_instances(InstanceIds=[instance])
        make_terminate_idempotent()
        make_terminate_idempotent()  # applying twice wraps once
        again = ec2.terminate_instances(InstanceIds=[instance])["TerminatingInstances"][0]
        assert again["InstanceId"] == instance and again["PreviousState"]["Name"] == "terminated"


def test_run_instances_with_a_used_client_token_starts_nothing_new_as_on_aws(monkeypatch):
    import boto3
    from ec2cluster_localcloud.server import make_run_instances_idempotent
    from moto import mock_aws
    from moto.ec2.models.instances import InstanceBackend

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(InstanceBackend, "run_instances", InstanceBackend.run_instances)  # undone after
    make_run_instances_idempotent()
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

        def launch(token: str) -> list[str]:
            answer = ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, ClientToken=token)
            return sorted(i["InstanceId"] for i in answer["Instances"])

        first = launch("c-r0-n2")
        assert launch("c-r0-n2") == first  # the retry gets the first launch's instances
        assert set(launch("c-r1-n2")).isdisjoint(first)
        running = ec2.describe_instances()["Reservations"]
        assert sum(len(r["Instances"]) for r in running) == 4


def test_an_instance_profile_applies_to_every_instance_of_a_launch_as_on_aws(monkeypatch):
    import json

    import boto3
    from ec2cluster_localcloud.server import make_instance_profile_apply_to_every_instance
    from moto import mock_aws
    from moto.ec2.responses.instances import InstanceResponse

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(InstanceResponse, "run_instances", InstanceResponse.run_instances)  # undone after
    make_instance_profile_apply_to_every_instance()
    make_instance_profile_apply_to_every_instance()  # applying twice wraps once
    with mock_aws():
        iam = boto3.client("iam", region_name="us-east-1")
        iam.create_role(
            RoleName="w", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []})
        )
        iam.create_instance_profile(InstanceProfileName="w")
        iam.add_role_to_instance_profile(InstanceProfileName="w", RoleName="w")
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

        def launch() -> list[str]:
            answer = ec2.run_instances(
                ImageId=image, MinCount=3, MaxCount=3, ClientToken="t1", IamInstanceProfile={"Name": "w"}
            )
            return sorted(i["InstanceId"] for i in answer["Instances"])

        first = launch()
        assert launch() == first  # a replayed token answers, without associating the profile twice
        instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        assert len(instances) == 3
        assert all(i["IamInstanceProfile"]["Arn"].endswith(":instance-profile/w") for i in instances)
