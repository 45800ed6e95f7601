"""A real Airflow 3 deployment on this machine: scheduler, dag-processor, triggerer and api-server.

    env = {**cloud.env(), **cloud.airflow_conn_env()}
    with AirflowDeployment(airflow_home, dags_folder, env) as af:
        af.unpause("ec2_cluster_example")
        run_id = af.trigger("ec2_cluster_example", conf={...})  # POST /api/v2/dags/{id}/dagRuns, as the UI
        state = af.wait_for_run("ec2_cluster_example", run_id)  # "success" or "failed"

Each component is its own ``airflow <component>`` process (LocalExecutor, a SQLite metadata DB in
``airflow_home``), in its own process group, its stdout and stderr captured to
``<airflow_home>/components/<component>.log``. The api-server listens on 127.0.0.1 only (a free port unless
one is given); the task processes reach it through the execution API URL set here. Login: the simple auth
manager, one ``ADMIN`` user whose password is kept in ``<airflow_home>/passwords.json`` (generated on first
use). Leaving the context stops every component's process group (SIGTERM, then SIGKILL), also on error or
Ctrl-C.

Every wait here waits for an observed state (a health answer, a run's state) under an overall deadline, and
fails with a message that says what it last saw and where the logs are.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
HEALTH_KEYS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
DEFAULT_USERNAME = "admin"
START_TIMEOUT_SECONDS = 240.0
STOP_TIMEOUT_SECONDS = 30.0
DEFAULT_PARALLELISM = 8  # task processes at once: a run of ec2_cluster_example needs 2
MIGRATE_TIMEOUT_SECONDS = 300.0
FINISHED_RUN_STATES = ("success", "failed")
# Task instance states that never reach the executor: nothing for the scheduler to see finish.
NEVER_RAN = (None, "skipped", "upstream_failed", "removed")
ERROR_LEVELS = ("error", "critical", "fatal", "exception")
# A plain-text log line at ERROR or above, or a traceback: Airflow 3's console format (structlog,
# ``[error    ]``), the classic logging format (``ERROR``), and Python's traceback header.
ERROR_LINE_RE = re.compile(
    r"\[\s*(?i:error|critical|fatal|exception)\s*\]"
    r"|\b(ERROR|CRITICAL|FATAL)\b"
    r"|Traceback \(most recent call last\)"
)


class DeploymentError(RuntimeError):
    """The deployment could not start, or did not reach an awaited state in time."""


class ApiError(DeploymentError):
    """The api-server answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the server will: a port whose last connections linger in TIME_WAIT is free to it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise DeploymentError("no free port on 127.0.0.1")


