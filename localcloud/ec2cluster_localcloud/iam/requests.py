"""What one AWS API request asks IAM for: each (action, resource ARN, condition keys) it must be allowed.

Pure: the request arrives parsed (``ApiCall``), and whatever the answer needs from the account's state
(an instance's tags, an instance profile's role, a table's partition key) comes from a ``Facts`` object.
The resources and condition keys follow AWS's "Actions, resources, and condition keys" reference for the
calls this project makes, and conservatively for others: an action this module does not know is asked
for on ``*``, which a policy scoped to resources does not allow.

Notable rules that it models:
- Batch calls are authorised as their single form (SendMessageBatch is sqs:SendMessage).
- DynamoDB item calls carry ``dynamodb:LeadingKeys``: the partition key values of every item touched, one
  request per table of a batch.
- RunInstances is authorised on each resource it uses or creates (instance, volume, image, subnet, network
  interface, security group, key pair, spot request) with the request's tags, needs ec2:CreateTags with
  ``ec2:CreateAction=RunInstances`` when it tags, and iam:PassRole on the instance profile's role with
  ``iam:PassedToService=ec2.amazonaws.com``.
- CreateFleet (instant) is authorised as ec2:CreateFleet on ``fleet/*`` (the fleet's request tags) and on its
  launch templates, plus, since an instant fleet launches as its caller, RunInstances on what each pool
  uses or creates (the launch template included), ec2:CreateTags with ``ec2:CreateAction=CreateFleet`` for
  the fleet's and the instances' and volumes' tags, iam:PassRole on the template's instance profile role,
  and the spot service-linked role when it asks for spot capacity in an account without it. RunInstances
  with a launch template reads the template's resources too, and is authorised on its ARN.
- CreateLaunchTemplate: on ``launch-template/*`` with its request tags (ec2:CreateTags with
  ``ec2:CreateAction=CreateLaunchTemplate`` when tagged); DeleteLaunchTemplate, CreateLaunchTemplateVersion,
  ModifyLaunchTemplate and DeleteFleets on the resource's ARN with its tags.
- Calls on existing instances carry their tags as ``aws:ResourceTag/<key>``.
- CloudWatch Logs: calls on a log group (CreateLogGroup, PutRetentionPolicy, CreateLogStream,
  FilterLogEvents, DescribeLogStreams...) on ``log-group:<name>``, on one stream (PutLogEvents,
  GetLogEvents) on ``log-group:<name>:log-stream:<stream>``, tagging on the ``resourceArn``; CreateLogGroup
  with tags also needs logs:TagResource with the request's tags.
- CreateQueue with tags also needs sqs:TagQueue; StartMessageMoveTask needs receive, delete and attribute
  reads on the source and SendMessage on the destination.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse

import boto3
from botocore.exceptions import UnknownRegionError

from ec2cluster_localcloud.iam.evaluate import AuthorizationRequest

ALWAYS_ALLOWED = frozenset({"sts:GetCallerIdentity"})  # AWS answers it even under an explicit deny
BATCH_ACTIONS = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}
# EC2 actions on existing instances (resource instance/<id>, the instance's tags as condition keys).
INSTANCE_ACTIONS = frozenset(
    {
        "TerminateInstances",
        "StopInstances",
        "StartInstances",
        "RebootInstances",
        "DescribeInstanceAttribute",
        "GetConsoleOutput",
    }
)
LIST_PARAMETERS = frozenset(
    {"list-type", "prefix", "delimiter", "max-keys", "continuation-token", "encoding-type", "start-after"}
    | {"marker", "fetch-owner"}
)
# EC2 creates this service-linked role at an account's first spot launch, as the caller (who needs
# iam:CreateServiceLinkedRole for it).
SPOT_SERVICE_ROLE_NAME = "AWSServiceRoleForEC2Spot"
SPOT_SERVICE_ROLE_PATH = "/aws-service-role/spot.amazonaws.com/"
SPOT_SERVICE = "spot.amazonaws.com"
KEY_CONDITION_RE = re.compile(r"^\s*\(?\s*([#\w.]+)\s*=\s*(:[\w]+)")


@functools.cache
def partition_of(region: str) -> str:
    """The ARN partition of a region, from botocore's endpoint data ("aws" for a region it does not know)."""
    try:
        return boto3.session.Session().get_partition_for_region(region)
    except UnknownRegionError:
        return "aws"


