"""The cluster's bundle: the worker, the user's code and their dependencies in one zip built by Airflow.

Instances install it without internet access and without pip (their images may have no pip and a PEP 668
system Python): the boot loader downloads the zip, checks its SHA-256, unpacks it to ``<dir>``, creates a
venv with ``<dir>/code``, ``<dir>`` and ``<dir>/site`` on its path (a .pth file) and runs
``python -m ec2cluster_worker``. The zip holds::

    ec2cluster_worker/*.py   the worker package
    code/<name>              the user's modules and packages
    site/...                 ``pip install --target`` of the worker's dependencies and the user's
                             requirements, wheels only, for the instances' Python and architecture
    manifest.json            what was built

Equal inputs give an equal zip, byte for byte (fixed timestamps and modes, sorted entries), so its SHA-256
identifies the bundle. The installed ``site`` tree is cached by what decides it (the requirements, the target,
the worker's pins, pip's arguments and configuration), and the zip by that plus the code and the worker:
a cached build runs no pip. Unpinned requirements are resolved once per cache key: pin them, or clear
the cache (:func:`default_cache_dir`) to pick up new releases.
"""

from __future__ import annotations

import contextlib
import email.parser
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import ec2cluster_worker
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_ENV = "EC2CLUSTER_BUNDLE_CACHE"
MANIFEST_NAME = "manifest.json"
WORKER_PACKAGE = "ec2cluster_worker"
# The worker's dependencies, pinned to the versions installed here: the bundle runs what the worker was
# tested with.
WORKER_DEPENDENCIES = ("boto3", "botocore")
# EC2's architecture names -> the wheel platform tags' machine names.
ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}
# The newest glibc a wheel may need: 2.28 runs on Debian 10+, Ubuntu 20.04+, Amazon Linux 2023, RHEL 8+.
MAX_GLIBC_MINOR = 28
# The oldest Python a bundle supports when no python_version is given, unless the worker's pins need newer.
MIN_PYTHON_MINOR = 9
PIP_TIMEOUT_SECONDS = 1800
# Cached zips and site trees that no build used for this long are removed after the next new build.
CACHE_UNUSED_SECONDS = 30 * 86400

