"""Fixtures shared by every test: fake credentials, no instance metadata, and a moto server on loopback."""

from __future__ import annotations

import logging
import os

import pytest

# Set before anything imports boto3: tests never reach real AWS or instance metadata.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def moto_server():
    """A moto server in this process on 127.0.0.1 (free port); yields its endpoint URL.

    State is shared by the whole session: tests use unique cluster ids and resource names.
    """
    from ec2cluster_localcloud.server import make_ec2_like_aws, make_logs_like_aws
    from moto.server import ThreadedMotoServer

    make_ec2_like_aws()  # AWS's EC2 behaviours the local cloud adds to moto (a default VPC's gateway...)
    make_logs_like_aws()  # CloudWatch Logs' JSON filter patterns
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()


@pytest.fixture
def logging_restored():
    """For a test that runs the ``ec2cluster`` command in-process: ``main`` points stdlib logging and
    structlog at the test's captured stderr, closed after the test; later tests in the process (an xdist
    worker runs many) must log where they did before."""
    import structlog

    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    yield
    root.handlers, root.level = handlers, level
    structlog.configure(**config)


@pytest.fixture
def aws_endpoint(moto_server, monkeypatch):
    """Point boto3 (and child processes) at the session's moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


# The reliability suite shares one local cloud (a session fixture): its tests run on one xdist worker
# (`make test` runs two), one at a time, so their many worker processes do not starve each other's
# heartbeats and idle timers on a 2-core machine. The real deployment and the e2e worker test, each with a
# cloud of its own, run as the group "deployment", which the other worker takes: the two sides balance (the
# reliability suite alone is about 900 s).
LOCAL_CLOUD_GROUPS = {
    "tests/reliability/": "local-cloud",
    "tests/deployment/": "deployment",
    "tests/localcloud/test_e2e_workers.py": "deployment",
}


@pytest.hookimpl(trylast=True)  # after xdist's own hook, and after every xdist_group mark is on its item
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.replace("\\", "/")
        for prefix, group in LOCAL_CLOUD_GROUPS.items():
            if path.startswith(prefix) and not any(item.iter_markers("xdist_group")):
                item.add_marker(pytest.mark.xdist_group(group))
    if getattr(config.option, "loadgroup", False):  # set on an xdist worker under --dist loadgroup
        for item in items:
            _name_xdist_group(item)


def _name_xdist_group(item: pytest.Item) -> None:
    """Give the item's node id the ``@<group>`` suffix by which --dist loadgroup sends a group to one worker.

    xdist (3.8) adds it by writing ``item._nodeid``, which pytest 9.2's structured node ids no longer read
    (pytest-dev/pytest-xdist#1386): every xdist_group mark was ignored, each test scheduled on its own, and a
    module-scoped fixture set up once on each worker. Here the suffix is set as xdist would have, once.
    """
    names = {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }
    if not names:
        return
    suffix = "@" + "_".join(sorted(names))
    if item.nodeid.endswith(suffix):  # xdist's own suffix took effect (a pytest before 9.2)
        return
    if hasattr(item, "_id"):  # pytest 9.2+: the node id is a structured NodeId
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(item.nodeid + suffix)
    else:
        item._nodeid = item.nodeid + suffix