class Facts(Protocol):
    """The account's state that authorisation reads (the local cloud answers from moto's backends)."""

    def instance_tags(self, region: str, instance_id: str) -> Mapping[str, str]: ...

    def instance_profile_role_arn(self, profile: str) -> str | None: ...

    def partition_key(self, region: str, table: str) -> str | None: ...

    def default_subnet_id(self, region: str) -> str | None: ...

    def default_security_group_id(self, region: str) -> str | None: ...

    def role_exists(self, name: str) -> bool: ...

    def launch_template(
        self, region: str, template_id: str | None, name: str | None, version: str | None
    ) -> LaunchTemplateFacts | None: ...

    def default_subnet_ids(self, region: str) -> list[str]: ...


@dataclass(frozen=True)
class LaunchTemplateFacts:
    """A launch template's id, the data of the version a request names (RequestLaunchTemplateData's
    shape), and its tags."""

    template_id: str
    data: Mapping[str, Any]
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiCall:
    """One request as the local cloud's endpoint received it."""

    service: str  # the signing name: sqs, dynamodb, ec2, iam, sts, s3
    region: str
    account_id: str
    operation: str  # the API operation (SendMessageBatch); for S3, derived from method and path
    params: Mapping[str, Any] = field(default_factory=dict)  # JSON body, or flattened query parameters
    method: str = "POST"
    path: str = "/"
    query: Mapping[str, Sequence[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def partition(self) -> str:
        return partition_of(self.region)

    def arn(self, service: str, resource: str, *, region: bool = True, account: bool = True) -> str:
        return (
            f"arn:{self.partition}:{service}:{self.region if region else ''}:"
            f"{self.account_id if account else ''}:{resource}"
        )


def authorizations(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    """Every authorisation ``call`` needs; [] when it needs none."""
    handler = {
        "sqs": _sqs,
        "dynamodb": _dynamodb,
        "ec2": _ec2,
        "iam": _iam,
        "sts": _sts,
        "s3": _s3,
        "logs": _logs,
    }.get(call.service)
    if handler is None:
        return [AuthorizationRequest(f"{call.service}:{call.operation}", "*")]
    return handler(call, facts)


# -- SQS ------------------------------------------------------------------------------------------------


def queue_arn_from_url(call: ApiCall, url: str) -> str:
    parts = [p for p in urlparse(url).path.split("/") if p]
    account, name = (
        (parts[-2], parts[-1]) if len(parts) >= 2 else (call.account_id, parts[-1] if parts else "")
    )
    return f"arn:{call.partition}:sqs:{call.region}:{account}:{name}"


def _sqs(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    action = BATCH_ACTIONS.get(f"sqs:{call.operation}", f"sqs:{call.operation}")
    params = call.params
    if call.operation in ("CreateQueue", "GetQueueUrl"):
        owner = params.get("QueueOwnerAWSAccountId") or call.account_id
        resource = f"arn:{call.partition}:sqs:{call.region}:{owner}:{params.get('QueueName', '')}"
        found = [AuthorizationRequest(action, resource)]
        if call.operation == "CreateQueue" and params.get("tags"):
            found.append(AuthorizationRequest("sqs:TagQueue", resource))
        return found
    if call.operation == "StartMessageMoveTask":
        source = params.get("SourceArn", "")
        found = [
            AuthorizationRequest(a, source)
            for a in (
                "sqs:StartMessageMoveTask",
                "sqs:ReceiveMessage",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
            )
        ]
        if params.get("DestinationArn"):
            found.append(AuthorizationRequest("sqs:SendMessage", params["DestinationArn"]))
        return found
    if call.operation in ("ListMessageMoveTasks",):
        return [AuthorizationRequest(action, params.get("SourceArn", "*"))]
    if params.get("QueueUrl"):
        return [AuthorizationRequest(action, queue_arn_from_url(call, params["QueueUrl"]))]
    return [AuthorizationRequest(action, "*")]  # ListQueues


# -- DynamoDB -------------------------------------------------------------------------------------------


def _table_arn(call: ApiCall, table: str) -> str:
    if table.startswith("arn:"):
        return table
    return call.arn("dynamodb", f"table/{table}")


def _string_key(item: Mapping[str, Any] | None, name: str | None) -> str | None:
    if not item or not name or name not in item:
        return None
    value = item[name]
    if isinstance(value, Mapping):
        for type_name in ("S", "N", "B"):
            if type_name in value:
                return str(value[type_name])
    return None


def query_partition_value(params: Mapping[str, Any], partition_key: str | None) -> str | None:
    """The partition key value a Query names (``#pk = :v`` or ``pk = :v`` first in the key condition)."""
    expression = params.get("KeyConditionExpression") or ""
    names = params.get("ExpressionAttributeNames") or {}
    values = params.get("ExpressionAttributeValues") or {}
    for clause in re.split(r"\s+AND\s+", expression, flags=re.IGNORECASE):
        match = KEY_CONDITION_RE.match(clause)
        if match and names.get(match.group(1), match.group(1)) == partition_key:
            return _string_key({"v": values.get(match.group(2))}, "v")
    legacy = (params.get("KeyConditions") or {}).get(partition_key or "")
    if legacy:
        return _string_key({"v": (legacy.get("AttributeValueList") or [None])[0]}, "v")
    return None


def _leading(keys: list[str | None]) -> dict[str, list[str]]:
    present = [k for k in keys if k is not None]
    return {"dynamodb:LeadingKeys": present} if present else {}


def _dynamodb(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    action = f"dynamodb:{call.operation}"
    params = call.params
    if call.operation == "BatchWriteItem":
        found = []
        for table, writes in (params.get("RequestItems") or {}).items():
            key = facts.partition_key(call.region, table)
            leading = [
                _string_key((w.get("PutRequest") or {}).get("Item"), key)
                or _string_key((w.get("DeleteRequest") or {}).get("Key"), key)
                for w in writes
            ]
            found.append(AuthorizationRequest(action, _table_arn(call, table), _leading(leading)))
        return found
    if call.operation == "BatchGetItem":
        found = []
        for table, request in (params.get("RequestItems") or {}).items():
            key = facts.partition_key(call.region, table)
            leading = [_string_key(k, key) for k in request.get("Keys") or []]
            found.append(AuthorizationRequest(action, _table_arn(call, table), _leading(leading)))
        return found
    table = params.get("TableName")
    if not table:
        return [AuthorizationRequest(action, "*")]  # ListTables
    key = facts.partition_key(call.region, table)
    if call.operation == "PutItem":
        context = _leading([_string_key(params.get("Item"), key)])
    elif call.operation in ("GetItem", "DeleteItem", "UpdateItem"):
        context = _leading([_string_key(params.get("Key"), key)])
    elif call.operation == "Query":
        context = _leading([query_partition_value(params, key)])
    else:
        context = {}
    return [AuthorizationRequest(action, _table_arn(call, table), context)]


# -- EC2 ------------------------------------------------------------------------------------------------


def indexed(params: Mapping[str, Any], prefix: str) -> list[str]:
    """Values of ``Prefix.1``, ``Prefix.2``... in query parameters."""
    found, n = [], 1
    while f"{prefix}.{n}" in params:
        found.append(params[f"{prefix}.{n}"])
        n += 1
    return found


def tag_specifications(params: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """resource type -> tags, from ``TagSpecification.N.ResourceType`` / ``.Tag.M.Key`` / ``.Value``."""
    found: dict[str, dict[str, str]] = {}
    n = 1
    while f"TagSpecification.{n}.ResourceType" in params:
        tags = found.setdefault(params[f"TagSpecification.{n}.ResourceType"], {})
        m = 1
        while f"TagSpecification.{n}.Tag.{m}.Key" in params:
            tags[params[f"TagSpecification.{n}.Tag.{m}.Key"]] = params.get(
                f"TagSpecification.{n}.Tag.{m}.Value", ""
            )
            m += 1
        n += 1
    return found


def request_tag_context(tags: Mapping[str, str]) -> dict[str, list[str]]:
    context = {f"aws:RequestTag/{key}": [value] for key, value in tags.items()}
    if tags:
        context["aws:TagKeys"] = sorted(tags)
    return context


def _ec2(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    params, operation = call.params, call.operation
    if operation == "RunInstances":
        return _run_instances(call, facts)
    if operation == "CreateFleet":
        return _create_fleet(call, facts)
    if operation == "CreateLaunchTemplate":
        tags = tag_specifications(params).get("launch-template", {})
        resource = call.arn("ec2", "launch-template/*")
        found = [AuthorizationRequest("ec2:CreateLaunchTemplate", resource, request_tag_context(tags))]
        if tags:
            context = {**request_tag_context(tags), "ec2:CreateAction": ["CreateLaunchTemplate"]}
            found.append(AuthorizationRequest("ec2:CreateTags", resource, context))
        return found
    if operation in ("DeleteLaunchTemplate", "CreateLaunchTemplateVersion", "ModifyLaunchTemplate"):
        template = facts.launch_template(
            call.region, params.get("LaunchTemplateId"), params.get("LaunchTemplateName"), None
        )
        template_id = template.template_id if template else params.get("LaunchTemplateId", "*")
        return [
            AuthorizationRequest(
                f"ec2:{operation}",
                call.arn("ec2", f"launch-template/{template_id}"),
                _resource_tags(template.tags if template else {}),
            )
        ]
    if operation == "DeleteFleets":
        return [
            AuthorizationRequest(
                "ec2:DeleteFleets",
                call.arn("ec2", f"fleet/{fleet_id}"),
                _resource_tags(facts.instance_tags(call.region, fleet_id)),
            )
            for fleet_id in indexed(params, "FleetId")
        ]
    if operation in INSTANCE_ACTIONS:
        ids = indexed(params, "InstanceId") or ([params["InstanceId"]] if params.get("InstanceId") else [])
        return [
            AuthorizationRequest(
                f"ec2:{operation}",
                call.arn("ec2", f"instance/{instance_id}"),
                {
                    f"aws:ResourceTag/{k}": [v]
                    for k, v in facts.instance_tags(call.region, instance_id).items()
                },
            )
            for instance_id in ids
        ]
    if operation == "CreateSecurityGroup":
        tags = tag_specifications(params).get("security-group", {})
        found = [
            AuthorizationRequest(
                "ec2:CreateSecurityGroup", call.arn("ec2", "security-group/*"), request_tag_context(tags)
            ),
            AuthorizationRequest(
                "ec2:CreateSecurityGroup", call.arn("ec2", f"vpc/{params.get('VpcId', '')}")
            ),
        ]
        if tags:
            context = {**request_tag_context(tags), "ec2:CreateAction": ["CreateSecurityGroup"]}
            found.append(AuthorizationRequest("ec2:CreateTags", call.arn("ec2", "security-group/*"), context))
        return found
    if operation == "DeleteSecurityGroup":
        group_id = params.get("GroupId", "")
        tags = facts.instance_tags(call.region, group_id)  # tags of any EC2 resource id
        return [
            AuthorizationRequest(
                "ec2:DeleteSecurityGroup",
                call.arn("ec2", f"security-group/{group_id}"),
                {f"aws:ResourceTag/{k}": [v] for k, v in tags.items()},
            )
        ]
    if operation == "CreateTags":
        tags = {
            params[f"Tag.{n}.Key"]: params.get(f"Tag.{n}.Value", "") for n in _indices(params, "Tag", "Key")
        }
        return [
            AuthorizationRequest(
                "ec2:CreateTags", call.arn("ec2", _ec2_resource(resource_id)), request_tag_context(tags)
            )
            for resource_id in indexed(params, "ResourceId")
        ]
    return [AuthorizationRequest(f"ec2:{operation}", "*")]  # Describe*: AWS takes no resources for them


def _indices(params: Mapping[str, Any], prefix: str, suffix: str) -> list[int]:
    found, n = [], 1
    while f"{prefix}.{n}.{suffix}" in params:
        found.append(n)
        n += 1
    return found


def _ec2_resource(resource_id: str) -> str:
    kinds = {"i": "instance", "vol": "volume", "sg": "security-group", "subnet": "subnet", "ami": "image"}
    return f"{kinds.get(resource_id.split('-', 1)[0], 'resource')}/{resource_id}"


def _resource_tags(tags: Mapping[str, str]) -> dict[str, list[str]]:
    return {f"aws:ResourceTag/{key}": [value] for key, value in tags.items()}


@dataclass
class Launch:
    """What one launch (a RunInstances, or one pool of a fleet) uses and creates, for authorisation."""

    image: str = ""
    subnets: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    key_name: str | None = None
    spot: bool = False
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # resource type -> tags
    profile: str | None = None
    launch_template: str | None = None  # its id
    launch_template_tags: dict[str, str] = field(default_factory=dict)  # its tags (aws:ResourceTag)


def _launch_authorizations(call: ApiCall, facts: Facts, launch: Launch, create_action: str):
    action = "ec2:RunInstances"
    tags = launch.tags
    found = [
        AuthorizationRequest(
            action, call.arn("ec2", "instance/*"), request_tag_context(tags.get("instance", {}))
        ),
        AuthorizationRequest(
            action, call.arn("ec2", "volume/*"), request_tag_context(tags.get("volume", {}))
        ),
        AuthorizationRequest(action, call.arn("ec2", f"image/{launch.image}", account=False)),
        AuthorizationRequest(action, call.arn("ec2", "network-interface/*")),
    ]
    found += [AuthorizationRequest(action, call.arn("ec2", f"subnet/{s}")) for s in launch.subnets]
    found += [AuthorizationRequest(action, call.arn("ec2", f"security-group/{g}")) for g in launch.groups]
    if launch.key_name:
        found.append(AuthorizationRequest(action, call.arn("ec2", f"key-pair/{launch.key_name}")))
    if launch.launch_template:
        found.append(
            AuthorizationRequest(
                action,
                call.arn("ec2", f"launch-template/{launch.launch_template}"),
                _resource_tags(launch.launch_template_tags),
            )
        )
    if launch.spot:
        found.append(AuthorizationRequest(action, call.arn("ec2", "spot-instances-request/*")))
        if not facts.role_exists(SPOT_SERVICE_ROLE_NAME):
            role = call.arn("iam", f"role{SPOT_SERVICE_ROLE_PATH}{SPOT_SERVICE_ROLE_NAME}", region=False)
            context = {"iam:AWSServiceName": [SPOT_SERVICE]}
            found.append(AuthorizationRequest("iam:CreateServiceLinkedRole", role, context))
    for resource_type, resource_tags in sorted(tags.items()):
        if not resource_tags:
            continue
        context = {**request_tag_context(resource_tags), "ec2:CreateAction": [create_action]}
        found.append(AuthorizationRequest("ec2:CreateTags", call.arn("ec2", f"{resource_type}/*"), context))
    if launch.profile:
        role = facts.instance_profile_role_arn(launch.profile)
        if role:
            found.append(
                AuthorizationRequest("iam:PassRole", role, {"iam:PassedToService": ["ec2.amazonaws.com"]})
            )
    return found


def _template_groups(data: Mapping[str, Any]) -> list[str]:
    interfaces = data.get("NetworkInterfaces") or []
    groups = [g for ni in interfaces for g in ni.get("Groups") or []]
    return groups or list(data.get("SecurityGroupIds") or [])


def _template_tags(data: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for specification in data.get("TagSpecifications") or []:
        if specification.get("ResourceType") in ("instance", "volume", "network-interface"):
            tags = found.setdefault(specification["ResourceType"], {})
            for tag in specification.get("Tags") or []:
                tags[tag["Key"]] = tag.get("Value", "")
    return found


def _merge_tags(*sources: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for source in sources:
        for resource_type, tags in source.items():
            merged.setdefault(resource_type, {}).update(tags)
    return merged


def _profile_of(data: Mapping[str, Any]) -> str | None:
    profile = data.get("IamInstanceProfile") or {}
    return profile.get("Arn") or profile.get("Name")


def _run_instances(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    params = call.params
    template = None
    if params.get("LaunchTemplate.LaunchTemplateId") or params.get("LaunchTemplate.LaunchTemplateName"):
        template = facts.launch_template(
            call.region,
            params.get("LaunchTemplate.LaunchTemplateId"),
            params.get("LaunchTemplate.LaunchTemplateName"),
            params.get("LaunchTemplate.Version"),
        )
    data = template.data if template else {}
    interfaces = data.get("NetworkInterfaces") or [{}]
    subnet = (
        params.get("SubnetId")
        or params.get("NetworkInterface.1.SubnetId")
        or interfaces[0].get("SubnetId")
        or facts.default_subnet_id(call.region)
    )
    groups = indexed(params, "SecurityGroupId") or indexed(params, "NetworkInterface.1.SecurityGroupId")
    if not groups and not indexed(params, "SecurityGroup"):
        groups = _template_groups(data)
    if not groups and not indexed(params, "SecurityGroup") and not data.get("SecurityGroups"):
        default = facts.default_security_group_id(call.region)
        groups = [default] if default else []
    launch = Launch(
        image=params.get("ImageId") or data.get("ImageId", ""),
        subnets=[subnet] if subnet else [],
        groups=groups,
        key_name=params.get("KeyName") or data.get("KeyName"),
        spot=(
            params.get("InstanceMarketOptions.MarketType")
            or (data.get("InstanceMarketOptions") or {}).get("MarketType")
        )
        == "spot",
        tags=_merge_tags(_template_tags(data), tag_specifications(params)),
        profile=params.get("IamInstanceProfile.Arn")
        or params.get("IamInstanceProfile.Name")
        or _profile_of(data),
        launch_template=template.template_id if template else None,
        launch_template_tags=dict(template.tags) if template else {},
    )
    return _launch_authorizations(call, facts, launch, "RunInstances")


def fleet_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """LaunchTemplateConfigs from CreateFleet's query parameters: [{spec: {...}, overrides: [{...}]}]."""
    configs = []
    n = 1
    while any(key.startswith(f"LaunchTemplateConfigs.{n}.") for key in params):
        prefix = f"LaunchTemplateConfigs.{n}."
        spec = {
            name: params[f"{prefix}LaunchTemplateSpecification.{name}"]
            for name in ("LaunchTemplateId", "LaunchTemplateName", "Version")
            if f"{prefix}LaunchTemplateSpecification.{name}" in params
        }
        overrides = []
        m = 1
        while any(key.startswith(f"{prefix}Overrides.{m}.") for key in params):
            head = f"{prefix}Overrides.{m}."
            overrides.append(
                {key[len(head) :]: value for key, value in params.items() if key.startswith(head)}
            )
            m += 1
        configs.append({"spec": spec, "overrides": overrides or [{}]})
        n += 1
    return configs


def _create_fleet(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    params = call.params
    tags = tag_specifications(params)
    fleet_tags = tags.get("fleet", {})
    fleet = call.arn("ec2", "fleet/*")
    found = [AuthorizationRequest("ec2:CreateFleet", fleet, request_tag_context(fleet_tags))]
    if fleet_tags:
        context = {**request_tag_context(fleet_tags), "ec2:CreateAction": ["CreateFleet"]}
        found.append(AuthorizationRequest("ec2:CreateTags", fleet, context))
    total = int(params.get("TargetCapacitySpecification.TotalTargetCapacity") or 0)
    on_demand = int(params.get("TargetCapacitySpecification.OnDemandTargetCapacity") or 0)
    spot_units = int(params.get("TargetCapacitySpecification.SpotTargetCapacity") or 0)
    if params.get("TargetCapacitySpecification.DefaultTargetCapacityType") == "spot":
        spot_units += max(0, total - on_demand - spot_units)
    launched_tags = {key: value for key, value in tags.items() if key in ("instance", "volume")}
    for config in fleet_configs(params):
        spec = config["spec"]
        template = facts.launch_template(
            call.region, spec.get("LaunchTemplateId"), spec.get("LaunchTemplateName"), spec.get("Version")
        )
        data = template.data if template else {}
        template_id = template.template_id if template else spec.get("LaunchTemplateId", "*")
        found.append(
            AuthorizationRequest(
                "ec2:CreateFleet",
                call.arn("ec2", f"launch-template/{template_id}"),
                _resource_tags(template.tags if template else {}),
            )
        )
        interfaces = data.get("NetworkInterfaces") or [{}]
        for override in config["overrides"]:
            subnets = [s.strip() for s in str(override.get("SubnetId") or "").split(",") if s.strip()]
            if not subnets and interfaces[0].get("SubnetId"):
                subnets = [interfaces[0]["SubnetId"]]
            if not subnets:
                subnets = facts.default_subnet_ids(call.region)
            groups = _template_groups(data)
            if not groups and not data.get("SecurityGroups"):
                default = facts.default_security_group_id(call.region)
                groups = [default] if default else []
            launch = Launch(
                image=override.get("ImageId") or data.get("ImageId", ""),
                subnets=subnets,
                groups=groups,
                key_name=data.get("KeyName"),
                spot=spot_units > 0,
                tags=_merge_tags(_template_tags(data), launched_tags),
                profile=_profile_of(data),
                launch_template=template_id,
                launch_template_tags=dict(template.tags) if template else {},
            )
            for request in _launch_authorizations(call, facts, launch, "CreateFleet"):
                asked = [request]
                # CreateFleet itself is authorised on the instances and volumes it creates and on the
                # images and subnets they use (the Service Authorization Reference: fleet and instance
                # required; image, launch template, subnet and volume when used), as well as RunInstances.
                if request.action == "ec2:RunInstances" and _arn_type(request.resource) in FLEET_RESOURCES:
                    asked.append(AuthorizationRequest("ec2:CreateFleet", request.resource, request.context))
                found.extend(item for item in asked if item not in found)
    return found


FLEET_RESOURCES = frozenset({"instance", "volume", "image", "subnet"})


def _arn_type(arn: str) -> str:
    """``instance`` of ``arn:aws:ec2:us-east-1:123456789012:instance/*``."""
    return arn.rsplit(":", 1)[-1].split("/", 1)[0]


# -- CloudWatch Logs ------------------------------------------------------------------------------------

LOG_STREAM_OPERATIONS = frozenset({"PutLogEvents", "GetLogEvents"})
LOG_TAGGING_OPERATIONS = frozenset({"TagResource", "UntagResource", "ListTagsForResource"})


def _logs(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    params, operation, action = call.params, call.operation, f"logs:{call.operation}"
    if operation in LOG_TAGGING_OPERATIONS:
        return [AuthorizationRequest(action, str(params.get("resourceArn") or "*"))]
    group = params.get("logGroupName") or params.get("logGroupIdentifier")
    if not group:
        return [AuthorizationRequest(action, "*")]
    if str(group).startswith("arn:"):
        group_arn = str(group).removesuffix(":*")
    else:
        group_arn = call.arn("logs", f"log-group:{group}")
    stream = params.get("logStreamName")
    if operation in LOG_STREAM_OPERATIONS and stream:
        return [AuthorizationRequest(action, f"{group_arn}:log-stream:{stream}")]
    tags = params.get("tags") or {}
    if operation == "CreateLogGroup" and tags:
        context = request_tag_context(tags)
        return [
            AuthorizationRequest(action, group_arn, context),
            AuthorizationRequest("logs:TagResource", group_arn, context),
        ]
    return [AuthorizationRequest(action, group_arn)]


# -- IAM and STS ----------------------------------------------------------------------------------------


def _iam(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    params, action = call.params, f"iam:{call.operation}"
    for param, kind in (
        ("InstanceProfileName", "instance-profile"),
        ("RoleName", "role"),
        ("UserName", "user"),
    ):
        if params.get(param):
            return [AuthorizationRequest(action, call.arn("iam", f"{kind}/{params[param]}", region=False))]
    return [AuthorizationRequest(action, "*")]


def _sts(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    action = f"sts:{call.operation}"
    if action in ALWAYS_ALLOWED:
        return []
    return [AuthorizationRequest(action, call.params.get("RoleArn") or "*")]


# -- S3 (REST: the action comes from the method and the path) -------------------------------------------


def s3_operation(
    method: str, path: str, query: Mapping[str, Sequence[str]], headers: Mapping[str, str]
) -> tuple[str, str | None, str | None]:
    """(IAM action, bucket, key) of a path-style S3 request."""
    query = {k: v for k, v in query.items() if k != "x-id"}  # botocore names the operation: not a subresource
    parts = unquote(path).lstrip("/").split("/", 1)
    bucket = parts[0] or None
    key = parts[1] if len(parts) > 1 and parts[1] else None
    if bucket is None:
        return "s3:ListAllMyBuckets", None, None
    if key is None:
        if method in ("GET", "HEAD") and not set(query) - LIST_PARAMETERS:
            return "s3:ListBucket", bucket, None
        if method == "POST" and "delete" in query:
            return "s3:DeleteObject", bucket, None
        if method == "PUT" and not query:
            return "s3:CreateBucket", bucket, None
        if method == "DELETE" and not query:
            return "s3:DeleteBucket", bucket, None
        sub = sorted(query)[0] if query else ""
        verb = {"GET": "Get", "HEAD": "Get", "PUT": "Put", "DELETE": "Delete", "POST": "Put"}.get(
            method, method
        )
        # publicAccessBlock -> PutBucketPublicAccessBlock (IAM's spelling keeps the subresource's case)
        name = "".join(part[:1].upper() + part[1:] for part in sub.split("-"))
        return f"s3:{verb}Bucket{name}", bucket, None
    if method in ("GET", "HEAD"):
        return ("s3:GetObjectTagging" if "tagging" in query else "s3:GetObject"), bucket, key
    if method in ("PUT", "POST"):
        return ("s3:PutObjectTagging" if "tagging" in query else "s3:PutObject"), bucket, key
    if method == "DELETE":
        return ("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject"), bucket, key
    return f"s3:{method}", bucket, key


def _s3(call: ApiCall, facts: Facts) -> list[AuthorizationRequest]:
    action, bucket, key = s3_operation(call.method, call.path, call.query, call.headers)
    if bucket is None:
        return [AuthorizationRequest(action, "*")]
    resource = f"arn:{call.partition}:s3:::{bucket}" + (f"/{key}" if key else "")
    found = [AuthorizationRequest(action, resource)]
    source = call.headers.get("x-amz-copy-source")
    if source and action == "s3:PutObject":
        found.append(
            AuthorizationRequest("s3:GetObject", f"arn:{call.partition}:s3:::{unquote(source).lstrip('/')}")
        )
    return found


def parse_query(query_string: str) -> dict[str, list[str]]:
    return parse_qs(query_string, keep_blank_values=True)
