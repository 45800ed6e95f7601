"""The instance bootstrap: a gzip-compressed bash script that installs and runs the worker.

cloud-init runs the script as root at first boot. It gets the worker's code (a zip fetched from the state
table, or a pip install of a spec), writes the worker configuration into ``$EC2CLUSTER_HOME``, runs the
worker, and shuts the instance down when the worker exits (the instance is launched with
InstanceInitiatedShutdownBehavior=terminate, so shutting down terminates it). The local cloud's instance
runner runs the same script with a few environment knobs (see DESIGN.md, "User data").

The script carries no credentials: the worker gets them from the instance profile.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
from collections.abc import Iterable, Iterator

from ec2cluster_worker.reachability import CONSOLE_FAILURE_PREFIX

from airflow_ec2cluster.defaults import DEFAULT_STATE_TABLE

# The boot loader's DynamoDB connect timeout: with no route to DynamoDB, fail in seconds, not minutes.
LOADER_CONNECT_TIMEOUT = 5
LOADER_NO_ROUTE_HINT = (
    "this subnet needs a route to it: a NAT gateway, a VPC endpoint for dynamodb, or a public IP with an "
    "internet gateway (and security groups that allow outbound TCP 443)"
)
# pip gives up on an unreachable index after 10 s x 3 tries instead of 15 s x 6.
PIP_OPTIONS = "--timeout 10 --retries 2"
# EC2 limit on user data before base64 encoding.
USER_DATA_LIMIT_BYTES = 16_384
DEFAULT_HOME = "/opt/ec2cluster"
WORKER_PACKAGE = "ec2cluster_worker"
# Removed mode: the worker's source inside the user data. The worker outgrew EC2's 16 KB (even minified).
REMOVED_EMBEDDED = "embedded"
PIP_PREFIX = "pip:"
# The worker's zip, fetched at boot from the state table (see airflow_ec2cluster.workerbundle).
TABLE = "table"
CONFIG_FILE = "config.json"
# The configuration is written between these heredoc delimiters; config_from_script() finds it again.
CONFIG_DELIMITER = "EC2CLUSTER_CONFIG_JSON"
GZIP_MAGIC = b"\x1f\x8b"
HEREDOC_DELIMITER = "EC2CLUSTER_EOF"

ACCESS_KEY_RE = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
# An AWS secret key is 40 characters of base64; require mixed case and a digit so that ordinary
# identifiers (cluster ids are lowercase) are not mistaken for one.
SECRET_KEY_RE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
SECRET_FIELD_RE = re.compile(r"(?i)secret|password|session_token|access_key|credential")


class UserDataTooLarge(ValueError):
    """The compressed script is over EC2's user data limit."""


class CredentialsInUserData(ValueError):
    """The configuration holds something that looks like AWS credentials."""


def render_user_data(
    config: dict,
    *,
    worker_source: str = TABLE,
    requirements: Iterable[str] = (),
    bundle_sha256: str | None = None,
) -> bytes:
    """The gzip-compressed bootstrap script for an instance running the worker with ``config``.

    ``worker_source``: ``"table"`` (a loader that fetches the worker bundle with SHA-256 ``bundle_sha256``
    from the state table), or ``"pip:<spec>"``.
    """
    refuse_credentials(config)
    requirements = list(requirements)
    script = render_script(
        config, worker_source=worker_source, requirements=requirements, bundle_sha256=bundle_sha256
    )
    data = gzip.compress(script.encode("utf-8"), compresslevel=9, mtime=0)
    if len(data) > USER_DATA_LIMIT_BYTES:
        raise UserDataTooLarge(
            f"user data is {len(data):,} bytes gzip-compressed, over EC2's limit of "
            f"{USER_DATA_LIMIT_BYTES:,} bytes ({len(requirements)} requirements, worker_source="
            f"{worker_source!r}); list fewer requirements (put them in one wheel or a custom AMI), or "
            f'install them with the worker from one package with worker_source="pip:<spec>" '
            f"(a version pin, or an S3/HTTPS wheel URL)"
        )
    return data


def parse_user_data(data: bytes) -> str:
    """The script text of rendered user data (gunzipped when gzip-compressed)."""
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    return data.decode("utf-8")


def config_from_script(script: str) -> dict:
    """The worker configuration written by a rendered script."""
    match = re.search(rf"<<'{CONFIG_DELIMITER}'\n(.*?)\n{CONFIG_DELIMITER}\n", script, flags=re.DOTALL)
    if match is None:
        raise ValueError("no worker configuration found in the script")
    return json.loads(match.group(1))


