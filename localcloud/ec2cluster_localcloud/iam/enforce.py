"""IAM enforced at the local cloud's endpoint: a WSGI layer in front of moto.

For every signed request it finds the caller (the account's root key, an IAM user's access key, or a
role session's temporary credentials from STS), checks the SigV4 signature with that caller's secret,
works out what the request asks for (``iam.requests``), and evaluates the caller's identity policies
(``iam.evaluate``). A refused request gets AWS's error for its service and protocol, with AWS's message
("User: <arn> is not authorized to perform: <action> on resource: <arn> because no identity-based policy
allows the <action> action"); moto never sees it. The root key is allowed everything, as an account's
root user is. Before IAM, an optional network check (``network_check``) holds and drops a request from an
instance's role session that the instance's network does not carry (``ec2cluster_localcloud.blackhole``).

moto's own switch (``INITIAL_NO_AUTH_ACTION_COUNT``) checks actions only, and answers SQS and DynamoDB in
XML, which botocore cannot read; this layer replaces it.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ec2cluster_localcloud.iam.evaluate import EXPLICIT_DENY, AuthorizationRequest, Decision, evaluate
from ec2cluster_localcloud.iam.requests import (
    ApiCall,
    Facts,
    LaunchTemplateFacts,
    authorizations,
    parse_query,
    partition_of,
)

log = logging.getLogger(__name__)

AUTHORIZATION_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
    r"/aws4_request,"
    r"\s*SignedHeaders=(?P<signed>[^,]+),\s*Signature=(?P<signature>[0-9a-f]+)"
)
JSON_SERVICES = frozenset({"sqs", "dynamodb", "pricing", "logs"})


@dataclass(frozen=True)
class Principal:
    arn: str
    secret_access_key: str
    session_token: str | None
    policies: tuple[Mapping[str, Any], ...]
    root: bool = False


class AuthError(Exception):
    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class MotoIdentities:
    """Callers as moto's IAM and STS backends know them (in the server's process)."""

    def __init__(self, account_id: str, root_access_key: str, root_secret: str) -> None:
        self.account_id = account_id
        self.root_access_key = root_access_key
        self.root_secret = root_secret

    def principal(self, access_key_id: str, partition: str, session_token: str | None) -> Principal:
        if access_key_id == self.root_access_key:
            return Principal(
                f"arn:{partition}:iam::{self.account_id}:root", self.root_secret, None, (), root=True
            )
        from moto.iam.access_control import CreateAccessKeyFailure, create_access_key

        headers = {"X-Amz-Security-Token": session_token} if session_token else {}
        try:
            key = create_access_key(self.account_id, partition, access_key_id, headers)
        except CreateAccessKeyFailure:
            raise AuthError(
                "InvalidClientTokenId", "The security token included in the request is invalid."
            ) from None
        credentials = key.create_credentials()
        return Principal(
            key.arn,
            credentials.secret_key,
            credentials.token,
            tuple(policy_documents(key.collect_policies())),
        )


def policy_documents(policies: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    """JSON documents of what moto's collect_policies() returns (inline dicts, strings, managed policies)."""
    for policy in policies:
        document: Any = policy
        if hasattr(policy, "default_version"):
            document = policy.default_version.document
        elif isinstance(policy, Mapping) and "policy_document" in policy:
            document = policy["policy_document"]
        yield json.loads(document) if isinstance(document, str) else document


