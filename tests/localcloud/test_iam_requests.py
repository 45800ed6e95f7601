"""What each API request asks IAM for: actions, resource ARNs and condition keys (pure, no server)."""

from __future__ import annotations

from ec2cluster_localcloud.iam.evaluate import AuthorizationRequest
from ec2cluster_localcloud.iam.requests import ApiCall, authorizations, query_partition_value, s3_operation

ACCOUNT = "123456789012"


class Facts:
    spot_role = False

    def instance_tags(self, region, instance_id):
        return {"ec2cluster:cluster-id": "etl-1"} if instance_id == "i-1" else {}

    def instance_profile_role_arn(self, profile):
        return (
            f"arn:aws:iam::{ACCOUNT}:role/ec2cluster-worker"
            if profile.endswith("ec2cluster-worker")
            else None
        )

    def partition_key(self, region, table):
        return "pk"

    def default_subnet_id(self, region):
        return "subnet-default"

    def default_security_group_id(self, region):
        return "sg-default"

    def role_exists(self, name):
        return self.spot_role


def asks(service, operation, params=None, region="us-east-1", facts=None, **extra):
    call = ApiCall(service, region, ACCOUNT, operation, params or {}, **extra)
    return authorizations(call, facts or Facts())


def test_sqs():
    url = f"http://127.0.0.1:4566/{ACCOUNT}/ec2cluster-etl-1-tasks"
    arn = f"arn:aws:sqs:us-east-1:{ACCOUNT}:ec2cluster-etl-1-tasks"
    assert asks("sqs", "SendMessageBatch", {"QueueUrl": url}) == [
        AuthorizationRequest("sqs:SendMessage", arn)
    ]
    assert asks("sqs", "CreateQueue", {"QueueName": "ec2cluster-etl-1-tasks", "tags": {"a": "b"}}) == [
        AuthorizationRequest("sqs:CreateQueue", arn),
        AuthorizationRequest("sqs:TagQueue", arn),
    ]
    dlq = arn.replace("-tasks", "-dlq")
    moved = asks("sqs", "StartMessageMoveTask", {"SourceArn": dlq, "DestinationArn": arn})
    assert {(r.action, r.resource) for r in moved} == {
        ("sqs:StartMessageMoveTask", dlq),
        ("sqs:ReceiveMessage", dlq),
        ("sqs:DeleteMessage", dlq),
        ("sqs:GetQueueAttributes", dlq),
        ("sqs:SendMessage", arn),
    }
    assert asks("sqs", "ListQueues") == [AuthorizationRequest("sqs:ListQueues", "*")]
    # Partitions follow the region.
    assert asks("sqs", "GetQueueUrl", {"QueueName": "q"}, region="cn-north-1")[0].resource == (
        f"arn:aws-cn:sqs:cn-north-1:{ACCOUNT}:q"
    )


def test_dynamodb_leading_keys():
    table = f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/state"
    put = asks(
        "dynamodb", "PutItem", {"TableName": "state", "Item": {"pk": {"S": "C#etl-1#W"}, "sk": {"S": "w"}}}
    )
    assert put == [AuthorizationRequest("dynamodb:PutItem", table, {"dynamodb:LeadingKeys": ["C#etl-1#W"]})]
    batch = asks(
        "dynamodb",
        "BatchWriteItem",
        {
            "RequestItems": {
                "state": [
                    {"PutRequest": {"Item": {"pk": {"S": "C#etl-1#T#003"}}}},
                    {"DeleteRequest": {"Key": {"pk": {"S": "C#etl-1"}, "sk": {"S": "META"}}}},
                ],
                "out": [{"PutRequest": {"Item": {"pk": {"S": "C#etl-1#T#001"}}}}],
            }
        },
    )
    assert [(r.resource.rsplit("/", 1)[1], r.context["dynamodb:LeadingKeys"]) for r in batch] == [
        ("state", ["C#etl-1#T#003", "C#etl-1"]),
        ("out", ["C#etl-1#T#001"]),
    ]
    params = {
        "TableName": "state",
        "KeyConditionExpression": "#p = :p AND begins_with(sk, :s)",
        "ExpressionAttributeNames": {"#p": "pk"},
        "ExpressionAttributeValues": {":p": {"S": "C#etl-1#W"}, ":s": {"S": "i-"}},
    }
    assert query_partition_value(params, "pk") == "C#etl-1#W"
    assert asks("dynamodb", "Query", params)[0].context == {"dynamodb:LeadingKeys": ["C#etl-1#W"]}
    got = asks("dynamodb", "BatchGetItem", {"RequestItems": {"state": {"Keys": [{"pk": {"S": "C#etl-1"}}]}}})
    assert got[0].context == {"dynamodb:LeadingKeys": ["C#etl-1"]}
    assert asks("dynamodb", "DescribeTable", {"TableName": "state"}) == [
        AuthorizationRequest("dynamodb:DescribeTable", table)
    ]


