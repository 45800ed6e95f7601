"""Handler loading, the command runner, and per-task timeouts."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from ec2cluster_worker.config import CommandHandlerSpec, PythonHandlerSpec
from ec2cluster_worker.handlers import (
    CommandHandler,
    HandlerError,
    TaskContext,
    TaskFailure,
    TaskTimeout,
    build_handler,
    load_target,
    parse_command_output,
    run_with_timeout,
)

CONTEXT = TaskContext(task_id="t-1", attempt=2, worker_id="w-1", cluster_id="c-1")
PY = sys.executable


def command(*argv: str, payload: str | None = None) -> CommandHandler:
    mode = payload or ("argv" if "{payload}" in argv else "stdin")
    return build_handler(CommandHandlerSpec(argv=tuple(argv), payload=mode))


def test_python_handler_gets_payload_and_context():
    handler = build_handler(PythonHandlerSpec("tests.worker.sample_handlers:echo"))
    assert handler({"a": 1}, CONTEXT, 5) == {
        "echo": {"a": 1},
        "task_id": "t-1",
        "attempt": 2,
        "worker": "w-1",
    }


def test_the_example_handler():
    handler = build_handler(PythonHandlerSpec("ec2cluster_worker.examples:count_smileys"))
    assert handler({"id": 7, "text": "a :) b :):) c :("}, CONTEXT, 5) == {"id": 7, "smileys": 3}


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("no_such_module_abc:run", r"^handler\.target: cannot import module 'no_such_module_abc'"),
        ("tests.worker.sample_handlers:missing", r"^handler\.target: module .* has no attribute 'missing'"),
        ("tests.worker.sample_handlers:NOT_CALLABLE", r"^handler\.target: .* is a int, not a function"),
    ],
)
def test_bad_python_targets_fail_at_build_time(target, expected):
    with pytest.raises(HandlerError, match=expected):
        build_handler(PythonHandlerSpec(target))


def test_dotted_attribute_paths():
    assert load_target("os.path:join", "handler.target") is __import__("os").path.join


def test_missing_program_fails_at_build_time():
    with pytest.raises(
        HandlerError, match=r"^handler\.argv\[0\]: 'no-such-program-xyz' is not an executable"
    ):
        build_handler(CommandHandlerSpec(("no-such-program-xyz",), "stdin"))


def test_command_reads_payload_on_stdin_and_returns_json():
    script = "import json,sys; p=json.load(sys.stdin); print(json.dumps({'double': p['n'] * 2}))"
    assert command(PY, "-c", script)({"n": 21}, CONTEXT, 10) == {"double": 42}


def test_command_gets_payload_as_one_whole_argv_element():
    script = "import sys, json; print(json.dumps(sys.argv[1:]))"
    payload = {"text": "two words; and $(touch /tmp/x) `id` | cat"}
    result = command(PY, "-c", script, "before", "{payload}", "after")(payload, CONTEXT, 10)
    assert result == ["before", '{"text": "two words; and $(touch /tmp/x) `id` | cat"}', "after"]


def test_payload_text_is_never_run_by_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"$(touch {marker}); touch {marker} `touch {marker}`"
    command("echo", "{payload}")(payload, CONTEXT, 10)
    command("cat")(payload, CONTEXT, 10)
    assert not marker.exists()


def test_non_json_stdout_is_returned_as_text():
    assert command("echo", "hello world")(None, CONTEXT, 10) == "hello world"
    assert parse_command_output("") is None
    assert parse_command_output(" [1, 2]\n") == [1, 2]


def test_command_sees_the_task_in_its_environment():
    script = "import os; print(os.environ['EC2CLUSTER_TASK_ID'] + '/' + os.environ['EC2CLUSTER_ATTEMPT'])"
    assert command(PY, "-c", script)(None, CONTEXT, 10) == "t-1/2"


def test_non_zero_exit_is_a_failure_with_the_last_stderr_line_and_the_tail_beside_it():
    script = "import sys; sys.stderr.write('x' * 5000 + '\\nthe real reason\\n\\n'); sys.exit(3)"
    with pytest.raises(TaskFailure) as caught:
        command(PY, "-c", script)(None, CONTEXT, 10)
    # What a person reads: the exit status and what the command said last; the stderr tail is the detail.
    assert str(caught.value) == "command exited with status 3: the real reason"
    assert caught.value.detail.endswith("the real reason") and 1000 < len(caught.value.detail) <= 1500


def test_a_silent_failing_command_says_so():
    with pytest.raises(TaskFailure) as caught:
        command(PY, "-c", "import sys; sys.exit(4)")(None, CONTEXT, 10)
    assert str(caught.value) == "command exited with status 4 (nothing on stderr)"
    assert caught.value.detail is None


def test_command_timeout_kills_the_whole_process_group(tmp_path):
    # The child starts a grandchild; both must die at the deadline.
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        command(PY, "-c", script)(None, CONTEXT, 1.0)
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_python_timeout_interrupts_even_a_handler_that_swallows_exceptions():
    handler = build_handler(PythonHandlerSpec("tests.worker.sample_handlers:hang_if_asked"))
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        handler({"hang": True}, CONTEXT, 0.3)
    assert time.monotonic() - started < 5
    assert handler({}, CONTEXT, 0.3) == {"ok": {}}  # the alarm is disarmed afterwards
    time.sleep(0.4)


def test_timeout_off_the_main_thread_abandons_the_call():
    outcome = {}

    def in_thread():
        try:
            run_with_timeout(lambda: time.sleep(5), 0.2)
        except TaskTimeout:
            outcome["timed_out"] = True
        outcome["value"] = run_with_timeout(lambda: 7, 1)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(3)
    assert outcome == {"timed_out": True, "value": 7}


def test_handler_errors_pass_through_run_with_timeout():
    with pytest.raises(ZeroDivisionError):
        run_with_timeout(lambda: 1 / 0, 1)
