"""Minimal wheels built by hand, for tests that need a requirement no index has."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def write_wheel(
    directory: Path,
    name: str,
    *,
    version: str = "1.0",
    tag: str = "py3-none-any",
    requires: tuple[str, ...] = (),
) -> Path:
    """A minimal wheel: ``<module>/__init__.py`` and its dist-info (METADATA, WHEEL, RECORD)."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    python_tags, abi_tags, platform_tags = tag.split("-")
    wheel_tags = "".join(
        f"Tag: {py}-{abi}-{plat}\n"
        for py in python_tags.split(".")
        for abi in abi_tags.split(".")
        for plat in platform_tags.split(".")
    )
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{module}/__init__.py": f"NAME = {name!r}\nVERSION = {version!r}\n",
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test_bundle\n"
            f"Root-Is-Purelib: {'true' if platform_tags == 'any' else 'false'}\n{wheel_tags}"
        ),
    }
    record_lines = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{path},sha256={digest},{len(data)}")
    record_lines.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record_lines) + "\n"
    wheel = directory / f"{module}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel
