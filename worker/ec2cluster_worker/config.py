"""The worker's configuration: one JSON document, validated field by field.

The controller (Airflow side) imports ``WorkerConfig.from_dict`` to validate the document before it launches
anything, so this module imports nothing beyond the standard library and has no side effects.
Every error message names the field and says how to fix it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Union

from . import records

CONFIG_ENV = "EC2CLUSTER_WORKER_CONFIG"

CLUSTER_ID_RE = re.compile(r"^[a-z0-9-]{1,40}$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
TABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
# CloudWatch Logs' log group names: 1-512 of these characters.
LOG_GROUP_RE = re.compile(r"^[A-Za-z0-9_./#-]{1,512}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# "package.module:attribute" (the attribute may be dotted, e.g. "pkg.mod:Class.method").
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
PAYLOAD_PLACEHOLDER = "{payload}"
MAX_VISIBILITY_SECONDS = 43200


class ConfigError(ValueError):
    """A configuration document that the worker cannot run with; the message names the field and the fix."""


ISOLATION_THREAD = "thread"
ISOLATION_PROCESS = "process"


@dataclass(frozen=True)
class PythonHandlerSpec:
    target: str
    # "thread": the function runs in the worker's own process (one interpreter, one GIL: a CPU-bound
    # function uses one core whatever the slots); "process": each slot runs it in a child process of its own
    # (isolation.py), so slots use as many cores, and a task past its time limit is killed, not abandoned.
    isolation: str = ISOLATION_THREAD
    type: str = "python"

    def to_dict(self) -> dict[str, Any]:
        document = {"type": self.type, "target": self.target}
        if self.isolation != ISOLATION_THREAD:
            document["isolation"] = self.isolation
        return document

    @property
    def in_processes(self) -> bool:
        return self.isolation == ISOLATION_PROCESS


@dataclass(frozen=True)
class CommandHandlerSpec:
    argv: tuple[str, ...]
    payload: str  # "stdin" or "argv"
    type: str = "command"
    in_processes = True  # every task is a process of its own

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "argv": list(self.argv), "payload": self.payload}


@dataclass(frozen=True)
class DynamoDBOutputSpec:
    table: str | None = None  # None: the result goes on the task-log item itself
    type: str = "dynamodb"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type} if self.table is None else {"type": self.type, "table": self.table}


@dataclass(frozen=True)
class S3OutputSpec:
    bucket: str
    prefix: str = ""
    per: str = "task"  # "task" or "batch"
    type: str = "s3"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "bucket": self.bucket, "prefix": self.prefix, "per": self.per}


@dataclass(frozen=True)
class CustomOutputSpec:
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    type: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "target": self.target, "options": dict(self.options)}


# Union, not X | Y: these aliases are evaluated at run time, and the worker runs on Python 3.9.
HandlerSpec = Union[PythonHandlerSpec, CommandHandlerSpec]  # noqa: UP007
OutputSpec = Union[DynamoDBOutputSpec, S3OutputSpec, CustomOutputSpec]  # noqa: UP007


@dataclass(frozen=True)
class WorkerConfig:
    cluster_id: str
    region: str
    queue_url: str
    handler: HandlerSpec
    state_table: str = "ec2cluster-state"
    output: OutputSpec = field(default_factory=DynamoDBOutputSpec)
    task_timeout_seconds: float = 900
    visibility_timeout_seconds: int = 120
    heartbeat_seconds: float = 15
    idle_shutdown_seconds: float = 300
    max_lifetime_seconds: float = 0
    wait_time_seconds: int = 20
    max_messages: int = 10
    log_shards: int = records.DEFAULT_LOG_SHARDS
    retention_seconds: int = records.DEFAULT_RETENTION_SECONDS
    # At start, one TCP connect to each service's endpoint (reachability.py): stop at once, saying which
    # service this subnet cannot reach, rather than hang in connect timeouts and retries.
    startup_check: bool = True
    startup_check_timeout_seconds: float = 5
    # A rebalance recommendation (instance metadata) is an early spot interruption: finish the task at hand,
    # hand back the rest, stop with stop_reason "rebalance-recommendation" (lifecycle.py).
    stop_on_rebalance: bool = True
    # Stop ("queue-empty") as soon as the worker holds nothing and a receive found nothing, the queue
    # confirming it holds no visible or delayed message; else only after idle_shutdown_seconds (loop.py).
    stop_when_queue_empty: bool = True
    # The CloudWatch Logs group the worker ships its log lines to, in a stream named by its worker id
    # (cloudwatch.py); None: the console only. The launch makes the group, with its retention.
    log_group: str | None = None
    # Tasks run at once on the instance (slots.py); None: default_slots() (the instance's vCPUs when tasks
    # run in processes, else 1).
    slots_per_instance: int | None = None

    @classmethod
    def from_dict(cls, document: Any) -> WorkerConfig:
        return parse_config(document)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"configuration is not valid JSON ({error}); give one JSON object") from None
        return parse_config(document)

    @classmethod
    def load(cls, source: str | None = None, environ: dict[str, str] | None = None) -> WorkerConfig:
        """From ``source`` (a path, or JSON text), else from env ``EC2CLUSTER_WORKER_CONFIG`` (same forms)."""
        environ = os.environ if environ is None else environ
        origin = "--config"
        if source is None:
            source = environ.get(CONFIG_ENV)
            origin = CONFIG_ENV
        if source is None or not source.strip():
            raise ConfigError(
                f"no configuration given; pass --config PATH or set {CONFIG_ENV} to a path or the JSON text"
            )
        if source.lstrip().startswith("{"):
            return cls.from_json(source)
        try:
            with open(source, encoding="utf-8") as config_file:
                text = config_file.read()
        except OSError as error:
            raise ConfigError(
                f"{origin}: cannot read {source!r} ({error.strerror}); give the path of a JSON file"
            ) from None
        return cls.from_json(text)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for name in FIELD_NAMES:
            value = getattr(self, name)
            document[name] = value.to_dict() if hasattr(value, "to_dict") else value
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


FIELD_NAMES = (
    "cluster_id",
    "region",
    "queue_url",
    "state_table",
    "handler",
    "output",
    "task_timeout_seconds",
    "visibility_timeout_seconds",
    "heartbeat_seconds",
    "idle_shutdown_seconds",
    "max_lifetime_seconds",
    "wait_time_seconds",
    "max_messages",
    "log_shards",
    "retention_seconds",
    "startup_check",
    "startup_check_timeout_seconds",
    "stop_on_rebalance",
    "stop_when_queue_empty",
    "log_group",
    "slots_per_instance",
)
REQUIRED_FIELDS = ("cluster_id", "region", "queue_url", "handler")


def parse_config(document: Any) -> WorkerConfig:
    if not isinstance(document, dict):
        raise ConfigError(f"configuration must be a JSON object, not {_json_type(document)}")
    _reject_unknown("configuration", document, FIELD_NAMES)
    for name in REQUIRED_FIELDS:
        if name not in document:
            raise ConfigError(f"{name}: missing; this field is required")
    values: dict[str, Any] = {
        "cluster_id": _cluster_id(document["cluster_id"]),
        "region": _region(document["region"]),
        "queue_url": _queue_url(document["queue_url"]),
        "handler": _handler(document["handler"]),
    }
    if "state_table" in document:
        values["state_table"] = _table_name("state_table", document["state_table"])
    if "output" in document:
        values["output"] = _output(document["output"])
    numbers = {
        "task_timeout_seconds": lambda v: _number("task_timeout_seconds", v, minimum=0, exclusive=True),
        "visibility_timeout_seconds": lambda v: _integer(
            "visibility_timeout_seconds", v, 10, MAX_VISIBILITY_SECONDS
        ),
        "heartbeat_seconds": lambda v: _number("heartbeat_seconds", v, minimum=0, exclusive=True),
        "idle_shutdown_seconds": lambda v: _number("idle_shutdown_seconds", v, minimum=0, exclusive=True),
        "max_lifetime_seconds": lambda v: _number("max_lifetime_seconds", v, minimum=0, exclusive=False),
        "wait_time_seconds": lambda v: _integer("wait_time_seconds", v, 0, 20),
        "max_messages": lambda v: _integer("max_messages", v, 1, 10),
        "log_shards": lambda v: _integer("log_shards", v, 1, 1000),
        "retention_seconds": lambda v: _integer("retention_seconds", v, 1, None),
        "startup_check_timeout_seconds": lambda v: _number(
            "startup_check_timeout_seconds", v, minimum=0, exclusive=True
        ),
    }
    for name, check in numbers.items():
        if name in document:
            values[name] = check(document[name])
    if document.get("log_group") is not None:
        values["log_group"] = _log_group(document["log_group"])
    for name in ("startup_check", "stop_on_rebalance", "stop_when_queue_empty"):
        if name in document:
            values[name] = _boolean(name, document[name])
    if document.get("slots_per_instance") is not None:
        values["slots_per_instance"] = slots_per_instance(document["slots_per_instance"])
    return WorkerConfig(**values)


MAX_SLOTS = 1024


def slots_per_instance(value: Any, field_name: str = "slots_per_instance") -> int:
    """A valid ``slots_per_instance`` (a positive integer), or ConfigError naming the field and the fix."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLOTS:
        raise ConfigError(
            f"{field_name}: {value!r} is not a number of slots; give a whole number from 1 to {MAX_SLOTS} "
            "(tasks run at once on each instance), or leave it out for the default (the instance's vCPUs "
            "for command handlers and Python handlers with isolation 'process', else 1)"
        )
    return value