def test_run_instances_asks_for_every_resource_tags_and_the_role():
    params = {
        "ImageId": "ami-1",
        "IamInstanceProfile.Name": "ec2cluster-worker",
        "TagSpecification.1.ResourceType": "instance",
        "TagSpecification.1.Tag.1.Key": "ec2cluster:cluster-id",
        "TagSpecification.1.Tag.1.Value": "etl-1",
        "TagSpecification.2.ResourceType": "volume",
        "TagSpecification.2.Tag.1.Key": "ec2cluster:cluster-id",
        "TagSpecification.2.Tag.1.Value": "etl-1",
    }
    found = {(r.action, r.resource): r.context for r in asks("ec2", "RunInstances", params)}
    ec2 = f"arn:aws:ec2:us-east-1:{ACCOUNT}"
    tag = {"aws:RequestTag/ec2cluster:cluster-id": ["etl-1"], "aws:TagKeys": ["ec2cluster:cluster-id"]}
    assert found[("ec2:RunInstances", f"{ec2}:instance/*")] == tag
    assert found[("ec2:RunInstances", f"{ec2}:volume/*")] == tag
    assert ("ec2:RunInstances", "arn:aws:ec2:us-east-1::image/ami-1") in found
    assert ("ec2:RunInstances", f"{ec2}:subnet/subnet-default") in found
    assert ("ec2:RunInstances", f"{ec2}:security-group/sg-default") in found
    assert ("ec2:RunInstances", f"{ec2}:network-interface/*") in found
    assert found[("ec2:CreateTags", f"{ec2}:instance/*")]["ec2:CreateAction"] == ["RunInstances"]
    assert found[("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/ec2cluster-worker")] == {
        "iam:PassedToService": ["ec2.amazonaws.com"]
    }
    assert not any("spot" in resource for _, resource in found)
    # A spot launch: the spot request, and the service-linked role while the account has none.
    spot = {**params, "InstanceMarketOptions.MarketType": "spot"}
    spot_resources = {(r.action, r.resource) for r in asks("ec2", "RunInstances", spot)}
    assert ("ec2:RunInstances", f"{ec2}:spot-instances-request/*") in spot_resources
    role = f"arn:aws:iam::{ACCOUNT}:role/aws-service-role/spot.amazonaws.com/AWSServiceRoleForEC2Spot"
    assert ("iam:CreateServiceLinkedRole", role) in spot_resources
    facts = Facts()
    facts.spot_role = True
    assert not any(
        r.action == "iam:CreateServiceLinkedRole" for r in asks("ec2", "RunInstances", spot, facts=facts)
    )


