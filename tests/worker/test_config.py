"""WorkerConfig: every field validated, every error naming its field and the fix."""

from __future__ import annotations

import json

import pytest
from ec2cluster_worker.config import (
    CONFIG_ENV,
    CommandHandlerSpec,
    ConfigError,
    CustomOutputSpec,
    DynamoDBOutputSpec,
    PythonHandlerSpec,
    S3OutputSpec,
    WorkerConfig,
)

MINIMAL = {
    "cluster_id": "my-dag-run-1",
    "region": "eu-west-1",
    "queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/my-dag-run-1-tasks",
    "handler": {"type": "python", "target": "ec2cluster_worker.examples:count_smileys"},
}


def with_(**changes):
    document = dict(MINIMAL)
    document.update(changes)
    return document


def error_for(document) -> str:
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_dict(document)
    return str(caught.value)


def test_defaults_match_the_design():
    config = WorkerConfig.from_dict(MINIMAL)
    assert config.state_table == "ec2cluster-state"
    assert config.output == DynamoDBOutputSpec()
    assert (config.task_timeout_seconds, config.visibility_timeout_seconds, config.heartbeat_seconds) == (
        900,
        120,
        15,
    )
    assert (config.idle_shutdown_seconds, config.max_lifetime_seconds, config.wait_time_seconds) == (
        300,
        0,
        20,
    )
    assert (config.max_messages, config.log_shards, config.retention_seconds) == (10, 16, 2592000)
    assert (config.stop_on_rebalance, config.stop_when_queue_empty) == (True, True)
    assert config.handler == PythonHandlerSpec("ec2cluster_worker.examples:count_smileys")


FULL = with_(
    state_table="other.table_1",
    handler={"type": "command", "argv": ["python3", "-c", "print(1)", "{payload}"], "payload": "argv"},
    output={"type": "s3", "bucket": "my-bucket", "prefix": "results", "per": "batch"},
    task_timeout_seconds=1.5,
    visibility_timeout_seconds=43200,
    heartbeat_seconds=0.5,
    idle_shutdown_seconds=60,
    max_lifetime_seconds=3600,
    wait_time_seconds=0,
    max_messages=1,
    log_shards=1000,
    retention_seconds=86400,
    stop_on_rebalance=False,
    stop_when_queue_empty=False,
)


@pytest.mark.parametrize(
    "document",
    [
        MINIMAL,
        FULL,
        with_(output={"type": "dynamodb", "table": "results-table"}),
        with_(output={"type": "custom", "target": "pkg.sinks:Sink", "options": {"a": [1, 2]}}),
        with_(handler={"type": "command", "argv": ["cat"]}),
    ],
)
def test_round_trip(document):
    config = WorkerConfig.from_dict(document)
    assert WorkerConfig.from_dict(config.to_dict()) == config
    assert WorkerConfig.from_json(config.to_json()) == config
    json.dumps(config.to_dict())  # plain JSON


def test_full_document_parses_every_field():
    config = WorkerConfig.from_dict(FULL)
    assert config.handler == CommandHandlerSpec(("python3", "-c", "print(1)", "{payload}"), "argv")
    assert config.output == S3OutputSpec(bucket="my-bucket", prefix="results", per="batch")
    assert config.max_lifetime_seconds == 3600 and config.log_shards == 1000
    assert (config.stop_on_rebalance, config.stop_when_queue_empty) == (False, False)


@pytest.mark.parametrize(
    ("field", "bad_values"),
    [
        ("cluster_id", ["", "UPPER", "a" * 41, "under_score", 7, None]),
        ("region", ["", "Mars", "us east 1", 1]),
        ("queue_url", ["", "my-queue", "ftp://x/y", 3]),
        ("state_table", ["ab", "has space", "", 5]),
        ("task_timeout_seconds", [0, -1, "10", True, None, float("inf")]),
        ("visibility_timeout_seconds", [9, 43201, 10.5, "30", False]),
        ("heartbeat_seconds", [0, -0.1, "15", [1]]),
        ("idle_shutdown_seconds", [0, -5, "300", float("nan")]),
        ("max_lifetime_seconds", [-1, "0", True]),
        ("wait_time_seconds", [-1, 21, 1.5, "20"]),
        ("max_messages", [0, 11, 2.5, "10"]),
        ("log_shards", [0, 1001, "16", 1.2]),
        ("retention_seconds", [0, -1, "1", 0.5]),
        ("startup_check", ["true", 1, None]),
        ("stop_on_rebalance", ["false", 0, 1, None, "yes"]),
        ("stop_when_queue_empty", ["true", 1, 0, None, []]),
    ],
)
def test_each_bad_value_names_its_field(field, bad_values):
    for value in bad_values:
        message = error_for(with_(**{field: value}))
        assert message.startswith(f"{field}:"), (value, message)
        assert "give" in message or "use" in message, message  # says how to fix it


@pytest.mark.parametrize("field", ["cluster_id", "region", "queue_url", "handler"])
def test_required_fields(field):
    document = dict(MINIMAL)
    del document[field]
    assert error_for(document) == f"{field}: missing; this field is required"


def test_unknown_fields_are_rejected_with_the_known_ones():
    message = error_for(with_(max_mesages=5, zzz=1))
    assert message.startswith("max_mesages: unknown field (and zzz) in configuration; known fields:")
    assert "max_messages" in message and "idle_shutdown_seconds" in message


