"""DESIGN.md's map names every module of the three distributions, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "airflow_ec2cluster": ROOT / "airflow_ec2cluster",
    "ec2cluster_worker": ROOT / "worker" / "ec2cluster_worker",
    "ec2cluster_localcloud": ROOT / "localcloud" / "ec2cluster_localcloud",
}


def map_section() -> str:
    text = (ROOT / "DESIGN.md").read_text()
    return text.split("## Map", 1)[1].split("\n## ", 1)[0]


def test_every_module_is_on_the_map():
    named = set(re.findall(r"[\w/]+\.py", map_section()))
    basenames = {Path(n).name for n in named}
    missing = []
    for root in PACKAGES.values():
        for path in root.rglob("*.py"):
            if path.name == "__init__.py":
                continue
            relative = path.relative_to(root).as_posix()
            if relative not in named and path.name not in basenames:
                missing.append(f"{root.name}/{relative}")
    assert not missing, f"modules DESIGN.md's map does not name: {missing}"


def test_the_map_names_only_modules_that_exist():
    existing = {p.name for root in PACKAGES.values() for p in root.rglob("*.py")}
    named = {Path(n).name for n in re.findall(r"[\w/]+\.py", map_section())}
    named -= {"test_distributions.py", "test_module_imports.py", "test_meta.py"}
    assert named <= existing, f"DESIGN.md's map names modules that do not exist: {sorted(named - existing)}"
