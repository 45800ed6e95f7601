"""The cluster's bundle: layout, determinism, the cache, errors, and a bundle that runs in a bare venv.

The user's requirements are tiny wheels written here (``--find-links``); boto3 and botocore, pinned to this
environment's versions, come from pip's configured sources. The site-tree cache is shared by the session so
pip installs boto3 only a few times.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from airflow_ec2cluster import bundle as bundle_module
from airflow_ec2cluster.bundle import (
    Bundle,
    BundleError,
    Target,
    build_bundle,
    default_cache_dir,
    module_code_path,
    prune_cache,
)
from tests.wheels import write_wheel

BOTO3_VERSION = importlib.metadata.version("boto3")
BINARY_TAG = "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64"
# Names no index has: pip must take them from the test's --find-links folder.
PURE_REQ = "ec2cluster-tinyreq"
BINARY_REQ = "ec2cluster-tinybin"
MARKER_REQ = "ec2cluster-tinymarker"


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    write_wheel(directory, PURE_REQ)
    write_wheel(directory, BINARY_REQ, tag=BINARY_TAG)
    # Markers are evaluated for the instances: pure-only bundles for their oldest Python (3.10 with today's
    # boto3), on Linux x86_64 by default, whatever this interpreter is.
    write_wheel(
        directory,
        MARKER_REQ,
        requires=(
            'ec2cluster-markerold; python_version < "3.11"',
            'ec2cluster-markerarm; platform_machine == "aarch64"',
        ),
    )
    write_wheel(directory, "ec2cluster-markerold")
    write_wheel(directory, "ec2cluster-markerarm")
    return directory


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundle-cache")


@pytest.fixture
def code_dir(tmp_path) -> Path:
    directory = tmp_path / "dags"
    (directory / "mypkg" / "sub").mkdir(parents=True)
    (directory / "mytasks.py").write_text("def handle(message):\n    return {'ok': message}\n")
    (directory / "mypkg" / "__init__.py").write_text("from .core import VALUE\n")
    (directory / "mypkg" / "core.py").write_text("VALUE = 42\n")
    (directory / "mypkg" / "sub" / "data.txt").write_text("data\n")
    (directory / "mypkg" / "__pycache__").mkdir()
    (directory / "mypkg" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\0")
    (directory / "mypkg" / "stale.pyc").write_bytes(b"\0")
    (directory / "mypkg" / ".secret").write_text("hidden\n")
    (directory / "mypkg" / ".git").mkdir()
    (directory / "mypkg" / ".git" / "HEAD").write_text("ref\n")
    return directory


def pure_bundle(code_dir: Path, wheels: Path, cache: Path, **kwargs) -> Bundle:
    return build_bundle(
        [code_dir / "mytasks.py", code_dir / "mypkg"],
        [PURE_REQ, MARKER_REQ],
        Target(None),
        cache_dir=cache,
        pip_args=["--find-links", str(wheels)],
        **kwargs,
    )


def names_in(bundle: Bundle) -> list[str]:
    with zipfile.ZipFile(bundle.path) as archive:
        return archive.namelist()


def forbid_subprocesses(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", fail)


def test_layout_and_manifest(code_dir, wheels, shared_cache):
    bundle = pure_bundle(code_dir, wheels, shared_cache)
    names = names_in(bundle)
    assert names == sorted(names)
    assert "ec2cluster_worker/__main__.py" in names and "ec2cluster_worker/loop.py" in names
    code = sorted(name for name in names if name.startswith("code/"))
    assert code == [
        "code/mypkg/__init__.py",
        "code/mypkg/core.py",
        "code/mypkg/sub/data.txt",
        "code/mytasks.py",
    ]
    assert "site/boto3/__init__.py" in names and "site/botocore/__init__.py" in names
    assert "site/ec2cluster_tinyreq/__init__.py" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert not [name for name in names if name.startswith("site/bin/")]
    # The markers are evaluated for Python 3.10 on x86_64 Linux (the bundle's oldest Python), not for 3.11.
    assert "site/ec2cluster_markerold/__init__.py" in names
    assert "site/ec2cluster_markerarm/__init__.py" not in names

    with zipfile.ZipFile(bundle.path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        infos = archive.infolist()
    assert manifest == bundle.manifest
    assert manifest["python_version"] is None
    assert manifest["architecture"] == "x86_64"
    assert manifest["requirements"] == [PURE_REQ, MARKER_REQ]
    assert manifest["worker_requirements"] == [
        f"boto3=={BOTO3_VERSION}",
        f"botocore=={importlib.metadata.version('botocore')}",
    ]
    assert manifest["distributions"]["boto3"] == BOTO3_VERSION
    assert manifest["distributions"][PURE_REQ] == "1.0"
    assert manifest["code"] == ["mypkg", "mytasks.py"]
    assert manifest["worker"]["version"] == importlib.metadata.version("ec2cluster-worker")
    assert manifest["builder"]["pip"] and manifest["builder"]["python"]
    assert {info.date_time for info in infos} == {(2020, 1, 1, 0, 0, 0)}

    assert bundle.sha256 == hashlib.sha256(bundle.path.read_bytes()).hexdigest()
    assert bundle.size == bundle.path.stat().st_size
    assert bundle.build_seconds > 0


def test_equal_inputs_give_equal_bytes_even_built_concurrently(
    code_dir, wheels, shared_cache, tmp_path, monkeypatch
):
    """A second cold build (a fresh cache, pip again) gives the same SHA-256; concurrent builders of one key
    wait on each other's lock and install once."""
    first = pure_bundle(code_dir, wheels, shared_cache)
    real_run = subprocess.run
    installs = []

    def counting_run(command, *args, **kwargs):
        if "install" in command:
            installs.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    fresh = tmp_path / "fresh-cache"
    results: list[Bundle] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(pure_bundle(code_dir, wheels, fresh))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(installs) == 1
    assert sorted(bundle.cached for bundle in results) == [False, True]
    assert {bundle.sha256 for bundle in results} == {first.sha256}
    assert results[0].path.read_bytes() == first.path.read_bytes()
    assert not list((fresh / "tmp").iterdir())  # the staging tree was renamed into place