@pytest.mark.parametrize("field", ["stop_on_rebalance", "stop_when_queue_empty"])
def test_stop_switches_name_the_field_and_the_fix(field):
    assert error_for(with_(**{field: "false"})) == f"{field}: 'false' is not a boolean; give true or false"
    assert getattr(WorkerConfig.from_dict(with_(**{field: False})), field) is False


def test_whole_numbers_given_as_floats_are_accepted():
    assert WorkerConfig.from_dict(with_(max_messages=5.0)).max_messages == 5


@pytest.mark.parametrize(
    ("handler", "expected_start"),
    [
        ({"type": "python", "target": "foo"}, "handler.target: 'foo' is not 'module:function'"),
        ({"type": "python", "target": "a b:c"}, "handler.target:"),
        ({"type": "python"}, "handler.target: missing"),
        ({"type": "python", "target": "m:f", "argv": []}, "handler.argv: unknown field"),
        ({"type": "shell", "target": "m:f"}, "handler.type: 'shell' is not one of python, command"),
        ("m:f", "handler: must be a JSON object"),
        ({"type": "command", "argv": []}, "handler.argv:"),
        ({"type": "command", "argv": "echo hi"}, "handler.argv:"),
        ({"type": "command", "argv": ["echo", 1]}, "handler.argv:"),
        ({"type": "command", "argv": [""]}, "handler.argv:"),
        ({"type": "command", "argv": ["cat"], "payload": "file"}, "handler.payload: 'file' is not"),
        ({"type": "command", "argv": ["cat"], "payload": "argv"}, "handler.payload: 'argv' needs"),
        (
            {"type": "command", "argv": ["echo", "{payload}"], "payload": "stdin"},
            "handler.payload: 'stdin' but",
        ),
    ],
)
def test_handler_shapes(handler, expected_start):
    assert error_for(with_(handler=handler)).startswith(expected_start)


def test_handler_target_message_gives_an_example():
    message = error_for(with_(handler={"type": "python", "target": "foo"}))
    assert message == (
        "handler.target: 'foo' is not 'module:function'; "
        "give the import path of a function like 'mypkg.tasks:run'"
    )


def test_command_payload_mode_follows_the_placeholder():
    stdin = WorkerConfig.from_dict(with_(handler={"type": "command", "argv": ["wc", "-c"]}))
    argv = WorkerConfig.from_dict(with_(handler={"type": "command", "argv": ["echo", "{payload}"]}))
    assert stdin.handler.payload == "stdin"
    assert argv.handler.payload == "argv"


@pytest.mark.parametrize(
    ("output", "expected_start"),
    [
        ({"type": "s3"}, "output.bucket: None is not an S3 bucket name"),
        ({"type": "s3", "bucket": "Bad_Bucket"}, "output.bucket:"),
        ({"type": "s3", "bucket": "ok-bucket", "per": "row"}, "output.per: 'row' is not"),
        ({"type": "s3", "bucket": "ok-bucket", "prefix": 5}, "output.prefix:"),
        ({"type": "s3", "bucket": "ok-bucket", "table": "t"}, "output.table: unknown field"),
        ({"type": "dynamodb", "table": "x"}, "output.table:"),
        ({"type": "custom", "target": "nocolon"}, "output.target: 'nocolon' is not 'module:attribute'"),
        ({"type": "custom", "target": "m:C", "options": []}, "output.options: must be a JSON object"),
        ({"type": "ftp"}, "output.type: 'ftp' is not one of dynamodb, s3, custom"),
        ([], "output: must be a JSON object"),
    ],
)
def test_output_shapes(output, expected_start):
    assert error_for(with_(output=output)).startswith(expected_start)


def test_s3_prefix_is_normalised():
    config = WorkerConfig.from_dict(with_(output={"type": "s3", "bucket": "ok-bucket", "prefix": "/a/b/"}))
    assert config.output == S3OutputSpec(bucket="ok-bucket", prefix="a/b", per="task")
    custom = WorkerConfig.from_dict(with_(output={"type": "custom", "target": "m.n:Sink"}))
    assert custom.output == CustomOutputSpec(target="m.n:Sink", options={})


def test_not_an_object():
    assert error_for([1, 2]) == "configuration must be a JSON object, not an array"


def test_from_json_reports_bad_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        WorkerConfig.from_json("{nope")


def test_load_from_path_json_text_and_env(tmp_path):
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(MINIMAL))
    expected = WorkerConfig.from_dict(MINIMAL)
    assert WorkerConfig.load(str(path)) == expected
    assert WorkerConfig.load(json.dumps(MINIMAL)) == expected
    assert WorkerConfig.load(environ={CONFIG_ENV: str(path)}) == expected
    assert WorkerConfig.load(environ={CONFIG_ENV: "  " + json.dumps(MINIMAL)}) == expected
    with pytest.raises(ConfigError, match="no configuration given"):
        WorkerConfig.load(environ={})
    with pytest.raises(ConfigError, match=r"^--config: cannot read"):
        WorkerConfig.load(str(tmp_path / "missing.json"))


def test_cli_check_prints_the_full_configuration(tmp_path, capsys, monkeypatch):
    from ec2cluster_worker.__main__ import main

    monkeypatch.setenv(CONFIG_ENV, json.dumps(MINIMAL))
    assert main(["--check"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == WorkerConfig.from_dict(MINIMAL).to_dict()
    monkeypatch.setenv(CONFIG_ENV, json.dumps(with_(wait_time_seconds=99)))
    assert main(["--check"]) == 2
    assert "wait_time_seconds: 99 is out of range" in capsys.readouterr().err
