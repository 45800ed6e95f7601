"""AWS calls as values: code that needs AWS yields a :class:`Call` and is sent its result.

Written once, such a generator runs blocking on the hook (``run_sync``: a sensor's poke, an operator) or
awaited on aiobotocore clients (``run_async``: the trigger); both sides build their requests with the same
builders (``tests/plugin/test_io_parity.py``).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One AWS call: a method of the hook (sync) or of AsyncClusterIO (async), and its arguments."""

    name: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def call(name: str, *args: Any, **kwargs: Any) -> Call:
    return Call(name, args, kwargs)


def run_sync(calls: Generator[Call, Any, T], io: Any) -> T:
    """Drive a generator of calls with blocking calls on ``io`` (the hook)."""
    try:
        request = next(calls)
        while True:
            request = calls.send(getattr(io, request.name)(*request.args, **request.kwargs))
    except StopIteration as stop:
        return stop.value


async def run_async(calls: Generator[Call, Any, T], io: Any) -> T:
    """Drive a generator of calls with awaited calls on ``io`` (an AsyncClusterIO)."""
    try:
        request = next(calls)
        while True:
            request = calls.send(await getattr(io, request.name)(*request.args, **request.kwargs))
    except StopIteration as stop:
        return stop.value
