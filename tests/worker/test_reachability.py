"""The start-up reachability check: a subnet with no way to a service stops the worker at once, saying which.

Loopback only: an accepting listener (reachable), a closed port (refused), and a "blackhole" (a listener whose
accept queue is full, so the kernel drops the next SYN and the connect times out, as in a subnet with no
route). The worker runs against the session's moto server (ThreadedMotoServer on 127.0.0.1).
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from ec2cluster_worker import reachability
from ec2cluster_worker.config import ConfigError, WorkerConfig
from ec2cluster_worker.logs import EventLog
from ec2cluster_worker.reachability import (
    CONSOLE_FAILURE_PREFIX,
    check,
    console_line,
    endpoint_of,
    failure_from_console,
    probe,
    services_needed,
    unreachable_reason,
)
from ec2cluster_worker.runtime import EXIT_STARTUP_FAILED, run_worker
from ec2cluster_worker.status import startup_failure_reason

from .cloud import REGION, unique, worker_config, worker_env, worker_statuses

TIMEOUT = 0.5
CONFIG = {
    "cluster_id": "c-1",
    "region": "us-east-1",
    "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/ec2cluster-c-1-tasks",
    "handler": {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
}
ENDPOINT_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_S3",
)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")


# --- loopback endpoints


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel completes them; nobody needs to accept)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 whose connects time out: listen(0) with its accept queue filled by two connects."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, server]:
        sock.close()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No endpoint or proxy variables and no AWS config file: botocore resolves AWS's own endpoints."""
    for name in (*ENDPOINT_VARIABLES, *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return monkeypatch


# --- pure


def test_services_needed_follow_the_output():
    assert services_needed(WorkerConfig.from_dict(CONFIG)) == ["dynamodb", "sqs"]
    table_output = {**CONFIG, "output": {"type": "dynamodb", "table": "results"}}
    assert services_needed(WorkerConfig.from_dict(table_output)) == ["dynamodb", "sqs"]
    s3_output = {**CONFIG, "output": {"type": "s3", "bucket": "my-bucket"}}
    assert services_needed(WorkerConfig.from_dict(s3_output)) == ["dynamodb", "sqs", "s3"]
    custom = {**CONFIG, "output": {"type": "custom", "target": "pkg.sinks:Sink"}}
    assert services_needed(WorkerConfig.from_dict(custom)) == ["dynamodb", "sqs"]


def test_the_reason_for_a_service_with_no_route_says_the_fixes():
    problems = {"sqs": "sqs.us-east-1.amazonaws.com:443: connection timed out after 5 s"}
    assert unreachable_reason(problems) == (
        "cannot reach sqs (sqs.us-east-1.amazonaws.com:443): connection timed out after 5 s; "
        "this subnet needs a route to it: a NAT gateway, a VPC endpoint for sqs, or a public IP with an "
        "internet gateway (and security groups that allow outbound TCP 443)"
    )


def test_the_reason_is_the_same_whatever_order_the_problems_came_in():
    problems = {
        "s3": "s3.amazonaws.com:443: connection timed out after 5 s",
        "sqs": "sqs.us-east-1.amazonaws.com:443: connection timed out after 5 s",
        "dynamodb": "dynamodb.us-east-1.amazonaws.com:443: network is unreachable",
    }
    reason = unreachable_reason(problems)
    assert reason == unreachable_reason(dict(reversed(list(problems.items()))))
    assert reason.index("cannot reach dynamodb") < reason.index("cannot reach sqs") < reason.index("reach s3")
    assert "a route to them: a NAT gateway, VPC endpoints for dynamodb, sqs and s3, or a public IP" in reason
    assert "\n" not in reason


def test_the_reason_for_refused_and_unresolved_endpoints_points_at_the_url_and_dns():
    reason = unreachable_reason(
        {"sqs": "127.0.0.1:9: connection refused", "dynamodb": "db.example.invalid:443: name not resolved"}
    )
    assert reason == (
        "cannot reach dynamodb (db.example.invalid:443): name not resolved; "
        "cannot reach sqs (127.0.0.1:9): connection refused; "
        "the name of dynamodb does not resolve: check the endpoint URL and the VPC's DNS "
        "(enableDnsSupport; private DNS on an interface endpoint); "
        "nothing accepts connections at sqs's address: check the endpoint URL"
    )


def test_the_console_line_carries_the_stop_reason_on_one_line():
    stop_reason = startup_failure_reason("cannot reach sqs (h:443): connection timed out after 5 s", "i-0abc")
    line = console_line(stop_reason)
    assert line == "ec2cluster: startup-failed: cannot reach sqs (h:443): connection timed out after 5 s"
    assert line == "ec2cluster: " + stop_reason
    assert line.startswith(CONSOLE_FAILURE_PREFIX)
    # what the controller reads back is the reason the status item records
    assert startup_failure_reason(failure_from_console(line)) == stop_reason
    assert (
        console_line("startup-failed: line one\n  line two") == CONSOLE_FAILURE_PREFIX + "line one | line two"
    )


def test_the_last_failure_line_of_console_output_wins():
    console = "\n".join(
        [
            "[    2.1] Booting",
            "ec2cluster: startup-failed: first",
            "[   31.2] cloud-init[1021]: ec2cluster: startup-failed: cannot reach sqs (h:443): refused  ",
            "[   31.9] reboot: Power down",
            "",
        ]
    )
    assert failure_from_console(console) == "cannot reach sqs (h:443): refused"
    assert failure_from_console("[    2.1] Booting\nec2cluster: worker started\n") is None
    assert failure_from_console("ec2cluster: startup-failed:   \n") is None
    assert failure_from_console("") is None


def test_the_startup_check_can_be_turned_off_and_its_timeout_set():
    config = WorkerConfig.from_dict(CONFIG)
    assert (config.startup_check, config.startup_check_timeout_seconds) == (True, 5)
    changed = WorkerConfig.from_dict({**CONFIG, "startup_check": False, "startup_check_timeout_seconds": 1.5})
    assert (changed.startup_check, changed.startup_check_timeout_seconds) == (False, 1.5)
    assert WorkerConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ConfigError, match="startup_check: 'no' is not a boolean"):
        WorkerConfig.from_dict({**CONFIG, "startup_check": "no"})
    with pytest.raises(ConfigError, match="startup_check_timeout_seconds: 0 is out of range"):
        WorkerConfig.from_dict({**CONFIG, "startup_check_timeout_seconds": 0})