def wait_until(
    what: str,
    check: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.5,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Call ``check`` until it returns a truthy value (returned); fail after ``timeout`` s saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"; {describe()}" if describe else ""
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


class AirflowDeployment:
    """Airflow's four components as separate processes; see the module docstring."""

    def __init__(
        self,
        airflow_home: str | Path,
        dags_folder: str | Path,
        env: dict[str, str] | None = None,
        *,
        port: int = 0,
        username: str = DEFAULT_USERNAME,
        start_timeout: float = START_TIMEOUT_SECONDS,
        parallelism: int = DEFAULT_PARALLELISM,
        airflow_bin: str | Path | None = None,
    ):
        self.airflow_home = Path(airflow_home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.extra_env = dict(env or {})
        self.requested_port = port
        self.username = username
        self.start_timeout = start_timeout
        self.parallelism = parallelism
        self.airflow_bin = str(airflow_bin or Path(sys.executable).with_name("airflow"))
        self.port: int | None = None
        self.password: str | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self._token: str | None = None
        self._migration: subprocess.Popen | None = None  # begin_migrate's, until start() waits for it
        self._migration_deadline = 0.0

    # Paths and addresses

    @property
    def components_dir(self) -> Path:
        return self.airflow_home / "components"

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "passwords.json"

    @property
    def task_logs_dir(self) -> Path:
        return self.airflow_home / "logs"

    def component_logs(self) -> dict[str, Path]:
        """Component name -> the file holding its stdout and stderr."""
        return {name: self.components_dir / f"{name}.log" for name in COMPONENTS}

    def task_logs(self) -> list[Path]:
        """Every file under AIRFLOW_HOME/logs: task logs, trigger logs, the dag-processor's logs."""
        if not self.task_logs_dir.is_dir():
            return []
        return sorted(path for path in self.task_logs_dir.rglob("*") if path.is_file())

    @property
    def url(self) -> str:
        """The api-server's base URL, which is also the UI's address."""
        if self.port is None:
            raise DeploymentError("the deployment is not started")
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment every component (and every task process they start) runs with."""
        base = self.url
        return {
            **os.environ,
            **self.extra_env,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # LocalExecutor starts this many worker processes up front (Airflow's default: 32).
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:ADMIN",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            # One secret for every component: left to Airflow, each process could generate its own.
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__API__SECRET_KEY": self._secret("api_secret_key"),
            "AIRFLOW__CORE__FERNET_KEY": self._fernet_key(),
        }

    # Start and stop

    def __enter__(self) -> AirflowDeployment:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._prepare()
        try:
            self.migrate()
            for name in COMPONENTS:
                self._start_component(name)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _prepare(self) -> None:
        """AIRFLOW_HOME's folders, the api-server's port and the login (once)."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        self.components_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.requested_port or None)
        if self.password is None:
            self.password = self._ensure_password()

    def begin_migrate(self) -> None:
        """Start ``airflow db migrate`` in the background; ``start()`` waits for it instead of running it.

        The migration needs nothing but AIRFLOW_HOME: it can run while what the components' environment
        needs (a local cloud) starts, and ``extra_env`` is filled in afterwards."""
        self._prepare()
        if self._migration is None:
            with self._migrate_log.open("ab") as log:
                self._migration = subprocess.Popen(
                    [self.airflow_bin, "db", "migrate"],
                    env=self.env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
                self._migration_deadline = time.monotonic() + MIGRATE_TIMEOUT_SECONDS

    def migrate(self) -> None:
        """``airflow db migrate`` (quick when the DB is already at head), or wait for ``begin_migrate``'s."""
        self.begin_migrate()
        migration = self._migration
        try:
            status = migration.wait(timeout=max(0.1, self._migration_deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(migration, signal.SIGKILL)
            migration.wait()
            self._migration = None
            seconds = f"{MIGRATE_TIMEOUT_SECONDS:.0f} s"
            raise DeploymentError(
                f"airflow db migrate did not finish in {seconds}; see {self._migrate_log}"
            ) from None
        self._migration = None
        if status != 0:
            raise DeploymentError(f"airflow db migrate failed (status {status}); see {self._migrate_log}")

    @property
    def _migrate_log(self) -> Path:
        return self.components_dir / "db-migrate.log"

    def _start_component(self, name: str) -> None:
        command = [self.airflow_bin, name]
        if name == "api-server":
            command += ["--host", "127.0.0.1", "--port", str(self.port)]
        elif name in ("scheduler", "triggerer"):
            # Their log servers would listen on every interface, on fixed ports; the api-server reads the
            # task and trigger logs from AIRFLOW_HOME/logs on this same machine.
            command.append("--skip-serve-logs")
        with self.component_logs()[name].open("ab") as log:
            self.processes[name] = subprocess.Popen(
                command,
                env=self.env(),
                cwd=self.airflow_home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole; Ctrl-C reaches only us
                preexec_fn=_die_with_parent,
            )

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM every component's process group, then SIGKILL what is left. Safe to call twice."""
        restore = _ignore_sigint()
        try:
            # A migration begun and never waited for (the start failed before it) is stopped with them.
            processes = [*self.processes.values(), *([self._migration] if self._migration else [])]
            for process in processes:
                _signal_group(process, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The group may outlive its leader (a task process, a gunicorn/uvicorn child): kill what is left.
            for process in processes:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            self.processes.clear()
            self._migration = None
        finally:
            restore()

    def wait_healthy(self, timeout: float | None = None) -> dict:
        """Wait until /api/v2/monitor/health reports the DB and the three job components healthy."""
        last: dict[str, Any] = {}

        def healthy() -> dict | None:
            self.check_alive()
            try:
                last["health"] = self.api("GET", "/api/v2/monitor/health", auth=False)
            except (OSError, ApiError) as error:
                last["health"] = repr(error)
                return None
            health = last["health"]
            return health if all(health.get(k, {}).get("status") == "healthy" for k in HEALTH_KEYS) else None

        return wait_until(
            f"Airflow at {self.url} to be healthy",
            healthy,
            timeout=timeout or self.start_timeout,
            describe=lambda: f"last health answer: {last.get('health')}; logs in {self.components_dir}",
        )

    def check_alive(self) -> None:
        """Raise when a component has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                log_path = self.component_logs()[name]
                raise DeploymentError(
                    f"airflow {name} exited with status {process.returncode}; "
                    f"end of {log_path}:\n{tail(log_path)}"
                )

    # REST API

    def api(self, method: str, path: str, body: Any = None, *, auth: bool = True, timeout: float = 30) -> Any:
        """One call to the api-server; the decoded JSON answer (None when empty)."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with _NO_PROXY.open(request, timeout=timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            raise ApiError(method, path, error.code, error.read().decode(errors="replace")) from None
        return json.loads(text) if text else None

    def token(self) -> str:
        """A JWT for the configured user, from the simple auth manager's ``POST /auth/token``."""
        if self._token is None:
            answer = self.api(
                "POST", "/auth/token", {"username": self.username, "password": self.password}, auth=False
            )
            self._token = answer["access_token"]
        return self._token

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        """Wait until the dag-processor has parsed ``dag_id`` (the API knows it); fail on an import error."""

        def parsed() -> dict | None:
            self.check_alive()
            errors = self.api("GET", "/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise DeploymentError(f"import errors in the DAGs folder: {errors}")
            try:
                return self.api("GET", f"/api/v2/dags/{_quote(dag_id)}")
            except ApiError as error:
                if error.status == 404:
                    return None
                raise

        return wait_until(
            f"the dag-processor to parse {dag_id}",
            parsed,
            timeout=timeout,
            describe=lambda: f"see {self.component_logs()['dag-processor']}",
        )

    def unpause(self, dag_id: str) -> dict:
        self.wait_for_dag(dag_id)
        return self.api("PATCH", f"/api/v2/dags/{_quote(dag_id)}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None, *, note: str | None = None) -> str:
        """Trigger a run as the UI's Trigger button does (no logical date, the params in ``conf``).

        Returns the run id."""
        body = {"logical_date": None, "conf": conf or {}}
        if note:
            body["note"] = note
        return self.api("POST", f"/api/v2/dags/{_quote(dag_id)}/dagRuns", body)["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}")["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """Task id -> state for the run's task instances (None: not scheduled yet)."""
        answer = self.api("GET", f"/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in answer["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        path = (
            f"/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances/{_quote(task_id)}"
            f"/xcomEntries/{_quote(key)}?deserialize=true&stringify=false"
        )
        return self.api("GET", path)["value"]

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        *,
        timeout: float = 600,
        interval: float = 0.5,
        on_poll: Callable[[dict[str, str | None]], None] | None = None,
    ) -> str:
        """Poll the run until it finishes; ``on_poll`` sees the task states at every poll. Its final state."""
        seen: dict[str, Any] = {}

        def finished() -> str | None:
            self.check_alive()
            seen["state"] = self.run_state(dag_id, run_id)
            seen["tasks"] = self.task_states(dag_id, run_id)
            if on_poll is not None:
                on_poll(seen["tasks"])
            return seen["state"] if seen["state"] in FINISHED_RUN_STATES else None

        state = wait_until(
            f"run {run_id} of {dag_id} to finish",
            finished,
            timeout=timeout,
            interval=interval,
            describe=lambda: (
                f"run state {seen.get('state')}, tasks {seen.get('tasks')}; "
                f"logs in {self.components_dir} and {self.task_logs_dir}"
            ),
        )
        self.wait_workloads_finished(dag_id, run_id)
        return state

    def wait_workloads_finished(self, dag_id: str, run_id: str, *, timeout: float = 120) -> None:
        """Wait until the scheduler has seen every task process of the run exit.

        A task reports its own state through the API before its process exits, so a run can be finished
        while the executor still holds its last workloads; stopping then cuts into them. The scheduler logs
        ``TaskInstance Finished: dag_id=..., task_id=..., run_id=...`` once the executor reports one.
        """
        scheduler_log = self.component_logs()["scheduler"]
        missing: list[str] = []

        def finished() -> bool:
            self.check_alive()
            ran = [task for task, state in self.task_states(dag_id, run_id).items() if state not in NEVER_RAN]
            text = scheduler_log.read_text(encoding="utf-8", errors="replace")
            missing[:] = [
                task
                for task in ran
                if f"TaskInstance Finished: dag_id={dag_id}, task_id={task}, run_id={run_id}," not in text
            ]
            return not missing

        wait_until(
            f"the scheduler to see every task process of run {run_id} exit",
            finished,
            timeout=timeout,
            describe=lambda: f"not yet finished in the executor: {missing}; {scheduler_log}",
        )

    # Secrets kept in AIRFLOW_HOME, so that a restarted deployment keeps its login and its tokens work

    def _ensure_password(self) -> str:
        passwords = {}
        if self.passwords_file.exists():
            passwords = json.loads(self.passwords_file.read_text() or "{}")
        if self.username not in passwords:
            passwords[self.username] = secrets.token_urlsafe(12)
            self.passwords_file.write_text(json.dumps(passwords) + "\n")
            self.passwords_file.chmod(0o600)
        return passwords[self.username]

    def _secret(self, name: str) -> str:
        path = self.airflow_home / f".{name}"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(64))  # >= 64 bytes: HS512
            path.chmod(0o600)
        return path.read_text().strip()

    def _fernet_key(self) -> str:
        path = self.airflow_home / ".fernet_key"
        if not path.exists():
            from cryptography.fernet import Fernet

            path.write_text(Fernet.generate_key().decode())
            path.chmod(0o600)
        return path.read_text().strip()


# Logs


def error_lines(paths: Iterable[Path]) -> list[str]:
    """Every line at ERROR level or above, and every traceback, in ``paths``: ``"<path>:<line no>: <line>"``.

    Understands both Airflow's plain-text component output and the JSON-lines task logs (``level`` field,
    ``exc_info``/``error_detail`` for exceptions).
    """
    found = []
    for path in paths:
        numbered = list(_numbered_lines(path))
        exit_requests = _swallowed_exit_requests(numbered)
        for number, line in numbered:
            if number not in exit_requests and _is_error_line(line):
                found.append(f"{path}:{number}: {line.rstrip()[:1000]}")
    return found


def _swallowed_exit_requests(numbered: list[tuple[int, str]]) -> set[int]:
    """Line numbers of Python's ``Exception ignored in: ...`` reports of a ``SystemExit: 0``.

    Airflow's components exit on SIGTERM by raising ``SystemExit(0)`` from the signal handler; when the
    signal lands while a finalizer runs (a garbage-collection callback), Python prints the exit as an
    ignored exception. That is a clean exit request, not an error.
    """
    skipped: set[int] = set()
    index = 0
    while index < len(numbered):
        number, line = numbered[index]
        if not _ANSI_RE.sub("", line).startswith("Exception ignored in"):
            index += 1
            continue
        block = [number]
        index += 1
        while index < len(numbered):
            number, line = numbered[index]
            text = _ANSI_RE.sub("", line).rstrip("\n")
            block.append(number)
            index += 1
            if text and not text[0].isspace() and not text.startswith("Traceback ("):
                if text.strip() == "SystemExit: 0":
                    skipped.update(block)
                break
    return skipped


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            yield from enumerate(lines, start=1)
    except FileNotFoundError:
        return


def _is_error_line(line: str) -> bool:
    text = _ANSI_RE.sub("", line).strip()
    if not text:
        return False
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict):
            level = str(record.get("level", "")).lower()
            return level in ERROR_LEVELS or bool(record.get("exc_info") or record.get("error_detail"))
    return bool(ERROR_LINE_RE.search(text))


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# Helpers

# Loopback only: never route a request to the api-server through a proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)  # start_new_session: the group id is the leader's pid


def _linux_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, not in the forked child: a child of a threaded process should only make the call.
_PRCTL = _linux_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGTERM when the thread that started it dies (Linux), so a killed test or demo
    orphans no component. ``stop()`` is the normal way; this is the safety net."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _ignore_sigint():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)
