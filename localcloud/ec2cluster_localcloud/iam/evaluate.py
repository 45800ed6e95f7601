"""IAM's evaluation of identity-based policies for one request, as AWS documents it (pure: no calls).

A request is authorised when some statement allows it and no statement denies it: an explicit Deny wins,
and no Allow means an implicit deny. A statement applies when its Action (or NotAction) matches the
action, its Resource (or NotResource) matches the resource, and every condition holds: condition operators
AND, keys of one operator AND, values of one key OR (NOR for negated operators). A key missing from the
request makes a condition false, and a negated one true, except for ``...IfExists`` (true when missing) and
``Null``; ``ForAllValues:`` holds for a missing key, ``ForAnyValue:`` does not.

Wildcards: ``*`` any run of characters, ``?`` any one; actions compare case-insensitively, resources and
string conditions case-sensitively (``...IgnoreCase`` aside). ARNs are split with policyuniverse, so that
``ArnLike`` matches part by part, as IAM does.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from policyuniverse.arn import ARN

ALLOW = "allow"
EXPLICIT_DENY = "explicit-deny"
IMPLICIT_DENY = "implicit-deny"


@dataclass(frozen=True)
class AuthorizationRequest:
    """One action on one resource, with the request's condition keys (each a list of values)."""

    action: str  # service:Action
    resource: str  # an ARN, or "*" for actions that take no resource
    context: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    result: str  # ALLOW, EXPLICIT_DENY or IMPLICIT_DENY
    statement: str | None = None  # the Sid (or position) of the deciding statement

    @property
    def allowed(self) -> bool:
        return self.result == ALLOW


@lru_cache(maxsize=4096)
def _pattern(text: str, ignore_case: bool) -> re.Pattern[str]:
    # fnmatch knows [seq]; IAM does not: escape brackets, then translate * and ?.
    escaped = text.replace("[", "[[]")
    return re.compile(fnmatch.translate(escaped), re.IGNORECASE if ignore_case else 0)


