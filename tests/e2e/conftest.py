"""The example DAG's end-to-end tests share one migrated Airflow metadata DB (migrating takes ~30 s)."""

from __future__ import annotations

import pytest

from airflow_ec2cluster import demo

# A tenth of the demo's tweets: enough for several batches on every worker, quick to drain.
TWEETS = 300


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    assert demo.migrate_airflow_db(home), "airflow db migrate failed"
    return home
