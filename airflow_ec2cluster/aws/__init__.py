"""Pure request builders and answer parsers, one module per AWS service: no clients, no I/O.

Each function takes plain data and returns the keyword arguments of one API call (``*_params``), or turns an
answer into what the controller uses. The sync hook (:mod:`airflow_ec2cluster.hooks.ec2cluster`) and the
triggerer's async IO (:mod:`airflow_ec2cluster.hooks.async_io`) make their calls with these same builders,
so both send identical requests. The META item's requests are in :mod:`airflow_ec2cluster.meta`.
"""

from __future__ import annotations

from collections.abc import Iterator

from botocore.exceptions import ClientError


def error_code(error: ClientError) -> str:
    """The AWS error code of a ``ClientError`` (``""`` when it has none)."""
    return error.response.get("Error", {}).get("Code", "")


def chunks(items: list, size: int) -> Iterator[list]:
    """``items`` in consecutive slices of at most ``size`` (the per-request limits of batch calls)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