class MotoFacts(Facts):
    """The account state authorisation needs, read from moto's backends."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id

    def _ec2(self, region: str):
        from moto.ec2.models import ec2_backends

        return ec2_backends[self.account_id][region]

    def instance_tags(self, region: str, instance_id: str) -> Mapping[str, str]:
        tags = self._ec2(region).describe_tags(filters={"resource-id": [instance_id]})
        return {tag["key"]: tag["value"] for tag in tags}

    def instance_profile_role_arn(self, profile: str) -> str | None:
        from moto.iam.models import iam_backends

        backend = iam_backends[self.account_id]["aws"]
        try:
            found = (
                backend.get_instance_profile_by_arn(profile)
                if profile.startswith("arn:")
                else backend.get_instance_profile(profile)
            )
        except Exception:  # no such profile: RunInstances itself answers that
            return None
        return found.roles[0].arn if found.roles else None

    def partition_key(self, region: str, table: str) -> str | None:
        from moto.dynamodb.models import dynamodb_backends

        try:
            return (
                dynamodb_backends[self.account_id][region].get_table(table.rsplit("/", 1)[-1]).hash_key_attr
            )
        except Exception:  # no such table: the call itself answers that
            return None

    def default_subnet_id(self, region: str) -> str | None:
        subnets = self._ec2(region).get_default_subnets()
        return subnets[sorted(subnets)[0]].id if subnets else None

    def default_security_group_id(self, region: str) -> str | None:
        group = self._ec2(region).get_default_security_group()
        return group.id if group else None

    def role_exists(self, name: str) -> bool:
        from moto.iam.models import iam_backends

        return any(role.name == name for role in iam_backends[self.account_id]["aws"].get_roles())

    def launch_template(
        self, region: str, template_id: str | None, name: str | None, version: str | None
    ) -> LaunchTemplateFacts | None:
        backend = self._ec2(region)
        try:
            template = (
                backend.get_launch_template(template_id)
                if template_id
                else backend.get_launch_template_by_name(name)
            )
            data = template.get_version(version or "$Default").data
        except Exception:  # no such template or version: the call itself answers that
            return None
        return LaunchTemplateFacts(template.id, data, self.instance_tags(region, template.id))

    def default_subnet_ids(self, region: str) -> list[str]:
        subnets = self._ec2(region).get_default_subnets()
        return [subnets[zone].id for zone in sorted(subnets)]


def flatten(values: Mapping[str, list[str]]) -> dict[str, str]:
    return {key: items[0] if items else "" for key, items in values.items()}


def api_call(environ: Mapping[str, Any], body: bytes, region: str, service: str, account_id: str) -> ApiCall:
    """The request as ``iam.requests`` reads it."""
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "/")
    query = parse_query(environ.get("QUERY_STRING", ""))
    headers = {
        key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")
    }
    target = headers.get("x-amz-target")
    if target:  # JSON protocols: the operation is in the header, the parameters in the body
        operation = target.rsplit(".", 1)[-1]
        params = json.loads(body or b"{}")
    elif service == "s3":
        operation, params = method, {}
    else:  # query protocols: Action and parameters in the form body or the query string
        params = flatten(query)
        if body and "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            params.update(flatten(parse_qs(body.decode("utf-8"), keep_blank_values=True)))
        operation = params.get("Action", "")
    return ApiCall(
        service=service,
        region=region,
        account_id=account_id,
        operation=operation,
        params=params,
        method=method,
        path=path,
        query=query,
        headers=headers,
    )


def signature(environ: Mapping[str, Any], body: bytes, match: re.Match[str], principal: Principal) -> str:
    """The SigV4 signature the caller's secret gives this request (botocore's signer, as the SDK signs)."""
    signed = match["signed"].split(";")
    headers = {}
    for name in signed:
        key = (
            "CONTENT_TYPE"
            if name == "content-type"
            else "CONTENT_LENGTH"
            if name == "content-length"
            else None
        )
        value = environ.get(key) if key else environ.get("HTTP_" + name.upper().replace("-", "_"))
        if value is not None:
            headers[name] = value
    raw_path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    url = f"http://{environ.get('HTTP_HOST', '')}{raw_path}"
    request = AWSRequest(method=environ["REQUEST_METHOD"], url=url, data=body, headers=headers)
    request.context["timestamp"] = headers.get("x-amz-date", "")
    credentials = Credentials("-", principal.secret_access_key, principal.session_token)
    signer_class = S3SigV4Auth if match["service"] == "s3" else SigV4Auth
    signer = signer_class(credentials, match["service"], match["region"])
    if match["service"] == "s3":
        request.context["payload_signing_enabled"] = headers.get("x-amz-content-sha256") != "UNSIGNED-PAYLOAD"
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)


def denial_message(principal: Principal, request: AuthorizationRequest, decision: Decision) -> str:
    who = "User" if ":user/" in principal.arn or ":assumed-role/" in principal.arn else "Principal"
    why = (
        f"with an explicit deny in an identity-based policy (statement {decision.statement})"
        if decision.result == EXPLICIT_DENY
        else f"because no identity-based policy allows the {request.action} action"
    )
    resource = f" on resource: {request.resource}" if request.resource != "*" else ""
    return f"{who}: {principal.arn} is not authorized to perform: {request.action}{resource} {why}"


def error_response(
    service: str, code: str, message: str, status: int
) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line, headers, body) of AWS's error for ``service``."""
    request_id = str(uuid.uuid4())
    reason = {400: "Bad Request", 403: "Forbidden"}.get(status, "Error")
    if service in JSON_SERVICES:
        type_name = {
            ("sqs", "AccessDenied"): "com.amazon.coral.service#AccessDeniedException",
            ("dynamodb", "AccessDenied"): "com.amazon.coral.service#AccessDeniedException",
            ("pricing", "AccessDenied"): "com.amazon.coral.service#AccessDeniedException",
            ("logs", "AccessDenied"): "AccessDeniedException",
        }.get((service, code), f"com.amazon.coral.service#{code}")
        if service in ("dynamodb", "logs") and code == "AccessDenied":
            status, reason = 400, "Bad Request"
        body = json.dumps({"__type": type_name, "message": message, "Message": message}).encode()
        headers = [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-RequestId", request_id)]
        if service == "sqs":  # the query-compatible code botocore reports for SQS
            headers.append(("x-amzn-query-error", f"{code};Sender"))
        return f"{status} {reason}", headers, body
    if service == "ec2":
        ec2_code = "UnauthorizedOperation" if code == "AccessDenied" else "AuthFailure"
        text = (
            f"You are not authorized to perform this operation. {message}"
            if code == "AccessDenied"
            else message
        )
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{ec2_code}</Code>'
            f"<Message>{_xml(text)}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
        ).encode()
    elif service == "s3":
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{_xml(message)}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
    else:
        body = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{_xml(message)}</Message>"
            f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>"
        ).encode()
    return f"{status} {reason}", [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)], body


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class IamEnforcer:
    """WSGI middleware: authorises each request before ``app`` (moto) handles it."""

    def __init__(
        self,
        app: Callable,
        identities: MotoIdentities,
        facts: Facts,
        *,
        lock: threading.Lock | None = None,
        network_check: Callable[[str, str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.app = app
        self.identities = identities
        self.facts = facts
        # (caller's ARN, signing name, environ): holds and drops a request its caller's network does not
        # carry (ec2cluster_localcloud.blackhole.UnreachableGuard); it never reaches IAM, as on AWS.
        self.network_check = network_check
        # moto's EC2 backend is read while other threads write it: EC2's facts are read under its lock.
        self.lock = lock
        self.denied = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            return self.app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        match = AUTHORIZATION_RE.match(environ.get("HTTP_AUTHORIZATION", ""))
        service = match["service"] if match else "unknown"
        try:
            if match is None:
                raise AuthError("MissingAuthenticationToken", "Request is missing Authentication Token")
            self.authorize(environ, body, match)
        except AuthError as error:
            self.denied += 1
            log.info("IAM refused %s %s: %s", service, environ.get("PATH_INFO"), error.message)
            status, headers, payload = error_response(service, error.code, error.message, error.status)
            start_response(status, [*headers, ("Content-Length", str(len(payload)))])
            return [payload]
        return self.app(environ, start_response)

    def authorize(self, environ: Mapping[str, Any], body: bytes, match: re.Match[str]) -> None:
        region, service = match["region"], match["service"]
        partition = partition_of(region)
        principal = self.identities.principal(
            match["key"], partition, environ.get("HTTP_X_AMZ_SECURITY_TOKEN")
        )
        if self.network_check is not None and not principal.root:
            self.network_check(principal.arn, service, environ)
        if not hmac.compare_digest(signature(environ, body, match, principal), match["signature"]):
            raise AuthError(
                "SignatureDoesNotMatch" if service != "ec2" else "AuthFailure",
                "The request signature we calculated does not match the signature you provided. Check your "
                "AWS Secret Access Key and signing method.",
            )
        if principal.root:
            return
        call = api_call(environ, body, region, service, self.identities.account_id)
        if self.lock is not None and service == "ec2":  # EC2's facts (tags, subnets) under EC2's lock
            with self.lock:
                needed = authorizations(call, self.facts)
        else:
            needed = authorizations(call, self.facts)
        for request in needed:
            decision = evaluate(principal.policies, request)
            if not decision.allowed:
                raise AuthError("AccessDenied", denial_message(principal, request, decision))
