"""S3: object URIs, their checks, and what a failed HeadObject means for the user."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

S3_SCHEME = "s3://"
# Bucket names S3 accepts (botocore's own check allows the legacy us-east-1 names with upper case and _
# too, up to 255 characters; those still exist, so they are not refused here).
BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
MAX_KEY_BYTES = 1024
NOT_FOUND_CODES = ("404", "NoSuchKey", "NoSuchBucket", "NotFound")
FORBIDDEN_CODES = ("403", "AccessDenied", "Forbidden")
URI_FIX = "write it as s3://bucket/key"


def s3_uri_problem(uri: Any) -> str | None:
    """Why ``uri`` cannot name an S3 object (naming the ``s3_uri`` field and the fix), or None."""
    if not isinstance(uri, str):
        return f"s3_uri: {uri!r} is a {type(uri).__name__}, not text: {URI_FIX}"
    if not uri.startswith(S3_SCHEME):
        return f"s3_uri: {uri!r} is not an S3 object URI: {URI_FIX}"
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket or not key:
        return f"s3_uri: {uri!r} names no {'bucket' if not bucket else 'object key'}: {URI_FIX}"
    if bucket != bucket.strip() or not BUCKET_RE.match(bucket) or ".." in bucket or is_ip_address(bucket):
        return (
            f"s3_uri: bucket {bucket!r} of {uri!r} is not a valid bucket name: use 3-63 lowercase letters, "
            "digits, '.' and '-', starting and ending with a letter or digit (not an IP address)"
        )
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"s3_uri: the key of {uri[:80]!r}... is over S3's {MAX_KEY_BYTES} bytes: use a shorter key"
    return None


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); a ValueError that names the field and the fix otherwise.

    The key is everything after the bucket, ``?`` and ``#`` included (both are legal in S3 keys).
    """
    problem = s3_uri_problem(uri)
    if problem:
        raise ValueError(problem)
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    return bucket, key


def head_object_params(uri: str) -> dict[str, Any]:
    bucket, key = parse_s3_uri(uri)
    return {"Bucket": bucket, "Key": key}


def head_object_problem(uri: str, code: str) -> str | None:
    """What a HeadObject error ``code`` on ``uri`` tells the user to fix; None for an error of another kind.

    HeadObject answers with the bare HTTP status (no body), so 404 is "no such key or bucket" and 403 is
    "not allowed", which is also S3's answer for a missing key when the caller may not list the bucket.
    """
    bucket, key = parse_s3_uri(uri)
    if code in NOT_FOUND_CODES:
        return f"s3_uri: there is no object {uri}: check the bucket and key (S3 HeadObject: not found)"
    if code in FORBIDDEN_CODES:
        return (
            f"s3_uri: {uri} cannot be read with this connection (S3 HeadObject: forbidden): grant "
            f"s3:GetObject on key {key!r} of bucket {bucket!r} (S3 also answers forbidden for a missing "
            "object when s3:ListBucket is not granted: check the key too)"
        )
    return None


# The cluster's bundle (airflow_ec2cluster.bundle): one object per cluster and SHA-256, under a prefix.


def bundle_object_key(prefix: str, cluster_id: str, sha256: str) -> str:
    return f"{cluster_bundles_prefix(prefix, cluster_id)}{sha256}.zip"


def cluster_bundles_prefix(prefix: str, cluster_id: str) -> str:
    """Where a cluster's bundles are: the teardown deletes what is under it."""
    return f"{prefix.rstrip('/')}/{cluster_id}/" if prefix.strip("/") else f"{cluster_id}/"


def create_bucket_params(bucket: str, region: str) -> dict[str, Any]:
    """CreateBucket in ``region`` (us-east-1 takes no location constraint: S3 refuses one)."""
    params: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    return params


BLOCK_PUBLIC_ACCESS = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}


def bundle_bucket_problem(bucket: str, code: str) -> str | None:
    """What a HeadBucket error on the bundle bucket tells the user; None when the bucket is simply absent."""
    if code in NOT_FOUND_CODES:
        return None
    if code in FORBIDDEN_CODES:
        return (
            f"bundle_bucket: bucket {bucket!r} exists but this connection may not use it (S3 HeadBucket: "
            "forbidden; another account may own the name): grant s3:ListBucket on it, or name a bucket of "
            "this account as bundle_bucket"
        )
    return f"bundle_bucket: S3 HeadBucket on {bucket!r} failed with {code}"