def default_slots(handler: HandlerSpec, vcpus: int) -> int:
    """Slots when ``slots_per_instance`` is not given: one per vCPU when tasks run in processes (a command,
    or a Python handler with isolation "process"); 1 when they share the worker's interpreter, whose GIL lets
    only one thread compute at a time (more slots would only help a handler that waits on I/O: say so)."""
    return max(1, vcpus) if handler.in_processes else 1


def instance_vcpus() -> int:
    """The vCPUs this process may run on: on EC2 the instance type's vCPUs as the OS sees them.

    Read from the OS, not instance metadata: metadata names the instance type but not its vCPU count (that
    takes DescribeInstanceTypes, another permission), and the OS count is the one that matters: it follows
    CPU options (one thread per core halves it) and a container's or cgroup's CPU set (sched_getaffinity),
    which os.cpu_count() would not.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _cluster_id(value: Any) -> str:
    if not isinstance(value, str) or not CLUSTER_ID_RE.match(value):
        raise ConfigError(
            f"cluster_id: {value!r} is not a cluster id; use 1-40 lowercase letters, digits and '-'"
        )
    return value


def _region(value: Any) -> str:
    if not isinstance(value, str) or not REGION_RE.match(value):
        raise ConfigError(f"region: {value!r} is not an AWS region name; give one like 'us-east-1'")
    return value


def _queue_url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^\s/]+/\S+$", value):
        raise ConfigError(
            f"queue_url: {value!r} is not a queue URL; give the QueueUrl that CreateQueue returned"
        )
    return value


def _table_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not TABLE_NAME_RE.match(value):
        raise ConfigError(
            f"{name}: {value!r} is not a DynamoDB table name; use 3-255 letters, digits, '_', '-' or '.'"
        )
    return value


def _log_group(value: Any) -> str:
    if not isinstance(value, str) or not LOG_GROUP_RE.match(value):
        raise ConfigError(
            f"log_group: {value!r} is not a CloudWatch Logs group name; use 1-512 letters, digits and "
            "'_', '-', '/', '.', '#' (or null for no CloudWatch Logs)"
        )
    return value


def _import_path(name: str, value: Any, example: str) -> str:
    if not isinstance(value, str) or not IMPORT_PATH_RE.match(value):
        raise ConfigError(
            f"{name}: {value!r} is not 'module:attribute'; give an import path like {example!r}"
        )
    return value


def _handler(value: Any) -> HandlerSpec:
    kind = _object_with_type("handler", value, ("python", "command"))
    if kind == "python":
        _reject_unknown("handler", value, ("type", "target", "isolation"))
        if "target" not in value:
            raise ConfigError(
                "handler.target: missing; give the import path of a function like 'mypkg.tasks:run'"
            )
        target = value["target"]
        if not isinstance(target, str) or not IMPORT_PATH_RE.match(target):
            raise ConfigError(
                f"handler.target: {target!r} is not 'module:function'; "
                "give the import path of a function like 'mypkg.tasks:run'"
            )
        isolation = value.get("isolation", ISOLATION_THREAD)
        if isolation not in (ISOLATION_THREAD, ISOLATION_PROCESS):
            raise ConfigError(
                f"handler.isolation: {isolation!r} is not 'thread' or 'process'; use 'process' to run the "
                "function in a child process per slot (CPU-bound work on several cores), or leave it out"
            )
        return PythonHandlerSpec(target=target, isolation=isolation)
    _reject_unknown("handler", value, ("type", "argv", "payload"))
    argv = value.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(arg, str) for arg in argv) or not argv[0]:
        raise ConfigError(
            f"handler.argv: {argv!r} is not a command; give a non-empty list of strings like "
            f'["python3", "-m", "mytool", "{PAYLOAD_PLACEHOLDER}"] (no shell is used)'
        )
    has_placeholder = PAYLOAD_PLACEHOLDER in argv
    payload = value.get("payload", "argv" if has_placeholder else "stdin")
    if payload not in ("stdin", "argv"):
        raise ConfigError(f"handler.payload: {payload!r} is not 'stdin' or 'argv'")
    if payload == "argv" and not has_placeholder:
        raise ConfigError(
            f"handler.payload: 'argv' needs an element of handler.argv that is exactly "
            f"{PAYLOAD_PLACEHOLDER!r}; add one, or set payload to 'stdin'"
        )
    if payload == "stdin" and has_placeholder:
        raise ConfigError(
            f"handler.payload: 'stdin' but handler.argv contains {PAYLOAD_PLACEHOLDER!r}; "
            "set payload to 'argv', or remove the placeholder"
        )
    return CommandHandlerSpec(argv=tuple(argv), payload=payload)


def _output(value: Any) -> OutputSpec:
    kind = _object_with_type("output", value, ("dynamodb", "s3", "custom"))
    if kind == "dynamodb":
        _reject_unknown("output", value, ("type", "table"))
        if "table" not in value or value["table"] is None:
            return DynamoDBOutputSpec()
        return DynamoDBOutputSpec(table=_table_name("output.table", value["table"]))
    if kind == "s3":
        _reject_unknown("output", value, ("type", "bucket", "prefix", "per"))
        bucket = value.get("bucket")
        if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
            raise ConfigError(
                f"output.bucket: {bucket!r} is not an S3 bucket name; give the bucket's name only"
            )
        prefix = value.get("prefix", "")
        if not isinstance(prefix, str) or len(prefix) > 512:
            raise ConfigError(f"output.prefix: {prefix!r} is not a key prefix; give a string like 'results/'")
        per = value.get("per", "task")
        if per not in ("task", "batch"):
            raise ConfigError(f"output.per: {per!r} is not 'task' or 'batch'")
        return S3OutputSpec(bucket=bucket, prefix=prefix.strip("/"), per=per)
    _reject_unknown("output", value, ("type", "target", "options"))
    target = _import_path("output.target", value.get("target"), "mypkg.sinks:MySink")
    options = value.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"output.options: must be a JSON object, not {_json_type(options)}")
    return CustomOutputSpec(target=target, options=dict(options))


def _object_with_type(name: str, value: Any, kinds: tuple[str, ...]) -> str:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{name}: must be a JSON object with a 'type' ({' | '.join(kinds)}), not {_json_type(value)}"
        )
    kind = value.get("type")
    if kind not in kinds:
        raise ConfigError(f"{name}.type: {kind!r} is not one of {', '.join(kinds)}")
    return kind


def _reject_unknown(where: str, document: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(str(key) for key in document if key not in known)
    if unknown:
        prefix = "" if where == "configuration" else f"{where}."
        others = f" (and {', '.join(unknown[1:])})" if unknown[1:] else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field{others} in {where}; known fields: {', '.join(known)}"
        )


def _number(name: str, value: Any, *, minimum: float, exclusive: bool) -> float:
    # bool is an int subclass, but true/false is never meant as a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} is not a number; give seconds as a number")
    if value < minimum or (exclusive and value == minimum):
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise ConfigError(f"{name}: {value!r} is out of range; give a number {bound}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a boolean; give true or false")
    return value


def _integer(name: str, value: Any, minimum: int, maximum: int | None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} is not an integer; give a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name}: {value} is out of range; give an integer {bound}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for python_type, label in names.items():
        if isinstance(value, python_type):
            return label
    return "a number" if isinstance(value, (int, float)) else type(value).__name__
