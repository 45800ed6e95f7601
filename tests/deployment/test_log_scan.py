"""The deployment test's log scanner finds what it must (so an empty answer means something)."""

from __future__ import annotations

import json

from ec2cluster_localcloud.deployment import error_lines


def record(level: str, event: str, **extra) -> str:
    return json.dumps({"timestamp": "2026-01-01T00:00:00Z", "level": level, "event": event, **extra})


def test_error_lines_in_component_output_and_task_logs(tmp_path):
    component = tmp_path / "scheduler.log"
    component.write_text(
        "2026-01-01T00:00:00.1Z [info     ] Starting the scheduler [airflow.jobs]\n"
        "2026-01-01T00:00:00.2Z [warning  ] The HMAC key is short [py.warnings]\n"
        "2026-01-01T00:00:00.3Z [error    ] XCom not found [airflow.sdk] key='x' status_code=404\n"
        "[2026-01-01 00:00:00,400] {taskinstance.py:1} ERROR - Task failed\n"
        "Traceback (most recent call last):\n"
        "\x1b[31m2026-01-01T00:00:00.5Z [critical ] gone\x1b[0m\n"
    )
    task_log = tmp_path / "attempt=1.log"
    task_log.write_text(
        "\n".join(
            [
                record("info", "Done. error_count=0, errors: none"),
                record("error", "Task failed with exception"),
                record("info", "something", exc_info=[{"exc_type": "ValueError"}]),
                record("warning", "slow"),
            ]
        )
        + "\n"
    )
    found = error_lines([component, task_log, tmp_path / "absent.log"])
    assert [line.split(": ", 1)[0] for line in found] == [
        f"{component}:3",
        f"{component}:4",
        f"{component}:5",
        f"{component}:6",
        f"{task_log}:2",
        f"{task_log}:3",
    ]


def test_a_clean_log_has_no_error_lines(tmp_path):
    log = tmp_path / "api-server.log"
    log.write_text("2026-01-01T00:00:00Z [info     ] request finished status_code=200 path=/errors\n")
    assert error_lines([log]) == []


def test_an_exit_request_swallowed_by_a_finalizer_is_not_an_error_but_other_ignored_exceptions_are(tmp_path):
    # What the scheduler printed when SIGTERM landed in a garbage-collection callback (a real CI run).
    swallowed_exit = (
        "Exception ignored in: <function _collection_gced at 0x7f9dd5c6b920>\n"
        "Traceback (most recent call last):\n"
        '  File "/v/sqlalchemy/event/registry.py", line 104, in _collection_gced\n'
        "    def _collection_gced(ref: weakref.ref[Any]) -> None:\n"
        "    \n"
        '  File "/v/airflow/jobs/scheduler_job_runner.py", line 520, in _exit_gracefully\n'
        "    sys.exit(os.EX_OK)\n"
        "SystemExit: 0\n"
    )
    swallowed_error = swallowed_exit.replace("SystemExit: 0", "ValueError: closed file")
    log = tmp_path / "scheduler.log"
    log.write_text(
        "2026-01-01T00:00:00Z [info     ] Exiting gracefully upon receiving signal 15 [airflow.jobs]\n"
        + swallowed_exit
        + "2026-01-01T00:00:01Z [info     ] Received executor event [airflow.jobs]\n"
        + swallowed_error
    )
    found = error_lines([log])
    assert [line.split(": ", 1)[1] for line in found] == ["Traceback (most recent call last):"]
    assert found[0].startswith(f"{log}:12:")
