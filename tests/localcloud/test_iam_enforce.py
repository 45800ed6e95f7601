"""IAM enforced at the local cloud's endpoint: callers, signatures, decisions and AWS's error shapes."""

from __future__ import annotations

import botocore
import pytest
from ec2cluster_localcloud import LocalCloud

TABLE_SCHEMA = {
    "AttributeDefinitions": [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
    ],
    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    "BillingMode": "PAY_PER_REQUEST",
}
POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["sqs:CreateQueue", "sqs:SendMessage"],
            "Resource": "arn:aws:sqs:us-east-1:123456789012:etl-*",
        },
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"], "Resource": "arn:aws:s3:::bkt/in/*"},
        {
            "Effect": "Allow",
            "Action": ["dynamodb:PutItem", "dynamodb:BatchWriteItem"],
            "Resource": "arn:aws:dynamodb:*:*:table/t",
            "Condition": {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["C#etl-*#W"]}},
        },
        {"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
        {"Effect": "Deny", "Action": "sqs:SendMessage", "Resource": "arn:aws:sqs:*:*:etl-frozen"},
    ],
}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with LocalCloud(work_dir=tmp_path_factory.mktemp("iam-cloud")) as started:
        started.client("s3").create_bucket(Bucket="bkt")
        started.client("dynamodb").create_table(TableName="t", **TABLE_SCHEMA)
        yield started


def error_of(call) -> tuple[str, str]:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    return caught.value.response["Error"]["Code"], caught.value.response["Error"]["Message"]


def test_a_user_may_do_what_its_policy_allows_and_nothing_else(cloud):
    keys = cloud.create_user("enforce-user", POLICY)
    sqs, s3, ddb, ec2 = (cloud.client(service, keys) for service in ("sqs", "s3", "dynamodb", "ec2"))
    user = "arn:aws:iam::123456789012:user/enforce-user"
    url = sqs.create_queue(QueueName="etl-1-tasks")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    # SQS: AWS's code (from the query-compatible header) and message.
    code, message = error_of(lambda: sqs.delete_queue(QueueUrl=url))
    assert code == "AccessDenied"
    assert message == (
        f"User: {user} is not authorized to perform: sqs:DeleteQueue on resource: "
        "arn:aws:sqs:us-east-1:123456789012:etl-1-tasks because no identity-based policy allows the "
        "sqs:DeleteQueue action"
    )
    assert error_of(lambda: sqs.create_queue(QueueName="web-1-tasks"))[0] == "AccessDenied"
    frozen = cloud.client("sqs").create_queue(QueueName="etl-frozen")["QueueUrl"]
    code, message = error_of(lambda: sqs.send_message(QueueUrl=frozen, MessageBody="x"))
    assert code == "AccessDenied" and "explicit deny" in message
    # S3: object ARNs.
    s3.put_object(Bucket="bkt", Key="in/a.json", Body=b"{}")
    assert s3.get_object(Bucket="bkt", Key="in/a.json")["Body"].read() == b"{}"
    assert error_of(lambda: s3.put_object(Bucket="bkt", Key="out/a.json", Body=b"{}"))[0] == "AccessDenied"
    # DynamoDB: LeadingKeys over every item of a batch.
    ddb.put_item(TableName="t", Item={"pk": {"S": "C#etl-1#W"}, "sk": {"S": "w"}})
    code, _ = error_of(
        lambda: ddb.put_item(TableName="t", Item={"pk": {"S": "C#etl-1"}, "sk": {"S": "META"}})
    )
    assert code == "AccessDeniedException"
    mixed = [
        {"PutRequest": {"Item": {"pk": {"S": "C#etl-1#W"}, "sk": {"S": "a"}}}},
        {"PutRequest": {"Item": {"pk": {"S": "C#etl-1"}, "sk": {"S": "META"}}}},
    ]
    assert error_of(lambda: ddb.batch_write_item(RequestItems={"t": mixed}))[0] == "AccessDeniedException"
    assert "Item" not in cloud.client("dynamodb").get_item(
        TableName="t", Key={"pk": {"S": "C#etl-1"}, "sk": {"S": "META"}}
    )
    # EC2: its own code.
    ec2.describe_instances()
    code, message = error_of(lambda: ec2.run_instances(ImageId=cloud.ami_id, MinCount=1, MaxCount=1))
    assert code == "UnauthorizedOperation" and message.startswith(
        "You are not authorized to perform this operation."
    )
    assert cloud.client("ec2").describe_instances()["Reservations"] == []  # nothing was launched


def test_callers_are_authenticated(cloud):
    keys = cloud.create_user("enforce-auth", POLICY)
    wrong = cloud.client("sqs", {**keys, "SecretAccessKey": "not-the-secret"})
    assert error_of(lambda: wrong.list_queues())[0] == "SignatureDoesNotMatch"
    wrong_ec2 = cloud.client("ec2", {**keys, "SecretAccessKey": "x"})
    assert error_of(lambda: wrong_ec2.describe_instances())[0] == "AuthFailure"
    unknown = cloud.client("dynamodb", {"AccessKeyId": "AKIAUNKNOWN000000000", "SecretAccessKey": "x"})
    assert error_of(lambda: unknown.list_tables())[0] == "InvalidClientTokenId"
    # The root key may do anything; a role's session credentials carry the role's policy only.
    cloud.client("sqs").list_queues()
    cloud.set_worker_policy(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sqs:ListQueues", "Resource": "*"}],
        }
    )
    role = cloud.client("iam").get_role(RoleName=cloud.instance_profile_name)["Role"]["Arn"]
    session = cloud.client("sts").assume_role(RoleArn=role, RoleSessionName="i-test")["Credentials"]
    assumed = cloud.client("sqs", session)
    assumed.list_queues()
    code, message = error_of(lambda: assumed.create_queue(QueueName="etl-2-tasks"))
    assert code == "AccessDenied"
    assert "assumed-role/ec2cluster-worker/i-test is not authorized to perform: sqs:CreateQueue" in message