def wildcard_match(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    return _pattern(pattern, ignore_case).match(value) is not None


def arn_match(pattern: str, value: str) -> bool:
    """ArnLike: the six parts of the ARN match part by part (the resource part may hold ':' and '/')."""
    if pattern == "*":
        return True
    pattern_parts, value_parts = pattern.split(":", 5), value.split(":", 5)
    if len(pattern_parts) != 6 or len(value_parts) != 6:
        return wildcard_match(pattern, value)
    if ARN(value).error:
        return False
    return all(wildcard_match(p, v) for p, v in zip(pattern_parts, value_parts, strict=True))


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def evaluate(policies: Iterable[Mapping[str, Any]], request: AuthorizationRequest) -> Decision:
    """The decision for ``request`` under the identity's policies."""
    allowed_by: str | None = None
    for policy in policies:
        for position, statement in enumerate(as_list(policy.get("Statement"))):
            if not statement_applies(statement, request):
                continue
            sid = statement.get("Sid") or f"#{position}"
            if statement.get("Effect") == "Deny":
                return Decision(EXPLICIT_DENY, sid)
            if statement.get("Effect") == "Allow" and allowed_by is None:
                allowed_by = sid
    return Decision(ALLOW, allowed_by) if allowed_by is not None else Decision(IMPLICIT_DENY)


def statement_applies(statement: Mapping[str, Any], request: AuthorizationRequest) -> bool:
    if "Action" in statement:
        if not any(action_match(p, request.action) for p in as_list(statement["Action"])):
            return False
    elif "NotAction" in statement:
        if any(action_match(p, request.action) for p in as_list(statement["NotAction"])):
            return False
    else:
        return False
    if "Resource" in statement:
        if not any(resource_match(p, request.resource) for p in as_list(statement["Resource"])):
            return False
    elif "NotResource" in statement:
        if any(resource_match(p, request.resource) for p in as_list(statement["NotResource"])):
            return False
    else:
        return False
    return conditions_hold(statement.get("Condition") or {}, request.context)


def action_match(pattern: str, action: str) -> bool:
    return wildcard_match(pattern, action, ignore_case=True)


def resource_match(pattern: str, resource: str) -> bool:
    if pattern == "*":
        return True
    if resource == "*":  # an action without resources matches only Resource "*"
        return False
    return arn_match(pattern, resource)


# Condition operators: name -> (compare(policy value, request value), negated)
def _string_equals(p: str, v: str) -> bool:
    return p == v


def _string_equals_ignore_case(p: str, v: str) -> bool:
    return p.lower() == v.lower()


def _string_like(p: str, v: str) -> bool:
    return wildcard_match(p, v)


def _bool(p: str, v: str) -> bool:
    return str(p).lower() == str(v).lower()


def _numeric(compare):
    def check(p: str, v: str) -> bool:
        try:
            return compare(float(v), float(p))
        except ValueError:
            return False

    return check


OPERATORS = {
    "StringEquals": (_string_equals, False),
    "StringNotEquals": (_string_equals, True),
    "StringEqualsIgnoreCase": (_string_equals_ignore_case, False),
    "StringNotEqualsIgnoreCase": (_string_equals_ignore_case, True),
    "StringLike": (_string_like, False),
    "StringNotLike": (_string_like, True),
    "ArnEquals": (arn_match, False),
    "ArnLike": (arn_match, False),
    "ArnNotEquals": (arn_match, True),
    "ArnNotLike": (arn_match, True),
    "Bool": (_bool, False),
    "NumericEquals": (_numeric(lambda v, p: v == p), False),
    "NumericNotEquals": (_numeric(lambda v, p: v == p), True),
    "NumericLessThan": (_numeric(lambda v, p: v < p), False),
    "NumericLessThanEquals": (_numeric(lambda v, p: v <= p), False),
    "NumericGreaterThan": (_numeric(lambda v, p: v > p), False),
    "NumericGreaterThanEquals": (_numeric(lambda v, p: v >= p), False),
}


class UnsupportedCondition(ValueError):
    """A condition operator this evaluator does not implement: refused rather than guessed."""


def conditions_hold(
    conditions: Mapping[str, Mapping[str, Any]], context: Mapping[str, Sequence[str]]
) -> bool:
    lowered = {key.lower(): list(values) for key, values in context.items()}  # keys are case-insensitive
    for operator, keys in conditions.items():
        for key, policy_values in keys.items():
            if not condition_holds(operator, as_list(policy_values), lowered.get(key.lower())):
                return False
    return True


def condition_holds(operator: str, policy_values: list[Any], values: list[str] | None) -> bool:
    qualifier, _, name = operator.rpartition(":")
    if name == "Null":
        wants_absent = str(policy_values[0]).lower() == "true"
        return (not values) == wants_absent
    if_exists = name.endswith("IfExists")
    name = name[: -len("IfExists")] if if_exists else name
    if name not in OPERATORS:
        raise UnsupportedCondition(f"condition operator {operator!r} is not supported by the local cloud")
    compare, negated = OPERATORS[name]
    policy_values = [str(p) for p in policy_values]
    if qualifier == "ForAllValues":
        # Every request value must match (negated: must match none); holds for a missing key.
        if not values:
            return True
        matches = [any(compare(p, v) for p in policy_values) for v in values]
        return all(not m for m in matches) if negated else all(matches)
    if qualifier == "ForAnyValue":
        if not values:
            return False
        matches = [any(compare(p, v) for p in policy_values) for v in values]
        return any(not m for m in matches) if negated else any(matches)
    if qualifier:
        raise UnsupportedCondition(f"condition qualifier {qualifier!r} is not one of IAM's")
    if not values:
        return if_exists or negated
    matched = any(compare(p, v) for p in policy_values for v in values)
    return not matched if negated else matched
