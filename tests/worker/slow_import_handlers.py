"""A handler module whose import, in a process-isolation child only, waits until the test opens a gate
(``EC2CLUSTER_TEST_IMPORT_GATE``: a file to wait for): a heavy import (a large library on a cold disk) that
the test can hold for as long as it needs to observe the worker meanwhile. The worker's own import (its check
of the target) does not wait."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

if os.path.basename(sys.argv[0]) == "isolation.py" and os.environ.get("EC2CLUSTER_TEST_IMPORT_GATE"):
    gate = Path(os.environ["EC2CLUSTER_TEST_IMPORT_GATE"])
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def echo(payload: Any, context: Any) -> Any:
    return {"echo": payload, "pid": os.getpid()}
