"""The local cloud's IAM evaluator against AWS's documented evaluation rules."""

from __future__ import annotations

import pytest
from ec2cluster_localcloud.iam.evaluate import (
    ALLOW,
    EXPLICIT_DENY,
    IMPLICIT_DENY,
    AuthorizationRequest,
    UnsupportedCondition,
    arn_match,
    condition_holds,
    evaluate,
    wildcard_match,
)

QUEUE = "arn:aws:sqs:us-east-1:123456789012:etl-1-tasks"
TABLE = "arn:aws:dynamodb:us-east-1:123456789012:table/ec2cluster-state"


def policy(*statements: dict) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action, resource, **extra) -> dict:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action, resource, **extra) -> dict:
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


def decide(policies, action, resource, **context) -> str:
    return evaluate(policies, AuthorizationRequest(action, resource, context)).result


def test_no_allow_means_deny_and_an_explicit_deny_wins():
    assert decide([], "sqs:SendMessage", QUEUE) == IMPLICIT_DENY
    assert decide([policy(allow("sqs:SendMessage", QUEUE))], "sqs:SendMessage", QUEUE) == ALLOW
    assert decide([policy(allow("sqs:SendMessage", QUEUE))], "sqs:DeleteQueue", QUEUE) == IMPLICIT_DENY
    # A Deny in any policy attached to the identity beats an Allow in another, whatever the order.
    both = [policy(allow("sqs:*", "*")), policy(deny("sqs:DeleteQueue", QUEUE))]
    assert decide(both, "sqs:DeleteQueue", QUEUE) == EXPLICIT_DENY
    assert decide(list(reversed(both)), "sqs:DeleteQueue", QUEUE) == EXPLICIT_DENY
    assert decide(both, "sqs:SendMessage", QUEUE) == ALLOW
    decision = evaluate(both, AuthorizationRequest("sqs:DeleteQueue", QUEUE))
    assert not decision.allowed and decision.statement == "#0"


def test_wildcards_in_actions_and_resources():
    # Actions: case-insensitive, * and ?.
    assert decide([policy(allow("SQS:send*", QUEUE))], "sqs:SendMessage", QUEUE) == ALLOW
    assert decide([policy(allow("sqs:?endMessage", QUEUE))], "sqs:SendMessage", QUEUE) == ALLOW
    # Resources: case-sensitive; * crosses ':' and '/' inside the resource part.
    assert (
        decide([policy(allow("sqs:SendMessage", "arn:aws:sqs:*:*:etl-*"))], "sqs:SendMessage", QUEUE) == ALLOW
    )
    upper = "arn:aws:sqs:us-east-1:123456789012:ETL-*"
    assert decide([policy(allow("sqs:SendMessage", upper))], "sqs:SendMessage", QUEUE) == IMPLICIT_DENY
    assert arn_match("arn:aws:dynamodb:*:*:table/*", TABLE)
    assert not arn_match("arn:aws:dynamodb:*:*:table/other", TABLE)
    assert not arn_match("arn:aws-cn:dynamodb:*:*:table/*", TABLE)  # partitions differ
    # A bracket is a literal in IAM, not a character class.
    assert wildcard_match("a[b]*", "a[b]c") and not wildcard_match("a[b]*", "abc")


def test_not_action_and_not_resource():
    everything_but = policy({"Effect": "Allow", "NotAction": "sqs:DeleteQueue", "Resource": "*"})
    assert decide([everything_but], "sqs:SendMessage", QUEUE) == ALLOW
    assert decide([everything_but], "sqs:DeleteQueue", QUEUE) == IMPLICIT_DENY
    not_here = policy({"Effect": "Deny", "Action": "sqs:*", "NotResource": QUEUE})
    assert decide([policy(allow("sqs:*", "*")), not_here], "sqs:SendMessage", QUEUE) == ALLOW
    other = QUEUE.replace("etl-1", "etl-2")
    assert decide([policy(allow("sqs:*", "*")), not_here], "sqs:SendMessage", other) == EXPLICIT_DENY
    # An action that takes no resource matches only Resource "*".
    assert decide(
        [policy(allow("ec2:DescribeInstances", "arn:aws:ec2:*:*:*"))], "ec2:DescribeInstances", "*"
    ) == (IMPLICIT_DENY)


def test_conditions_and_or_and_missing_keys():
    tagged = allow(
        "ec2:TerminateInstances",
        "*",
        Condition={"StringLike": {"aws:ResourceTag/ec2cluster:cluster-id": ["etl-*", "ml-*"]}},
    )
    ok = {"aws:ResourceTag/ec2cluster:cluster-id": ["ml-3"]}
    assert decide([policy(tagged)], "ec2:TerminateInstances", "*", **ok) == ALLOW  # values OR
    other = {"aws:ResourceTag/ec2cluster:cluster-id": ["web-1"]}
    assert decide([policy(tagged)], "ec2:TerminateInstances", "*", **other) == IMPLICIT_DENY
    assert decide([policy(tagged)], "ec2:TerminateInstances", "*") == IMPLICIT_DENY  # missing key: false
    # Keys are case-insensitive; operators AND; keys of one operator AND.
    two = allow(
        "iam:PassRole",
        "*",
        Condition={
            "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com", "aws:RequestedRegion": "us-east-1"}
        },
    )
    context = {"IAM:passedtoservice": ["ec2.amazonaws.com"], "aws:RequestedRegion": ["us-east-1"]}
    assert decide([policy(two)], "iam:PassRole", "*", **context) == ALLOW
    assert decide(
        [policy(two)], "iam:PassRole", "*", **{**context, "aws:RequestedRegion": ["eu-west-1"]}
    ) == (IMPLICIT_DENY)


def test_negated_ifexists_null_and_set_operators():
    # Negated operators: NOR over the values; a missing key makes them true.
    assert condition_holds("StringNotEquals", ["a", "b"], ["c"])
    assert not condition_holds("StringNotEquals", ["a", "b"], ["b"])
    assert condition_holds("StringNotLike", ["a*"], None)
    # IfExists: true when the key is missing, checked when present.
    assert condition_holds("StringEqualsIfExists", ["a"], None)
    assert not condition_holds("StringEqualsIfExists", ["a"], ["b"])
    # Null: "true" wants the key absent, "false" present.
    assert condition_holds("Null", ["true"], None) and not condition_holds("Null", ["true"], ["x"])
    assert condition_holds("Null", ["false"], ["x"]) and not condition_holds("Null", ["false"], None)
    # ForAllValues: every request value in the set; an absent key passes (AWS's documented pitfall).
    leading = ["C#etl-*#W", "C#etl-*#T#*"]
    assert condition_holds("ForAllValues:StringLike", leading, ["C#etl-1#W", "C#etl-1#T#003"])
    assert not condition_holds("ForAllValues:StringLike", leading, ["C#etl-1#W", "C#etl-1"])
    assert condition_holds("ForAllValues:StringLike", leading, None)
    # ForAnyValue: at least one; an absent key fails.
    assert condition_holds("ForAnyValue:StringEquals", ["x"], ["y", "x"])
    assert not condition_holds("ForAnyValue:StringEquals", ["x"], None)
    assert condition_holds("Bool", ["true"], ["True"]) and condition_holds("NumericLessThan", ["10"], ["9"])
    with pytest.raises(UnsupportedCondition):
        condition_holds("DateGreaterThan", ["2026-01-01T00:00:00Z"], ["2027-01-01T00:00:00Z"])
    with pytest.raises(UnsupportedCondition):
        condition_holds("ForSomeValues:StringEquals", ["x"], ["x"])