def test_a_cached_build_runs_no_pip(code_dir, wheels, shared_cache, monkeypatch):
    first = pure_bundle(code_dir, wheels, shared_cache)
    forbid_subprocesses(monkeypatch)
    again = pure_bundle(code_dir, wheels, shared_cache)
    assert again.cached and again.sha256 == first.sha256 and again.path == first.path
    assert again.build_seconds < 5

    # New code reuses the installed site tree: a new zip, still no pip.
    (code_dir / "mytasks.py").write_text("def handle(message):\n    return {'changed': message}\n")
    changed = pure_bundle(code_dir, wheels, shared_cache)
    assert not changed.cached and changed.sha256 != first.sha256
    assert changed.manifest["distributions"] == first.manifest["distributions"]


def test_the_cache_forgets_what_no_build_used_for_a_month(code_dir, wheels, shared_cache, tmp_path):
    pure_bundle(code_dir, wheels, shared_cache)  # the site tree, installed once per session
    cache = tmp_path / "cache"
    shutil.copytree(shared_cache, cache)
    month_ago = time.time() - 31 * 86400
    for stale in [*(cache / "zips").glob("*.zip"), *(cache / "site").glob("*/site.json")]:
        os.utime(stale, (month_ago, month_ago))
    old_zips = set((cache / "zips").glob("*.zip"))

    # A new build (new code) reuses its site tree, which that use keeps; every other unused tree and zip goes.
    (code_dir / "mytasks.py").write_text("def handle(message):\n    return {'new': message}\n")
    new = pure_bundle(code_dir, wheels, cache)
    assert not new.cached and new.path not in old_zips
    assert set((cache / "zips").glob("*.zip")) == {new.path}
    [site] = (cache / "site").iterdir()
    assert (site / "site.json").stat().st_mtime > month_ago + 86400

    # What a builder holds is never removed; once it lets go, what is unused goes.
    a_year_on = time.time() + 365 * 86400
    with bundle_module._locked(cache, f"site-{site.name}"):
        assert prune_cache(cache, now=a_year_on) == [new.path]
    assert site.is_dir()
    assert prune_cache(cache, now=a_year_on) == [site]
    assert prune_cache(cache) == []


