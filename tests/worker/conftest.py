"""Fixtures of the worker's tests against the moto server: a fresh state table and cluster id per test."""

from __future__ import annotations

import pytest

from .cloud import create_state_table, unique


@pytest.fixture
def state_table(aws_endpoint) -> str:
    return create_state_table()


@pytest.fixture
def cluster(aws_endpoint) -> str:
    return unique("wt")