# --- probe


def test_probe_connects_to_a_listener(listener):
    assert probe("127.0.0.1", listener, TIMEOUT) is None


def test_probe_reports_a_refused_connection(closed_port):
    assert probe("127.0.0.1", closed_port, TIMEOUT) == "connection refused"


def test_probe_reports_a_timeout_with_its_limit(blackhole):
    assert probe("127.0.0.1", blackhole, TIMEOUT) == "connection timed out after 0.5 s"


def test_probe_reports_a_name_that_does_not_resolve(monkeypatch):
    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)  # no resolver is asked
    assert probe("sqs.example.invalid", 443, TIMEOUT) == "name not resolved"


# --- endpoints and the check


def test_endpoints_are_the_regions_own_by_default(clean_env):
    assert endpoint_of("sqs", "eu-west-1") == (
        "https://sqs.eu-west-1.amazonaws.com",
        "sqs.eu-west-1.amazonaws.com",
        443,
    )
    assert endpoint_of("dynamodb", "eu-west-1")[1:] == ("dynamodb.eu-west-1.amazonaws.com", 443)


def test_endpoints_honour_the_service_variable_over_the_global_one(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    clean_env.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9324")
    assert endpoint_of("sqs", REGION) == ("http://127.0.0.1:9324", "127.0.0.1", 9324)
    assert endpoint_of("dynamodb", REGION) == ("http://127.0.0.1:4566", "127.0.0.1", 4566)
    assert endpoint_of("s3", REGION)[1:] == ("127.0.0.1", 4566)


def test_check_names_only_what_it_cannot_reach(clean_env, listener, blackhole):
    clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener}")
    clean_env.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{blackhole}")
    assert check(["dynamodb", "sqs", "s3"], REGION, TIMEOUT) == {
        "sqs": f"127.0.0.1:{blackhole}: connection timed out after 0.5 s"
    }
    assert check(["dynamodb", "s3"], REGION, TIMEOUT) == {}


def test_check_probes_every_service_at_once(clean_env, listener, monkeypatch):
    clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener}")
    together = threading.Barrier(3, timeout=10)  # broken unless all three probes run at the same time

    def probe_together(host, port, timeout):
        together.wait()
        return "connection timed out after 5 s"

    monkeypatch.setattr(reachability, "probe", probe_together)
    assert set(check(["dynamodb", "sqs", "s3"], REGION, TIMEOUT)) == {"dynamodb", "sqs", "s3"}


def test_check_goes_through_the_proxy_botocore_would_use(clean_env, listener, closed_port):
    clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener}")
    clean_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    assert check(["sqs"], REGION, TIMEOUT) == {
        "sqs": f"127.0.0.1:{listener} via proxy 127.0.0.1:{closed_port}: connection refused"
    }
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    assert check(["sqs"], REGION, TIMEOUT) == {}


# --- the worker's start-up