def run_in_bare_venv(bundle: Bundle, tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Unpack like the boot loader: a venv without pip, with code, the root and site on its path."""
    root = tmp_path / "bundle"
    with zipfile.ZipFile(bundle.path) as archive:
        archive.extractall(root)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "ec2cluster.pth").write_text(f"{root / 'code'}\n{root}\n{root / 'site'}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )


def test_the_bundle_runs_in_a_venv_without_pip(code_dir, wheels, shared_cache, tmp_path):
    bundle = pure_bundle(code_dir, wheels, shared_cache)
    result = run_in_bare_venv(
        bundle,
        tmp_path,
        "import boto3, mytasks, mypkg, ec2cluster_tinyreq, ec2cluster_worker, ec2cluster_worker.loop\n"
        "assert mypkg.VALUE == 42 and mytasks.handle(1) == {'ok': 1}\n"
        f"assert boto3.__version__ == {BOTO3_VERSION!r}\n"
        "print(boto3.__file__)\n",
    )
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "bundle" / "site") in result.stdout
    isolated = run_in_bare_venv(bundle, tmp_path / "again", "import pytest")
    assert isolated.returncode != 0 and "No module named 'pytest'" in isolated.stderr


def test_a_binary_only_requirement_needs_python_version(code_dir, wheels, shared_cache, tmp_path):
    args = {"cache_dir": shared_cache, "pip_args": ["--find-links", str(wheels)]}
    with pytest.raises(BundleError) as pure_only:
        build_bundle([code_dir / "mytasks.py"], [BINARY_REQ], Target(None), **args)
    message = str(pure_only.value)
    assert message.startswith("requirements: ")
    assert f"'{BINARY_REQ}'" in message and "set python_version" in message and "'3.11'" in message

    bundle = build_bundle([code_dir / "mytasks.py"], [BINARY_REQ, MARKER_REQ], Target("3.11"), **args)
    names = names_in(bundle)
    assert "site/ec2cluster_tinybin/__init__.py" in names
    assert "site/ec2cluster_markerold/__init__.py" not in names  # Python 3.11
    assert bundle.manifest["python_version"] == "3.11"
    assert bundle.manifest["distributions"][BINARY_REQ] == "1.0"
    if sys.version_info[:2] == (3, 11):
        result = run_in_bare_venv(bundle, tmp_path, "import boto3, ec2cluster_tinybin, mytasks")
        assert result.returncode == 0, result.stderr

    with pytest.raises(BundleError) as arm:
        build_bundle([code_dir / "mytasks.py"], [BINARY_REQ], Target("3.11", "arm64"), **args)
    message = str(arm.value)
    assert f"requirements: no wheel of '{BINARY_REQ}' for Python 3.11 on manylinux aarch64" in message
    assert "pick a version with a wheel for that platform, or bake it into the AMI" in message
    assert "(pip: " in message


def test_requirement_errors(code_dir, shared_cache, monkeypatch):
    forbid_subprocesses(monkeypatch)  # found before pip runs
    code = [code_dir / "mytasks.py"]
    with pytest.raises(BundleError, match=r"^requirements: pip cannot install s3:// URLs: 's3://b/x.whl'"):
        build_bundle(code, ["s3://b/x.whl"], Target(None), cache_dir=shared_cache)
    with pytest.raises(BundleError, match=r"^requirements: pip cannot install s3:// URLs"):
        build_bundle(code, ["foo @ s3://b/foo-1.0-py3-none-any.whl"], Target(None), cache_dir=shared_cache)
    with pytest.raises(BundleError, match=r"^requirements: '--index-url x' is a pip option.*pip_args"):
        build_bundle(code, ["--index-url x"], Target(None), cache_dir=shared_cache)
    with pytest.raises(BundleError, match=r"^python_version: the worker runs boto3==.*needs Python"):
        build_bundle(code, [], Target("3.8"), cache_dir=shared_cache)


def test_a_requirement_conflicting_with_the_worker_pins(code_dir, shared_cache):
    with pytest.raises(
        BundleError, match=r"^requirements: pip cannot install \['boto3==1.35.0'\] together"
    ) as error:
        build_bundle([code_dir / "mytasks.py"], ["boto3==1.35.0"], Target(None), cache_dir=shared_cache)
    assert f"(pip: Cannot install boto3==1.35.0 and boto3=={BOTO3_VERSION}" in str(error.value)


def test_a_local_wheel_requirement(code_dir, tmp_path, shared_cache):
    wheel = write_wheel(tmp_path, "ec2cluster-localwheel")
    bundle = build_bundle([code_dir / "mytasks.py"], [str(wheel)], Target(None), cache_dir=shared_cache)
    assert bundle.manifest["distributions"]["ec2cluster-localwheel"] == "1.0"
    assert "site/ec2cluster_localwheel/__init__.py" in names_in(bundle)


def test_target_validation():
    with pytest.raises(BundleError, match=r"^architecture: 'amd64'.*arm64, x86_64"):
        Target("3.11", "amd64")
    with pytest.raises(BundleError, match=r"^python_version: '3'.*'3.11'"):
        Target("3")
    with pytest.raises(BundleError, match=r"^python_version: 3.11"):
        Target(3.11)  # type: ignore[arg-type]
    assert Target(None).architecture == "x86_64"
    assert Target("3.12", "arm64").python_version == "3.12"


def test_code_errors(code_dir, tmp_path, shared_cache, monkeypatch):
    forbid_subprocesses(monkeypatch)

    def build(*paths):
        return build_bundle(list(paths), [], Target(None), cache_dir=shared_cache)

    with pytest.raises(BundleError, match=r"^code: '.*missing\.py' not found"):
        build(code_dir / "missing.py")
    (code_dir / "plain").mkdir()
    (code_dir / "plain" / "helpers.py").write_text("")
    with pytest.raises(BundleError, match=r"^code: folder .*plain. is not a package.*add __init__.py or"):
        build(code_dir / "plain")
    other = tmp_path / "other"
    other.mkdir()
    (other / "mytasks.py").write_text("")
    with pytest.raises(BundleError, match=r"^code: .* both give the top-level name 'mytasks'"):
        build(code_dir / "mytasks.py", other / "mytasks.py")
    (other / "mypkg").mkdir()
    (other / "mypkg.py").write_text("")
    with pytest.raises(BundleError, match=r"top-level name 'mypkg'"):
        build(code_dir / "mypkg", other / "mypkg.py")
    (other / "notes.txt").write_text("")
    with pytest.raises(BundleError, match=r"^code: .*notes\.txt' is not an importable Python module"):
        build(other / "notes.txt")
    (other / "ec2cluster_worker.py").write_text("")
    with pytest.raises(BundleError, match=r"^code: .* would shadow the worker package"):
        build(other / "ec2cluster_worker.py")


def test_module_code_path(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "pkg").mkdir(parents=True)
    (second / "pkg").mkdir(parents=True)
    (first / "mytasks.py").write_text("")
    (first / "pkg" / "helpers.py").write_text("")  # no __init__.py: not a package
    (second / "pkg" / "__init__.py").write_text("")
    (second / "pkg.py").write_text("")
    assert module_code_path("mytasks", [first, second]) == first / "mytasks.py"
    assert module_code_path("mytasks.sub.deeper", [second, first]) == first / "mytasks.py"
    assert module_code_path("pkg.handlers", [first, second]) == second / "pkg"  # the package wins
    assert module_code_path("absent", [first, second]) is None
    assert module_code_path("mytasks", []) is None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EC2CLUSTER_BUNDLE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EC2CLUSTER_BUNDLE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "airflow-ec2cluster" / "bundles"


def test_pip_runs_with_the_instances_platform(monkeypatch, tmp_path):
    """The pip command: wheels only, the target's tags, the caller's pip arguments and pins last."""
    seen = []

    def fake_run(command, *args, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for zz\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(BundleError, match=r"no wheel of 'zz' for Python 3.12 on manylinux aarch64"):
        build_bundle([], ["zz"], Target("3.12", "arm64"), cache_dir=tmp_path, pip_args=["--no-index"])
    (command,) = seen
    assert command[0] == sys.executable
    arguments = command[command.index("install") :]
    assert arguments[:3] == ["install", "--target", arguments[2]]
    for flag in ("--only-binary=:all:", "--no-compile", "--no-warn-conflicts", "--upgrade", "--no-index"):
        assert flag in arguments
    assert arguments[arguments.index("--python-version") + 1] == "3.12"
    assert arguments[arguments.index("--implementation") + 1] == "cp"
    platforms = [arguments[i + 1] for i, arg in enumerate(arguments) if arg == "--platform"]
    assert {"manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"} <= set(platforms)
    assert platforms[-1] == "linux_aarch64" and not [p for p in platforms if "x86_64" in p]
    assert arguments[-3:] == [f"boto3=={BOTO3_VERSION}", arguments[-2], "zz"]
    assert json.loads(command[3])["platform_machine"] == "aarch64"
    assert not list((tmp_path / "site").iterdir())  # nothing cached from a failed build
    assert bundle_module._platforms("x86_64")[0] == "manylinux_2_28_x86_64"


def test_an_airflow_python_without_pip(monkeypatch, tmp_path):
    def no_pip(command, *args, **kwargs):
        stderr = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'pip'\n"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(BundleError, match=r"^requirements: the Airflow side's Python .* has no pip"):
        build_bundle([], [], Target("3.11"), cache_dir=tmp_path)