def refuse_credentials(config: dict) -> None:
    """Raise CredentialsInUserData when any field of ``config`` looks like AWS credentials."""
    for path, key, value in walk_fields(config):
        if not isinstance(value, str) or not value:
            continue
        if key is not None and SECRET_FIELD_RE.search(key):
            raise CredentialsInUserData(
                f"config field {path} looks like a credential; user data must not carry credentials: "
                f"the worker gets them from the instance profile"
            )
        if ACCESS_KEY_RE.search(value) or any(looks_like_secret_key(s) for s in SECRET_KEY_RE.findall(value)):
            raise CredentialsInUserData(
                f"config field {path} holds what looks like an AWS access or secret key; user data must "
                f"not carry credentials: the worker gets them from the instance profile"
            )


def looks_like_secret_key(text: str) -> bool:
    return all(any(test(c) for c in text) for test in (str.isupper, str.islower, str.isdigit))


def walk_fields(value: object, path: str = "config", key: str | None = None) -> Iterator[tuple]:
    """(path, key, value) for every value nested in ``value``, keys included as values."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}", None, k
            yield from walk_fields(v, f"{path}.{k}", str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from walk_fields(v, f"{path}[{i}]", key)
    else:
        yield path, key, value


def render_script(
    config: dict, *, worker_source: str, requirements: list[str], bundle_sha256: str | None = None
) -> str:
    """The bootstrap script text (uncompressed)."""
    config_json = json.dumps(config, sort_keys=True)
    if "\n" in config_json:  # json.dumps escapes newlines; guards the heredoc all the same
        raise ValueError("config JSON must be one line")
    parts = [SCRIPT_HEAD]
    if worker_source == REMOVED_EMBEDDED:
        raise ValueError(
            "worker_source=\"embedded\" is no longer offered: the worker's source is over EC2's 16 KB of "
            'user data even minified; use "table" (the default: the launch stores the worker in the state '
            'table) or "pip:<spec>"'
        )
    if worker_source == TABLE:
        parts.append(table_worker_section(config, bundle_sha256))
    elif worker_source.startswith(PIP_PREFIX) and worker_source[len(PIP_PREFIX) :].strip():
        parts.append(pip_section("worker", [worker_source[len(PIP_PREFIX) :].strip()]))
    else:
        raise ValueError(
            f'worker_source must be "table" or "pip:<spec>" (a version pin or a wheel URL), '
            f"not {worker_source!r}"
        )
    if requirements:
        parts.append(pip_section("requirements", requirements))
    config_target = f'"$EC2CLUSTER_HOME/{CONFIG_FILE}"'
    parts.append(f"cat > {config_target} <<'{CONFIG_DELIMITER}'\n{config_json}\n{CONFIG_DELIMITER}\n")
    parts.append(SCRIPT_RUN)
    return "\n".join(parts)


def table_worker_section(config: dict, bundle_sha256: str | None) -> str:
    """A loader that fetches the worker bundle from the state table (instance profile credentials)."""
    if not bundle_sha256 or not re.fullmatch(r"[0-9a-f]{64}", bundle_sha256):
        raise ValueError('worker_source="table" needs bundle_sha256: the SHA-256 of the stored bundle')
    from airflow_ec2cluster.workerbundle import BUNDLE_ATTRIBUTE, bundle_key

    key = {name: {"S": value} for name, value in bundle_key(config["cluster_id"]).items()}
    table = config.get("state_table", DEFAULT_STATE_TABLE)
    loader = f"""\
import hashlib, io, sys, zipfile
import boto3
from botocore.config import Config
from botocore.exceptions import ConnectionError
client = boto3.client("dynamodb", region_name={config["region"]!r}, config=Config(
    connect_timeout={LOADER_CONNECT_TIMEOUT}, retries={{"mode": "standard", "max_attempts": 3}}))
try:
    item = client.get_item(TableName={table!r}, Key={key!r}, ConsistentRead=True).get("Item")
except ConnectionError as error:
    host = client.meta.endpoint_url.split("://", 1)[-1]
    print({CONSOLE_FAILURE_PREFIX!r} + f"cannot reach dynamodb ({{host}}): {{type(error).__name__}}; "
          {LOADER_NO_ROUTE_HINT!r}, flush=True)
    sys.exit(1)
if item is None:
    sys.exit({CONSOLE_FAILURE_PREFIX!r} + "no worker bundle in the state table (run the launch again)")
