"""A handler module whose import behaves differently in a process-isolation child, as a module may on an
instance (a heavy library on a cold disk, a library that fails in a fresh interpreter). The worker's own
import (its check of the target) is never affected.

- ``EC2CLUSTER_TEST_IMPORT_GATE``: a file the child's import waits for (a test holds the import for as long
  as it needs to observe the worker meanwhile).
- ``EC2CLUSTER_TEST_IMPORT_FAILS``: the child's import raises ImportError with that text.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

if os.path.basename(sys.argv[0]) == "isolation.py":
    if os.environ.get("EC2CLUSTER_TEST_IMPORT_FAILS"):
        raise ImportError(os.environ["EC2CLUSTER_TEST_IMPORT_FAILS"])
    if os.environ.get("EC2CLUSTER_TEST_IMPORT_GATE"):
        gate = Path(os.environ["EC2CLUSTER_TEST_IMPORT_GATE"])
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def echo(payload: Any, context: Any) -> Any:
    return {"echo": payload, "pid": os.getpid()}
