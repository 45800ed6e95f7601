"""The instance bootstrap: a gzip-compressed bash script that installs and runs the worker.

cloud-init runs the script as root at first boot. It writes into ``$EC2CLUSTER_HOME`` the boot loader
(``ec2cluster_worker.boot``: standard library only, it runs on the image's own Python), the worker
configuration, a watchdog and ``start.sh``, registers ``start.sh`` to run at every boot, and runs it:
the watchdog, an interpreter of the image (the launch's ``python``), the boot loader (the cluster's bundle,
checked by SHA-256, into a virtual environment of its own: no pip, no internet, never the system
site-packages), then the worker. When the worker exits (or a step fails) the instance shuts down; it is
launched with InstanceInitiatedShutdownBehavior=terminate, so shutting down terminates it.

The script carries no credentials: the boot loader and the worker get them from the instance profile.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path

from ec2cluster_worker import boot
from ec2cluster_worker.reachability import CONSOLE_FAILURE_PREFIX

from airflow_ec2cluster.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_PYTHONS,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_STATE_TABLE,
)

# EC2 limit on user data before base64 encoding.
USER_DATA_LIMIT_BYTES = 16_384
DEFAULT_HOME = "/opt/ec2cluster"
WORKER_PACKAGE = "ec2cluster_worker"
CONFIG_FILE = "config.json"
GZIP_MAGIC = b"\x1f\x8b"
HEREDOC_DELIMITER = "EC2CLUSTER_EOF"
BOOT_LOADER_MIN_PYTHON = "3.9"  # the oldest Python boot.py runs on (the bundle may need a newer one)

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
    bundle: dict,
    python: Sequence[str] = DEFAULT_PYTHONS,
    python_version: str | None = None,
    min_python_version: str = BOOT_LOADER_MIN_PYTHON,
    boot_timeout: int = DEFAULT_BOOT_TIMEOUT,
    max_lifetime: int | None = None,
) -> bytes:
    """The gzip-compressed bootstrap script for an instance running the worker with ``config``.

    ``bundle``: where the cluster's bundle is and its SHA-256 (``{"sha256", "size", "s3": {"bucket",
    "key"}}``; boot.json's ``bundle``). ``python``: the interpreters to try, in order: the first of
    ``python_version`` when one is given, else the first of ``min_python_version`` or newer (the bundle
    manifest's: what its worker dependencies need). ``boot_timeout`` and ``max_lifetime`` (seconds) arm the
    instance's own watchdog.
    """
    refuse_credentials(config)
    script = render_script(
        config,
        bundle=bundle,
        python=python,
        python_version=python_version,
        min_python_version=min_python_version,
        boot_timeout=boot_timeout,
        max_lifetime=max_lifetime,
    )
    data = gzip.compress(script.encode("utf-8"), compresslevel=9, mtime=0)
    if len(data) > USER_DATA_LIMIT_BYTES:
        raise UserDataTooLarge(
            f"user data is {len(data):,} bytes gzip-compressed, over EC2's limit of "
            f"{USER_DATA_LIMIT_BYTES:,} bytes; the worker configuration (worker_options) "
            "is too large: put large inputs in the tasks or in S3"
        )
    return data


def parse_user_data(data: bytes) -> str:
    """The script text of rendered user data (gunzipped when gzip-compressed)."""
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    return data.decode("utf-8")


def config_from_script(script: str) -> dict:
    """The worker configuration written by a rendered script."""
    target = re.escape(f'cat > "$H/{CONFIG_FILE}" <<')
    match = re.search(rf"{target}'({HEREDOC_DELIMITER}_*)'\n(.*?)\n\1\n", script, flags=re.DOTALL)
    if match is None:
        raise ValueError("no worker configuration found in the script")
    return json.loads(match.group(2))


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
    config: dict,
    *,
    bundle: dict,
    python: Sequence[str] = DEFAULT_PYTHONS,
    python_version: str | None = None,
    min_python_version: str = BOOT_LOADER_MIN_PYTHON,
    boot_timeout: int = DEFAULT_BOOT_TIMEOUT,
    max_lifetime: int | None = None,
) -> str:
    """The bootstrap script text (uncompressed)."""
    if not re.fullmatch(r"[0-9a-f]{64}", str(bundle.get("sha256", ""))):
        raise ValueError("bundle needs its SHA-256")
    pythons = [python] if isinstance(python, str) else list(python)
    for candidate in pythons:
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", candidate or ""):
            raise ValueError(f"python: {candidate!r} is not an interpreter name or path")
    if not pythons:
        raise ValueError("python: name at least one interpreter (e.g. 'python3' or '/opt/conda/bin/python')")
    if python_version is not None and not re.fullmatch(r"3\.\d+", python_version):
        raise ValueError(f"python_version: {python_version!r} is not a version like '3.11'")
    if not re.fullmatch(r"3\.\d+", min_python_version):
        raise ValueError(f"min_python_version: {min_python_version!r} is not a version like '3.10'")
    boot = {
        "region": config["region"],
        "cluster_id": config["cluster_id"],
        "state_table": config.get("state_table", DEFAULT_STATE_TABLE),
        "retention_seconds": int(config.get("retention_seconds") or DEFAULT_RETENTION_SECONDS),
        "bundle": bundle,
    }
    settings = {
        "PYTHONS": " ".join(pythons),
        "PYTHON_VERSION": python_version or "",
        "MIN_PYTHON": min_python_version,
        "BOOT_TIMEOUT": str(int(boot_timeout)),
        "MAX_LIFETIME": "" if max_lifetime is None else str(int(max_lifetime)),
    }
    parts = [SCRIPT_HEAD]
    parts.extend(f"{name}={shlex.quote(value)}" for name, value in settings.items())
    parts.append(heredoc('"$H/settings.sh"', "".join(f"{n}={shlex.quote(v)}\n" for n, v in settings.items())))
    parts.append(heredoc('"$H/boot.py"', boot_loader_source()))
    parts.append(heredoc('"$H/boot.json"', one_line_json(boot)))
    parts.append(heredoc(f'"$H/{CONFIG_FILE}"', one_line_json(config)))
    parts.append(heredoc('"$H/watchdog.sh"', WATCHDOG))
    parts.append(heredoc('"$H/start.sh"', START))
    parts.append(SCRIPT_RUN)
    return "\n".join(parts)


def one_line_json(value: dict) -> str:
    text = json.dumps(value, sort_keys=True)
    if "\n" in text:  # json.dumps escapes newlines; guards the heredoc all the same
        raise ValueError("JSON must be one line")
    return text


def boot_loader_source() -> str:
    """The code of ec2cluster_worker.boot (standard library only: it runs on the image's own Python),
    without its comments and docstrings, which would take a third of EC2's 16 KB."""
    tree = ast.parse(Path(boot.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def heredoc(target: str, text: str) -> str:
    if not text.endswith("\n"):
        text += "\n"
    # Quoted delimiter: no expansion inside. Lengthened until no line of the text equals it.
    delimiter = HEREDOC_DELIMITER
    while delimiter in text.splitlines():
        delimiter += "_"
    return f"cat > {target} <<'{delimiter}'\n{text}{delimiter}"


SCRIPT_HEAD = """\
#!/bin/bash
# airflow-ec2cluster worker bootstrap (generated by airflow_ec2cluster.userdata); cloud-init runs it once,
# as root. It writes the instance's start-up files and runs start.sh, which cloud-init also runs at every
# later boot (scripts/per-boot): a rebooted instance starts its worker again instead of idling, billed.
set -euo pipefail
export EC2CLUSTER_HOME="${EC2CLUSTER_HOME:-@DEFAULT_HOME@}"
H="$EC2CLUSTER_HOME"
mkdir -p "$H"
chmod 700 "$H"
""".replace("@DEFAULT_HOME@", DEFAULT_HOME)

# Armed at every boot, before anything is installed: the instance stops paying by itself when its worker
# has not started within BOOT_TIMEOUT, or when MAX_LIFETIME has passed since its first boot, whatever the
# controller does. Its own loop: nothing else on the instance is trusted to be alive.
WATCHDOG = """\
#!/bin/bash
H="$(dirname "$0")"
. "$H/settings.sh"
booted=$(date +%s)
first=$(cat "$H/first-boot" 2>/dev/null || echo "$booted")
sleeper=""
trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null && wait "$sleeper"; exit 0' TERM
while :; do
  sleep 5 &
  sleeper=$!
  wait "$sleeper"
  now=$(date +%s)
  if [ ! -e "$H/worker-started" ] && [ $((now - booted)) -ge "$BOOT_TIMEOUT" ]; then
    echo "@PREFIX@the worker did not start within $BOOT_TIMEOUT s of boot (boot_timeout): \\
the watchdog shuts the instance down" >&2
    shutdown -h now
    exit 0
  fi
  if [ -n "$MAX_LIFETIME" ] && [ $((now - first)) -ge "$MAX_LIFETIME" ]; then
    echo "ec2cluster: max_lifetime of $MAX_LIFETIME s reached: the watchdog shuts the instance down" >&2
    shutdown -h now
    exit 0
  fi
done
""".replace("@PREFIX@", CONSOLE_FAILURE_PREFIX)

# What runs at every boot: the watchdog, an interpreter of the image, the boot loader (the bundle, a venv
# of its own), the worker. Whatever happens, the instance then shuts down: with
# InstanceInitiatedShutdownBehavior=terminate that terminates it, so a broken boot costs nothing.
START = (
    """\
#!/bin/bash
set -uo pipefail
H="$(cd "$(dirname "$0")" && pwd)"
export EC2CLUSTER_HOME="$H"
. "$H/settings.sh"
# boto3 finds the instance profile's credentials in instance metadata, giving it by default one attempt
# of 1 s: a busy instance (its first seconds) can miss that and fail with NoCredentialsError.
export AWS_METADATA_SERVICE_TIMEOUT="${AWS_METADATA_SERVICE_TIMEOUT:-5}"
export AWS_METADATA_SERVICE_NUM_ATTEMPTS="${AWS_METADATA_SERVICE_NUM_ATTEMPTS:-3}"
watchdog=""
finish() {
  status=$?
  echo "ec2cluster: bootstrap finished with status $status" >&2
  if [ -n "$watchdog" ]; then
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
  fi
  # The last process: nothing of the boot is left running when the power goes.
  exec shutdown -h now
}
trap finish EXIT
fail() {
  echo "@PREFIX@$*" >&2
  exit 1
}
[ -s "$H/first-boot" ] || date +%s > "$H/first-boot"
rm -f "$H/worker-started"
bash "$H/watchdog.sh" </dev/null &
watchdog=$!

# "3.11" at least "3.10"? (major.minor, compared as numbers)
at_least() {
  [ "${1%%.*}" -gt "${2%%.*}" ] || { [ "${1%%.*}" -eq "${2%%.*}" ] && [ "${1#*.}" -ge "${2#*.}" ]; }
}
# The image's interpreter: the first of PYTHONS that runs and is MIN_PYTHON or newer (what the bundle's
# worker dependencies need) and, when the bundle was built for one Python version (binary wheels), that one.
PY="" found=""
for candidate in $PYTHONS; do
  path=$(command -v "$candidate" 2>/dev/null) || continue
  version=$("$path" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
  found="$found $candidate=$version"
  at_least "$version" "$MIN_PYTHON" 2>/dev/null || continue
  if [ -n "$PYTHON_VERSION" ] && [ "$version" != "$PYTHON_VERSION" ]; then continue; fi
  PY="$path"
  break
done
if [ -z "$PY" ]; then
  fail "no Python ${PYTHON_VERSION:-$MIN_PYTHON+} among: $PYTHONS (found:${found:- none}); pass the image's \\
interpreter as python=[...] at launch, or build the bundle for its version (python_version)"
fi
echo "ec2cluster: python $PY" >&2

# Venv support is missing on a few images (the venv module removed); the distribution's package adds it,
# when a package mirror is reachable (the internet or a NAT gateway). Everything else comes from the bundle.
venv_support() {
  if command -v apt-get >/dev/null; then
    v=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    export DEBIAN_FRONTEND=noninteractive
    apt_options="-q -o DPkg::Lock::Timeout=120 -o Acquire::http::Timeout=10 -o Acquire::Retries=1"
    apt-get $apt_options update && apt-get $apt_options install -y --no-install-recommends "python$v-venv"
  elif command -v dnf >/dev/null; then
    dnf install -y -q --setopt=timeout=10 python3-libs
  else
    return 1
  fi
}
"$PY" "$H/boot.py" "$H/boot.json"
loaded=$?
if [ "$loaded" = 4 ]; then
  venv_support || fail "the image's Python has no venv module and no package mirror is reachable to add \\
it: use an image whose Python has venv (python3 -m venv), or a subnet that reaches the internet"
  "$PY" "$H/boot.py" "$H/boot.json"
  loaded=$?
fi
[ "$loaded" = 0 ] || exit "$loaded"
touch "$H/worker-started"
# Run the worker; its exit ends the script (and the instance, through the EXIT trap).
"$H/venv/bin/python" -m @WORKER@ --config "$H/@CONFIG@"
""".replace("@PREFIX@", CONSOLE_FAILURE_PREFIX)
    .replace("@WORKER@", WORKER_PACKAGE)
    .replace("@CONFIG@", CONFIG_FILE)
)

SCRIPT_RUN = """\
chmod 755 "$H/start.sh" "$H/watchdog.sh"
# cloud-init runs scripts/per-boot at every boot (the local cloud's process-backed instances, which share
# the host's disk, keep theirs in EC2CLUSTER_CLOUD_DIR).
per_boot="${EC2CLUSTER_CLOUD_DIR:-/var/lib/cloud}/scripts/per-boot"
mkdir -p "$per_boot"
printf '#!/bin/bash\\nexec bash %q\\n' "$H/start.sh" > "$per_boot/ec2cluster.sh"
chmod 755 "$per_boot/ec2cluster.sh"
exec bash "$H/start.sh"
"""
