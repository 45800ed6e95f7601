"""S3: object URIs."""

from __future__ import annotations

from urllib.parse import urlparse


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); a ValueError that shows the form otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.lstrip("/"):
        raise ValueError(f"{uri!r} is not an S3 object URI: write it as s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")