# A fixed timestamp and fixed modes make the zip (and so its SHA-256) depend on the content alone.
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
_SKIPPED_SUFFIXES = (".pyc", ".pyo")
# pip's environment configuration that cannot change what gets installed (left out of the cache key).
_PIP_ENV_NOISE = {
    "PIP_CERT",
    "PIP_CACHE_DIR",
    "PIP_NO_CACHE_DIR",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_TIMEOUT",
    "PIP_RETRIES",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PIP_NO_INPUT",
    "PIP_PROGRESS_BAR",
    "PIP_QUIET",
    "PIP_VERBOSE",
    "PIP_NO_COLOR",
    "PIP_LOG",
    "PIP_ROOT_USER_ACTION",
}
_PYTHON_VERSION = re.compile(r"3\.(\d{1,2})")
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NOT_FOUND = (
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")

# Runs pip with requirement markers (``; python_version < "3.11"``, ``platform_machine == ...``) evaluated
# for the instances rather than for this interpreter: pip's --python-version and --platform only choose
# the wheels.
_PIP_BOOTSTRAP = """\
import json, os, runpy, sys
# As ``python -m pip``: nothing from the working directory shadows pip.
sys.path[:] = [entry for entry in sys.path if entry not in ("", os.getcwd())]
overrides = json.loads(sys.argv.pop(1))
try:
    from pip._vendor.packaging import markers
    _default_environment = markers.default_environment
    def default_environment():
        environment = _default_environment()
        environment.update(overrides)
        return environment
    markers.default_environment = default_environment
except Exception:
    pass
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


class BundleError(ValueError):
    """A bundle that cannot be built; the message names the launch parameter and the fix."""


@dataclass(frozen=True)
class Target:
    """The instances' Python and architecture.

    ``python_version`` ``None`` takes pure-Python wheels only, which run on any Python the worker's pins
    support.
    """

    python_version: str | None  # "3.11"; None: pure-Python wheels only
    architecture: str = "x86_64"  # EC2's names: "x86_64" or "arm64"

    def __post_init__(self) -> None:
        if self.python_version is not None and (
            not isinstance(self.python_version, str) or not _PYTHON_VERSION.fullmatch(self.python_version)
        ):
            raise BundleError(
                f"python_version: {self.python_version!r} is not a Python version; give the image's Python "
                "as a string 'major.minor' (e.g. '3.11' for Debian 12), or None for pure-Python wheels only"
            )
        if self.architecture not in ARCHITECTURES:
            raise BundleError(
                f"architecture: {self.architecture!r} is not an EC2 architecture; "
                f"use one of {', '.join(sorted(ARCHITECTURES))} (the instance type's)"
            )


@dataclass(frozen=True)
class Bundle:
    path: Path  # the zip on local disk
    sha256: str
    size: int  # bytes
    manifest: dict
    build_seconds: float
    cached: bool  # True when reused from the cache


def default_cache_dir() -> Path:
    """``$EC2CLUSTER_BUNDLE_CACHE``, else ``~/.cache/airflow-ec2cluster/bundles``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "airflow-ec2cluster" / "bundles"


def module_code_path(module: str, search_dirs: Sequence[Path]) -> Path | None:
    """Where the top-level module of ``module`` ("mytasks.sub" -> mytasks) lives in ``search_dirs``, or None.

    A package folder (``<dir>/mytasks/__init__.py``, returned as the folder) wins over a module file
    (``<dir>/mytasks.py``) in the same directory, as in Python's import system; the first directory wins.
    """
    top = module.strip().split(".", 1)[0]
    if not top.isidentifier():
        return None
    for directory in search_dirs:
        directory = Path(directory)
        if (directory / top / "__init__.py").is_file():
            return directory / top
        if (directory / f"{top}.py").is_file():
            return directory / f"{top}.py"
    return None


def build_bundle(
    code: Sequence[str | Path],
    requirements: Sequence[str],
    target: Target,
    *,
    cache_dir: Path | None = None,
    pip_args: Sequence[str] = (),
) -> Bundle:
    """Build (or reuse from the cache) the zip for ``target``; :class:`BundleError` for bad inputs."""
    started = time.monotonic()
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, not {type(target).__name__}")
    if isinstance(code, (str, Path)):
        code = [code]
    if isinstance(requirements, str):
        requirements = [requirements]
    if isinstance(pip_args, str):
        raise TypeError("pip_args must be a sequence of arguments, not one string")
    pip_args = [str(arg) for arg in pip_args]

    reqs = _normalise_requirements(requirements)
    code_files = _collect_code(code)
    pins, floor = _worker_pins(target)
    worker_files = _worker_files()

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for sub in ("site", "zips", "locks", "tmp"):
        (cache / sub).mkdir(parents=True, exist_ok=True)

    site_key = _digest(
        {
            "format": FORMAT_VERSION,
            "requirements": sorted(set(_requirement_key(req) for req in reqs)),
            "target": [target.python_version, target.architecture],
            "pins": pins,
            "pip_args": pip_args,
            "pip_env": _pip_environment(),
            "pip_config": _pip_config_files(),
            "pip": _version_of("pip"),
        }
    )
    zip_key = _digest(
        {
            "site": site_key,
            "requirements": reqs,
            "code": _files_digest(code_files),
            "worker": _files_digest(worker_files),
            "builder": _builder_versions(),
        }
    )
    zip_path = cache / "zips" / f"{zip_key}.zip"
    with _locked(cache, f"zip-{zip_key}"):
        cached = zip_path.is_file()
        if not cached:
            tree, distributions = _ensure_site(cache, site_key, reqs, pins, floor, target, pip_args)
            manifest = {
                "format": FORMAT_VERSION,
                "python_version": target.python_version,
                "min_python_version": floor if target.python_version is None else target.python_version,
                "architecture": target.architecture,
                "requirements": reqs,
                "worker_requirements": pins,
                "distributions": distributions,
                "code": sorted({name.split("/", 2)[1] for name, _ in code_files}),
                "worker": {
                    "version": _version_of("ec2cluster-worker"),
                    "sha256": _files_digest(worker_files),
                },
                "builder": _builder_versions(),
                "pip_args": [_URL_CREDENTIALS.sub("***@", arg) for arg in pip_args],
            }
            entries = [*code_files, *worker_files, *_site_files(tree)]
            _write_zip(zip_path, entries, manifest)
        else:
            os.utime(zip_path)  # used: kept by prune_cache
    data_sha256, size = _sha256_file(zip_path)
    with zipfile.ZipFile(zip_path) as archive:
        manifest = json.loads(archive.read(MANIFEST_NAME))
    if not cached:
        prune_cache(cache)
    return Bundle(
        path=zip_path,
        sha256=data_sha256,
        size=size,
        manifest=manifest,
        build_seconds=time.monotonic() - started,
        cached=cached,
    )


def prune_cache(
    cache: Path, unused_seconds: float = CACHE_UNUSED_SECONDS, now: float | None = None
) -> list[Path]:
    """Remove the cached zips and site trees that no build has used for ``unused_seconds`` (each use
    touches them), skipping any a builder holds; the removed paths. Run after each new build, so that the
    cache keeps what recent launches use and no more."""
    cutoff = (time.time() if now is None else now) - unused_seconds
    removed = []
    for path in sorted((cache / "zips").glob("*.zip")):
        if _remove_unused(cache, f"zip-{path.stem}", path, path, cutoff):
            removed.append(path)
    for tree in sorted((cache / "site").iterdir()):
        if _remove_unused(cache, f"site-{tree.name}", tree / "site.json", tree, cutoff):
            removed.append(tree)
    return removed


def _remove_unused(cache: Path, lock: str, stamp: Path, path: Path, cutoff: float) -> bool:
    with _locked(cache, lock, wait=False) as held:
        if not held:  # a builder is using it
            return False
        try:
            used = (stamp if stamp.exists() else path).stat().st_mtime
        except FileNotFoundError:
            return False
        if used >= cutoff:
            return False
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return True


# --- inputs -------------------------------------------------------------------------------------------------


def _normalise_requirements(requirements: Sequence[str]) -> list[str]:
    reqs: list[str] = []
    for raw in requirements:
        req = str(raw).strip()
        if not req or req.startswith("#"):
            continue
        lowered = req.lower()
        if lowered.startswith("s3://") or re.search(r"@\s*s3://", lowered):
            raise BundleError(
                f"requirements: pip cannot install s3:// URLs: {req!r}; download the wheel and give its "
                "local path (or an https:// URL), or put it in a folder and pass "
                "pip_args=['--find-links', <folder>]"
            )
        if req.startswith("-"):
            raise BundleError(
                f"requirements: {req!r} is a pip option, not a requirement; pass it in pip_args instead"
            )
        if req not in reqs:
            reqs.append(req)
    return reqs


def _local_requirement_path(req: str) -> Path | None:
    """The file a requirement points at (a path, a file:// URL or ``name @ file://...``), if it exists."""
    location = req.split("@", 1)[1].strip() if re.match(r"^[A-Za-z0-9._-]+\s*@", req) else req
    if location.lower().startswith("file://"):
        location = unquote(urlsplit(location).path)
    path = Path(location).expanduser()
    with contextlib.suppress(OSError):
        if path.is_file():
            return path
    return None


def _requirement_key(req: str) -> str:
    """The requirement as it decides the install: a local wheel counts by its content, not its path alone."""
    path = _local_requirement_path(req)
    if path is None:
        return req
    return f"{req}#sha256={_sha256_file(path)[0]}"


def _collect_code(code: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(archive name, file)`` for every file of the user's code, sorted; BundleError for a bad path."""
    files: list[tuple[str, Path]] = []
    origins: dict[str, Path] = {}
    for given in code:
        path = Path(given).expanduser()
        if not path.exists():
            raise BundleError(
                f"code: {str(given)!r} not found (looked at {path.absolute()}); give paths of module files "
                "(mytasks.py) or package folders (mypkg/ with __init__.py) on the Airflow side"
            )
        path = path.resolve()
        if path.is_file():
            if path.suffix != ".py" or not path.stem.isidentifier():
                raise BundleError(
                    f"code: {str(given)!r} is not an importable Python module file; give .py files whose "
                    "names are Python identifiers (mytasks.py), or package folders"
                )
            name = path.stem
            package_files = [(f"code/{path.name}", path)]
        else:
            if not (path / "__init__.py").is_file():
                raise BundleError(
                    f"code: folder {str(given)!r} is not a package (no __init__.py); add __init__.py or "
                    "pass the module files"
                )
            if not path.name.isidentifier():
                raise BundleError(
                    f"code: folder {str(given)!r} is not an importable package name; rename it to a "
                    "Python identifier"
                )
            name = path.name
            package_files = [
                (f"code/{name}/{rel}", file) for rel, file in _tree_files(path, skip_hidden=True)
            ]
        if name == WORKER_PACKAGE:
            raise BundleError(
                f"code: {str(given)!r} would shadow the worker package {WORKER_PACKAGE}; rename it"
            )
        if name in origins:
            raise BundleError(
                f"code: {str(origins[name])!r} and {str(given)!r} both give the top-level name {name!r}; "
                "rename one or pass only one"
            )
        origins[name] = Path(given)
        files.extend(package_files)
    return sorted(files)


def _tree_files(root: Path, *, skip_hidden: bool, skip_top: Sequence[str] = ()) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, file)`` under ``root``: no ``__pycache__``, ``*.pyc`` (nor hidden files)."""
    for directory, dirnames, filenames in os.walk(root):
        relative_dir = Path(directory).relative_to(root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d != "__pycache__"
            and not (skip_hidden and d.startswith("."))
            and not (relative_dir == Path(".") and d in skip_top)
        )
        for filename in sorted(filenames):
            if filename.endswith(_SKIPPED_SUFFIXES) or (skip_hidden and filename.startswith(".")):
                continue
            yield (relative_dir / filename).as_posix(), Path(directory) / filename


def _worker_files() -> list[tuple[str, Path]]:
    package_dir = Path(ec2cluster_worker.__file__).resolve().parent
    return sorted(
        (f"{WORKER_PACKAGE}/{rel}", path)
        for rel, path in _tree_files(package_dir, skip_hidden=True)
        if rel.endswith(".py")
    )


def _site_files(tree: Path) -> list[tuple[str, Path]]:
    # bin/ holds console scripts whose #! names this machine's Python: useless on the instances.
    return [(f"site/{rel}", file) for rel, file in _tree_files(tree, skip_hidden=False, skip_top=("bin",))]


def _worker_pins(target: Target) -> tuple[list[str], str]:
    """The worker's dependencies pinned to this environment's versions, and the oldest Python they run on."""
    pins: list[str] = []
    specifiers: list[tuple[str, SpecifierSet]] = []
    for name in WORKER_DEPENDENCIES:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as error:
            raise BundleError(
                f"requirements: the worker needs {name}, which is not installed on the Airflow side; "
                f"install {name} alongside this provider"
            ) from error
        pin = f"{name}=={distribution.version}"
        pins.append(pin)
        with contextlib.suppress(InvalidSpecifier, TypeError):
            specifiers.append((pin, SpecifierSet(distribution.metadata.get("Requires-Python") or "")))
    floor = next(
        (
            f"3.{minor}"
            for minor in range(MIN_PYTHON_MINOR, 40)
            if all(spec.contains(Version(f"3.{minor}")) for _, spec in specifiers)
        ),
        f"3.{MIN_PYTHON_MINOR}",
    )
    if target.python_version is not None:
        for pin, spec in specifiers:
            if not spec.contains(Version(target.python_version)):
                raise BundleError(
                    f"python_version: the worker runs {pin} (the version on the Airflow side), which needs "
                    f"Python {spec}, not {target.python_version}; use an image whose Python is {floor} or "
                    f"newer and set python_version to it, or install an older {pin.split('==')[0]} on the "
                    "Airflow side"
                )
    return pins, floor


# --- the site tree ------------------------------------------------------------------------------------------


def _ensure_site(
    cache: Path,
    key: str,
    reqs: list[str],
    pins: list[str],
    floor: str,
    target: Target,
    pip_args: list[str],
) -> tuple[Path, dict[str, str]]:
    """The cached ``pip install --target`` tree for ``key`` (built once, atomically) and its distributions."""
    final = cache / "site" / key
    with _locked(cache, f"site-{key}"):
        record = final / "site.json"
        if record.is_file():
            os.utime(record)  # used: kept by prune_cache
            return final / "tree", json.loads(record.read_text())["distributions"]
        staging = Path(tempfile.mkdtemp(prefix=f"site-{key[:12]}-", dir=cache / "tmp"))
        try:
            tree = staging / "tree"
            _pip_install(tree, reqs, pins, floor, target, pip_args)
            distributions = _distributions(tree)
            (staging / "site.json").write_text(json.dumps({"distributions": distributions}, indent=2))
            if final.exists():  # a leftover without site.json: not ours to trust
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final / "tree", distributions


def _platform_args(target: Target, floor: str) -> list[str]:
    if target.python_version is None:
        return ["--python-version", floor, "--implementation", "py", "--abi", "none", "--platform", "any"]
    return [
        "--python-version",
        target.python_version,
        "--implementation",
        "cp",
        *(arg for tag in _platforms(target.architecture) for arg in ("--platform", tag)),
    ]


def _platforms(architecture: str) -> list[str]:
    """Wheel platform tags for Linux on ``architecture`` (EC2's name), the most specific first."""
    machine = ARCHITECTURES[architecture]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(MAX_GLIBC_MINOR, 16, -1)]
    tags.insert(tags.index(f"manylinux_2_17_{machine}") + 1, f"manylinux2014_{machine}")
    if machine == "x86_64":
        tags += [f"manylinux_2_12_{machine}", f"manylinux2010_{machine}"]
        tags += [f"manylinux_2_5_{machine}", f"manylinux1_{machine}"]
    return [*tags, f"linux_{machine}"]


def _marker_environment(target: Target, floor: str) -> dict[str, str]:
    version = target.python_version or floor
    return {
        "python_version": version,
        "python_full_version": f"{version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": ARCHITECTURES[target.architecture],
    }


def _pip_command(arguments: Sequence[str], target: Target, floor: str) -> list[str]:
    marker_env = json.dumps(_marker_environment(target, floor), sort_keys=True)
    return [sys.executable, "-c", _PIP_BOOTSTRAP, marker_env, *arguments]


def _pip_install(
    tree: Path, reqs: list[str], pins: list[str], floor: str, target: Target, pip_args: list[str]
) -> None:
    arguments = [
        "install",
        "--target",
        str(tree),
        "--only-binary=:all:",
        "--no-compile",
        "--disable-pip-version-check",
        "--no-warn-conflicts",
        "--upgrade",
        "--no-input",
        *_platform_args(target, floor),
        *pip_args,
        *pins,
        *reqs,
    ]
    command = _pip_command(arguments, target, floor)
    log.info("Installing the bundle's dependencies: pip %s", " ".join(arguments))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as error:
        raise BundleError(
            f"requirements: pip took over {PIP_TIMEOUT_SECONDS} s installing {reqs or pins}; check the "
            "index is reachable from the Airflow side (pip_args, PIP_INDEX_URL)"
        ) from error
    if result.returncode != 0:
        log.warning("pip failed (exit %s):\n%s", result.returncode, result.stderr[-20_000:])
        raise _pip_error(result.stderr, reqs, pins, floor, target, pip_args)


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    line = (errors or lines or ["no output"])[-1]
    return line.removeprefix("ERROR:").strip()


def _pip_error(
    stderr: str, reqs: list[str], pins: list[str], floor: str, target: Target, pip_args: list[str]
) -> BundleError:
    last = _last_error_line(stderr)
    machine = ARCHITECTURES[target.architecture]
    if re.search(r"No module named '?pip'?$", stderr, re.M):
        return BundleError(
            f"requirements: the Airflow side's Python ({sys.executable}) has no pip to build the bundle "
            f"with (pip: {last}); install pip in Airflow's environment"
        )
    missing = next((match.group(1) for pattern in _NOT_FOUND for match in pattern.finditer(stderr)), None)
    if missing is not None:
        name_match = _REQUIREMENT_NAME.match(missing)
        name = name_match.group(0) if name_match else missing
        if target.python_version is not None:
            return BundleError(
                f"requirements: no wheel of {name!r} for Python {target.python_version} on manylinux "
                f"{machine} (pip: {last}); pick a version with a wheel for that platform, or bake it "
                "into the AMI"
            )
        if _has_binary_wheels(missing, target, pip_args):
            return BundleError(
                f"requirements: no pure-Python wheel of {name!r}, it has only binary wheels (pip: {last}); "
                "set python_version to the image's Python (e.g. '3.11' for Debian 12) to take the wheels "
                "for that Python and architecture"
            )
        return BundleError(
            f"requirements: no wheel of {name!r} for Python {floor}+ (pip: {last}); pick a version with a "
            "wheel (the instances cannot build from source), or bake it into the AMI; if it has "
            "binary wheels, set python_version to the image's Python (e.g. '3.11' for Debian 12)"
        )
    if "ResolutionImpossible" in stderr or "conflicting dependencies" in stderr:
        conflict = [line for line in stderr.splitlines() if line.startswith("ERROR: Cannot install")]
        last = _last_error_line(conflict[-1]) if conflict else last
        return BundleError(
            f"requirements: pip cannot install {reqs} together with the worker's {pins} (pip: {last}); "
            "loosen the conflicting pins (the worker needs the boto3 and botocore of the Airflow side)"
        )
    return BundleError(
        f"requirements: pip failed installing {reqs or pins} for "
        f"{_describe(target, floor)} (pip: {last}); check the requirements and pip_args "
        "(index URL, --find-links)"
    )


def _has_binary_wheels(requirement: str, target: Target, pip_args: list[str]) -> bool:
    """Whether ``requirement`` has CPython wheels for Linux (to tell a pure-only build's miss from a typo)."""
    name_match = _REQUIREMENT_NAME.match(requirement)
    if name_match is None:
        return False
    major_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    probe_target = Target(major_minor, target.architecture)
    arguments = [
        "index",
        "versions",
        name_match.group(0),
        "--disable-pip-version-check",
        "--no-input",
        *_platform_args(probe_target, major_minor),
        *pip_args,
    ]
    try:
        result = subprocess.run(
            _pip_command(arguments, probe_target, major_minor),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "Available versions" in result.stdout


def _describe(target: Target, floor: str) -> str:
    if target.python_version is None:
        return f"pure-Python wheels (Python {floor}+)"
    return f"Python {target.python_version} on manylinux {ARCHITECTURES[target.architecture]}"


def _distributions(tree: Path) -> dict[str, str]:
    """``{name: version}`` of every distribution installed in ``tree``, from its METADATA."""
    parser = email.parser.HeaderParser()
    distributions: dict[str, str] = {}
    for metadata in sorted(tree.glob("*.dist-info/METADATA")):
        headers = parser.parsestr(metadata.read_text(encoding="utf-8", errors="replace"))
        if headers.get("Name") and headers.get("Version"):
            distributions[headers["Name"]] = headers["Version"]
    return dict(sorted(distributions.items(), key=lambda item: item[0].lower()))


def _pip_environment() -> dict[str, str]:
    """pip's environment configuration that can change what gets installed."""
    return {
        key: value
        for key, value in sorted(os.environ.items())
        if key.startswith("PIP_") and key not in _PIP_ENV_NOISE
    }


def _pip_config_files() -> dict[str, str]:
    """``{path: sha256}`` of the pip configuration files that exist (index URLs, find-links, constraints)."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidates = [
        Path(d) / "pip" / "pip.conf" for d in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    ]
    candidates += [
        Path("/etc/pip.conf"),
        Path.home() / ".pip" / "pip.conf",
        config_home / "pip" / "pip.conf",
        Path(sys.prefix) / "pip.conf",
    ]
    if os.environ.get("PIP_CONFIG_FILE"):
        candidates.append(Path(os.environ["PIP_CONFIG_FILE"]))
    found = {}
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if candidate.is_file():
                found[str(candidate)] = _sha256_file(candidate)[0]
    return found


# --- the zip ------------------------------------------------------------------------------------------------


def _write_zip(path: Path, entries: list[tuple[str, Path]], manifest: dict) -> None:
    """Write the deterministic zip atomically (a temporary file renamed over ``path``)."""
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.stem[:12]}-", suffix=".zip", dir=path.parent)
    os.close(descriptor)
    try:
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        items: list[tuple[str, Path | bytes]] = [*entries, (MANIFEST_NAME, manifest_bytes)]
        with zipfile.ZipFile(staging, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, source in sorted(items, key=lambda item: item[0]):
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # Unix, whatever the builder's OS: the modes below are Unix modes
                if isinstance(source, bytes):
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, source)
                    continue
                info.external_attr = (0o755 if _is_executable(source) else 0o644) << 16
                info.file_size = source.stat().st_size  # lets zipfile choose zip64 for huge files only
                with source.open("rb") as reader, archive.open(info, "w") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


# --- helpers ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(cache: Path, name: str, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock shared by every builder of ``name`` on this machine (released on exit or death);
    yields whether it is held (always, unless ``wait`` is False and another process holds it)."""
    with open(cache / "locks" / f"{name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _files_digest(files: Sequence[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in sorted(files):
        mode = "x" if _is_executable(path) else "-"
        digest.update(f"{name}\0{mode}\0{_sha256_file(path)[0]}\n".encode())
    return digest.hexdigest()


def _is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o111)


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _builder_versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "pip": _version_of("pip"),
        "airflow-ec2cluster": _version_of("airflow-ec2cluster"),
        "ec2cluster-worker": _version_of("ec2cluster-worker"),
    }