data = item[{BUNDLE_ATTRIBUTE!r}]["B"]
if hashlib.sha256(data).hexdigest() != {bundle_sha256!r}:
    sys.exit({CONSOLE_FAILURE_PREFIX!r} + "the worker bundle's SHA-256 differs from the launch's")
zipfile.ZipFile(io.BytesIO(data)).extractall(sys.argv[1])
"""
    return (
        "# The worker's code: a zip in the state table, checked against the SHA-256 the launch stored.\n"
        'if [ "${EC2CLUSTER_SKIP_INSTALL:-0}" != "1" ] && ! "$PY" -c "import boto3" 2>/dev/null; then\n'
        "  ensure_pip\n"
        f'  "$PY" -m pip install --quiet {PIP_OPTIONS} boto3 || fail_install "boto3 (not on the image)"\n'
        "fi\n"
        'export PYTHONPATH="$EC2CLUSTER_HOME/src${PYTHONPATH:+:$PYTHONPATH}"\n'
        f'"$PY" - "$EC2CLUSTER_HOME/src" <<\'{HEREDOC_DELIMITER}\'\n{loader}{HEREDOC_DELIMITER}\n'
    )


def heredoc(target: str, text: str) -> str:
    if not text.endswith("\n"):
        text += "\n"
    # Quoted delimiter: no expansion inside. Lengthened until no line of the text equals it.
    delimiter = HEREDOC_DELIMITER
    while delimiter in text.splitlines():
        delimiter += "_"
    return f"cat > {target} <<'{delimiter}'\n{text}{delimiter}"


def pip_section(what: str, specs: list[str]) -> str:
    for spec in specs:
        if not spec or "\n" in spec:
            raise ValueError(f"invalid pip requirement {spec!r}")
    quoted = " ".join(shlex.quote(spec) for spec in specs)
    return (
        f"# Install the {what} with pip.\n"
        'if [ "${EC2CLUSTER_SKIP_INSTALL:-0}" != "1" ]; then\n'
        "  ensure_pip\n"
        f'  "$PY" -m pip install --quiet {PIP_OPTIONS} {quoted} || fail_install "the {what}"\n'
        "fi\n"
    )


SCRIPT_HEAD = """\
#!/bin/bash
# airflow-ec2cluster worker bootstrap (generated by airflow_ec2cluster.userdata).
set -euo pipefail
export EC2CLUSTER_HOME="${EC2CLUSTER_HOME:-@DEFAULT_HOME@}"
PY="${EC2CLUSTER_PYTHON:-python3}"
# boto3 finds the instance profile's credentials in instance metadata, giving it by default one attempt
# of 1 s: a busy instance (its first seconds) can miss that and fail with NoCredentialsError.
export AWS_METADATA_SERVICE_TIMEOUT="${AWS_METADATA_SERVICE_TIMEOUT:-5}"
export AWS_METADATA_SERVICE_NUM_ATTEMPTS="${AWS_METADATA_SERVICE_NUM_ATTEMPTS:-3}"

# Whatever happens (the worker exits, or a step below fails), the instance shuts down: with
# InstanceInitiatedShutdownBehavior=terminate that terminates it, so a broken bootstrap costs nothing.
finish() {
  status=$?
  echo "ec2cluster: bootstrap finished with status $status" >&2
  if [ "${EC2CLUSTER_NO_SHUTDOWN:-0}" != "1" ]; then
    shutdown -h now
  fi
}
trap finish EXIT

# One console line the drain reads back (GetConsoleOutput) when no status item could say why.
fail_install() {
  echo "@PREFIX@cannot install $1 with pip: is a package index reachable from this subnet? Without a NAT \
gateway or a public IP (network='public') it is not; bake it into the AMI instead" >&2
  exit 1
}

ensure_pip() {
  "$PY" -m pip --version >/dev/null 2>&1 && return 0
  "$PY" -m ensurepip --upgrade >/dev/null 2>&1 && return 0
  if command -v dnf >/dev/null; then dnf install -y -q python3-pip
  elif command -v yum >/dev/null; then yum install -y -q python3-pip
  elif command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q python3-pip
  fi
}

mkdir -p "$EC2CLUSTER_HOME/src"
""".replace("@DEFAULT_HOME@", DEFAULT_HOME).replace("@PREFIX@", CONSOLE_FAILURE_PREFIX)

SCRIPT_RUN = f"""\
# Run the worker; its exit ends the script (and the instance, through the EXIT trap).
"$PY" -m {WORKER_PACKAGE} --config "$EC2CLUSTER_HOME/{CONFIG_FILE}"
"""
