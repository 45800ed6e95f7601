"""Root filesystems for the local cloud's image-backed AMIs, built once with debootstrap and cached on disk.

``ensure_rootfs("debian-12")`` returns the directory of a Debian 12 minimal root filesystem (``debootstrap
--variant=minbase --include=python3,ca-certificates bookworm``): what a stock Debian 12 or Ubuntu 24.04 image
looks like to a bootstrap script (python3 without pip or venv, PEP 668's EXTERNALLY-MANAGED marker).
"debian-11" (bullseye: Python 3.9, no marker) is the older flavour.

The cache (default ``~/.cache/ec2cluster-localcloud/images/<flavour>/``, or ``EC2CLUSTER_IMAGE_CACHE``, or
the ``cache_dir`` argument) is shared across runs and processes: a build goes into a temporary directory
next to it, renamed into place when complete, under an exclusive lock file, so two processes never build
at once and a reader never sees half an image. Building needs root and debootstrap; without them it fails
with an error naming what is missing (it never skips).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "EC2CLUSTER_IMAGE_CACHE"
DEFAULT_CACHE = Path("~/.cache/ec2cluster-localcloud/images")
MIRROR = "http://deb.debian.org/debian"
COMPLETE_MARKER = ".ec2cluster-image-complete"
SBIN_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Flavour:
    name: str
    suite: str
    description: str


FLAVOURS = {
    "debian-12": Flavour("debian-12", "bookworm", "Debian 12 minimal (python3 3.11, no pip, PEP 668)"),
    "debian-11": Flavour("debian-11", "bullseye", "Debian 11 minimal (python3 3.9, no pip)"),
}


class ImageError(RuntimeError):
    """An image's root filesystem cannot be built here (the message says what is missing)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def find_tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_PATH])
    return shutil.which(name, path=path)


def rootfs_path(flavour: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / flavour


def ensure_rootfs(flavour: str = "debian-12", cache_dir: str | Path | None = None) -> Path:
    """The flavour's root filesystem directory, built now (about a minute) if the cache lacks it."""
    if flavour not in FLAVOURS:
        raise ImageError(f"unknown image flavour {flavour!r}: one of {', '.join(sorted(FLAVOURS))}")
    target = rootfs_path(flavour, cache_dir)
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{flavour}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if not (target / COMPLETE_MARKER).exists():
            _build(FLAVOURS[flavour], target)
    return target


def _build(flavour: Flavour, target: Path) -> None:
    debootstrap = find_tool("debootstrap")
    if debootstrap is None:
        raise ImageError(
            f"building the {flavour.name} image needs debootstrap, which is not installed: "
            "apt-get install debootstrap"
        )
    if os.geteuid() != 0:
        raise ImageError(f"building the {flavour.name} image with debootstrap needs root")
    if target.exists():  # an incomplete leftover (no marker): rebuild
        shutil.rmtree(target)
    building = Path(tempfile.mkdtemp(prefix=f".{flavour.name}.build-", dir=target.parent))
    log_path = target.parent / f"{flavour.name}.build.log"
    command = [debootstrap, "--variant=minbase", "--include=python3,ca-certificates"]
    command += [flavour.suite, str(building), MIRROR]
    started = time.monotonic()
    try:
        with open(log_path, "wb") as out:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise ImageError(
                f"debootstrap of {flavour.name} failed (status {result.returncode}); see {log_path}:\n"
                + "\n".join(tail)
            )
        (building / COMPLETE_MARKER).write_text(
            f"{flavour.description}\nbuilt in {time.monotonic() - started:.0f} s\n", encoding="utf-8"
        )
        os.rename(building, target)  # atomic: readers see no image or a complete one
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