def run_worker_process(config: dict, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m ec2cluster_worker`` to its exit, stdout and stderr apart."""
    return subprocess.run(
        [sys.executable, "-m", "ec2cluster_worker", "--config", json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_failures(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(CONSOLE_FAILURE_PREFIX)]


def test_a_worker_that_cannot_reach_sqs_stops_at_once_and_says_so(cluster, state_table, blackhole):
    queue_url = f"http://127.0.0.1:{blackhole}/123456789012/{cluster}-tasks"
    config = worker_config(cluster, queue_url, state_table, startup_check_timeout_seconds=TIMEOUT)
    reason = unreachable_reason({"sqs": f"127.0.0.1:{blackhole}: connection timed out after 0.5 s"})
    assert "a VPC endpoint for sqs" in reason
    blackholed = {"AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{blackhole}"}
    # Two workers failing alike record the same reason, whatever their ids: the drain compares them.
    runs = {}
    threads = [
        threading.Thread(
            target=lambda worker_id=worker_id: runs.update(
                {worker_id: run_worker_process(config, worker_env(worker_id, **blackholed))}
            )
        )
        for worker_id in ("i-0aaa", "i-0bbb")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = worker_statuses(state_table, cluster)
    for worker_id, run in runs.items():
        assert run.returncode == EXIT_STARTUP_FAILED, run.stderr
        assert console_failures(run.stdout) == [CONSOLE_FAILURE_PREFIX + reason], run.stdout
        assert failure_from_console(run.stdout) == reason
        assert statuses[worker_id]["state"] == "stopped"
        assert statuses[worker_id]["stop_reason"] == f"startup-failed: {reason}"
        events = [json.loads(line) for line in run.stderr.splitlines()]
        failed = [event for event in events if event["event"] == "worker.startup_failed"]
        assert [event["error"] for event in failed] == [reason]
        assert not any(event["event"] == "worker.running" for event in events)


def test_a_worker_that_cannot_reach_dynamodb_either_only_says_so_on_its_console(
    cluster, state_table, blackhole
):
    queue_url = f"http://127.0.0.1:{blackhole}/123456789012/{cluster}-tasks"
    config = worker_config(cluster, queue_url, state_table, startup_check_timeout_seconds=TIMEOUT)
    env = worker_env(
        "i-0ccc",
        AWS_ENDPOINT_URL_SQS=f"http://127.0.0.1:{blackhole}",
        AWS_ENDPOINT_URL_DYNAMODB=f"http://127.0.0.1:{blackhole}",
    )

    run = run_worker_process(config, env)

    assert run.returncode == EXIT_STARTUP_FAILED, run.stderr
    target = f"127.0.0.1:{blackhole}"
    reason = unreachable_reason(
        {
            "dynamodb": f"{target}: connection timed out after 0.5 s",
            "sqs": f"{target}: connection timed out after 0.5 s",
        }
    )
    assert console_failures(run.stdout) == [CONSOLE_FAILURE_PREFIX + reason]
    assert "VPC endpoints for dynamodb and sqs" in reason
    assert worker_statuses(state_table, cluster) == {}  # the moto server's DynamoDB never heard from it


def test_a_healthy_start_checks_and_goes_on(cluster, state_table, capsys):
    queue_url = f"http://127.0.0.1:1/123456789012/{cluster}-tasks"  # never called: the handler fails first
    config = WorkerConfig.from_dict(
        worker_config(
            cluster, queue_url, state_table, handler={"type": "python", "target": "no_such_mod:run"}
        )
    )
    stream = io.StringIO()

    assert (
        run_worker(config, environ={"EC2CLUSTER_WORKER_ID": "w-1"}, log=EventLog(stream))
        == EXIT_STARTUP_FAILED
    )

    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    [checked] = [event for event in events if event["event"] == "worker.startup_check"]
    assert checked["services"] == ["dynamodb", "sqs"] and checked["unreachable"] == {}
    # A handler that does not load is a start-up failure too: one console line, the status item's reason.
    stop_reason = worker_statuses(state_table, cluster)["w-1"]["stop_reason"]
    assert stop_reason.startswith("startup-failed: handler.target: cannot import module 'no_such_mod'")
    assert console_failures(capsys.readouterr().out) == [console_line(stop_reason)]


def test_the_check_can_be_skipped(cluster, state_table, capsys):
    queue_url = f"http://127.0.0.1:1/123456789012/{cluster}-tasks"
    config = WorkerConfig.from_dict(
        worker_config(
            cluster,
            queue_url,
            state_table,
            handler={"type": "python", "target": "no_such_mod:run"},
            startup_check=False,
        )
    )
    stream = io.StringIO()
    assert run_worker(config, environ={"EC2CLUSTER_WORKER_ID": unique("w")}, log=EventLog(stream)) == 3
    assert '"worker.startup_check"' not in stream.getvalue()