def test_calls_on_instances_carry_their_tags():
    found = asks("ec2", "TerminateInstances", {"InstanceId.1": "i-1", "InstanceId.2": "i-2"})
    ec2 = f"arn:aws:ec2:us-east-1:{ACCOUNT}"
    assert found == [
        AuthorizationRequest(
            "ec2:TerminateInstances",
            f"{ec2}:instance/i-1",
            {"aws:ResourceTag/ec2cluster:cluster-id": ["etl-1"]},
        ),
        AuthorizationRequest("ec2:TerminateInstances", f"{ec2}:instance/i-2", {}),
    ]
    assert asks("ec2", "DescribeInstances") == [AuthorizationRequest("ec2:DescribeInstances", "*")]


def test_s3_iam_sts():
    assert s3_operation("GET", "/bkt/in/a.json", {}, {}) == ("s3:GetObject", "bkt", "in/a.json")
    assert s3_operation("HEAD", "/bkt/in/a.json", {}, {}) == ("s3:GetObject", "bkt", "in/a.json")
    assert s3_operation("PUT", "/bkt/out/a%20b", {}, {}) == ("s3:PutObject", "bkt", "out/a b")
    assert s3_operation("GET", "/bkt", {"list-type": ["2"], "prefix": ["in/"]}, {})[0] == "s3:ListBucket"
    assert s3_operation("PUT", "/bkt", {}, {})[0] == "s3:CreateBucket"
    assert (
        s3_operation("GET", "/bkt", {"list-type": ["2"], "x-id": ["ListObjectsV2"]}, {})[0] == "s3:ListBucket"
    )
    assert s3_operation("GET", "/bkt/k", {"x-id": ["GetObject"]}, {})[0] == "s3:GetObject"
    assert s3_operation("GET", "/", {}, {})[0] == "s3:ListAllMyBuckets"
    put = asks("s3", "PUT", method="PUT", path="/bkt/out/1.json")
    assert put == [AuthorizationRequest("s3:PutObject", "arn:aws:s3:::bkt/out/1.json")]
    profile = asks("iam", "GetInstanceProfile", {"InstanceProfileName": "ec2cluster-worker"})
    assert profile == [
        AuthorizationRequest(
            "iam:GetInstanceProfile", f"arn:aws:iam::{ACCOUNT}:instance-profile/ec2cluster-worker"
        )
    ]
    assert asks("sts", "GetCallerIdentity") == []


def test_cloudwatch_logs_groups_streams_and_tags():
    group = f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/ec2cluster/etl-1"
    tags = {"ec2cluster:cluster-id": "etl-1"}
    assert asks("logs", "CreateLogGroup", {"logGroupName": "/ec2cluster/etl-1", "tags": tags}) == [
        AuthorizationRequest(
            "logs:CreateLogGroup",
            group,
            {"aws:RequestTag/ec2cluster:cluster-id": ["etl-1"], "aws:TagKeys": ["ec2cluster:cluster-id"]},
        ),
        AuthorizationRequest(
            "logs:TagResource",
            group,
            {"aws:RequestTag/ec2cluster:cluster-id": ["etl-1"], "aws:TagKeys": ["ec2cluster:cluster-id"]},
        ),
    ]
    for operation in ("PutRetentionPolicy", "CreateLogStream", "FilterLogEvents"):
        params = {"logGroupName": "/ec2cluster/etl-1", "logStreamName": "i-1"}
        assert asks("logs", operation, params) == [AuthorizationRequest(f"logs:{operation}", group)]
    put = asks("logs", "PutLogEvents", {"logGroupName": "/ec2cluster/etl-1", "logStreamName": "i-1"})
    assert put == [AuthorizationRequest("logs:PutLogEvents", f"{group}:log-stream:i-1")]
    assert asks("logs", "FilterLogEvents", {"logGroupIdentifier": f"{group}:*"}) == [
        AuthorizationRequest("logs:FilterLogEvents", group)
    ]
    assert asks("logs", "TagResource", {"resourceArn": group}) == [
        AuthorizationRequest("logs:TagResource", group)
    ]
    assert asks("logs", "DescribeLogGroups", {}) == [AuthorizationRequest("logs:DescribeLogGroups", "*")]
