"""The package index standing for the internet: PEP 503 pages over a wheel cache, an upstream fetched once,
and ``pip install`` from an instance that reaches the internet (and not from one that does not)."""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from ec2cluster_localcloud import LocalCloud
from ec2cluster_localcloud.loopback import LoopbackServer, QuietHandler
from ec2cluster_localcloud.package_index import PackageIndex, WheelCache, normalize, project_of

from .helpers import launch_instance, wait_for_log_line

MODULE = "tinyprobe"


def build_wheel(directory: Path, name: str = MODULE, version: str = "1.0", value: int = 42) -> Path:
    """A minimal pure-Python wheel: a module and its dist-info (METADATA, WHEEL, RECORD with hashes)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_project_names():
    assert normalize("Tiny_Probe.pkg") == "tiny-probe-pkg"
    assert project_of("Tiny_Probe-1.0-py3-none-any.whl") == "tiny-probe"
    assert project_of("tiny-probe-1.0.tar.gz") == "tiny-probe"
    assert project_of("notes.txt") is None


def test_index_serves_the_cache(tmp_path: Path):
    cache = WheelCache(tmp_path / "cache")
    wheel = cache.add(build_wheel(tmp_path))
    index = PackageIndex(cache, upstream=None)
    url = index.start()
    try:
        status, page = get(url)
        assert status == 200 and f'href="/simple/{MODULE}/"' in page.decode()
        status, page = get(f"{url}{MODULE}/")
        sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert status == 200 and f"/files/{MODULE}/{wheel.name}#sha256={sha256}" in page.decode()
        assert get(f"{url}TinyProbe/")[1] == page  # redirected to the normalized name
        status, data = get(url.replace("/simple/", f"/files/{MODULE}/{wheel.name}"))
        assert status == 200 and data == wheel.read_bytes()
        assert get(f"{url}not-cached/")[0] == 404  # no upstream: the cache only
        assert get(url.replace("/simple/", f"/files/{MODULE}/../../etc/passwd"))[0] == 404
    finally:
        index.close()


def test_a_missing_project_is_fetched_once_from_upstream(tmp_path: Path):
    """The upstream is a fake index on loopback (JSON simple API and a file), never PyPI."""
    wheel = build_wheel(tmp_path, name="fromupstream", value=7)
    requests: list[str] = []

    class Upstream(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            if self.path == "/simple/fromupstream/":
                document = {
                    "meta": {"api-version": "1.0"},
                    "name": "fromupstream",
                    "files": [
                        {
                            "filename": wheel.name,
                            "url": f"../../packages/{wheel.name}",
                            "hashes": {"sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()},
                            "requires-python": ">=3.8",
                        }
                    ],
                }
                body = json.dumps(document).encode()
                self.send_body(200, body, {"Content-Type": "application/vnd.pypi.simple.v1+json"})
            elif self.path == f"/packages/{wheel.name}":
                self.send_body(200, wheel.read_bytes(), {"Content-Type": "application/octet-stream"})
            else:
                self.send_body(404, b"", {})

    upstream = LoopbackServer(Upstream, "fake-upstream")
    cache = WheelCache(tmp_path / "cache")
    index = PackageIndex(cache, upstream=f"{upstream.url}/simple/")
    url = index.start()
    try:
        for _ in range(2):
            status, page = get(f"{url}fromupstream/")
            assert status == 200 and wheel.name in page.decode()
            assert 'data-requires-python="&gt;=3.8"' in page.decode()
            status, data = get(url.replace("/simple/", f"/files/fromupstream/{wheel.name}"))
            assert status == 200 and data == wheel.read_bytes()
        # One listing and one download, then the cache answers.
        assert requests == ["/simple/fromupstream/", f"/packages/{wheel.name}"]
        assert (cache.directory / wheel.name).read_bytes() == wheel.read_bytes()
        assert get(f"{url}nosuchproject/")[0] == 404
    finally:
        index.close()
        upstream.close()


PIP_SCRIPT = f"""
if @PYTHON@ -m pip install --no-deps --no-cache-dir --disable-pip-version-check --quiet \\
    --timeout 2 --retries 0 --index-url "$PIP_INDEX_URL" --target "$HOME/site" {MODULE}; then
  echo "PIP ok $(PYTHONPATH="$HOME/site" @PYTHON@ -c 'import {MODULE}; print({MODULE}.VALUE)')"
else
  echo "PIP failed $?"
fi
""".replace("@PYTHON@", shlex.quote(sys.executable))


@pytest.mark.timeout(120)
def test_pip_installs_from_the_index_only_with_the_internet(tmp_path: Path):
    with LocalCloud(
        work_dir=tmp_path / "cloud", wheel_cache=tmp_path / "wheels", package_upstream=None
    ) as cloud:
        assert cloud.package_index_url.startswith("http://127.0.0.1:")
        cloud.add_wheel(build_wheel(tmp_path))
        online = launch_instance(cloud, PIP_SCRIPT)
        offline = launch_instance(
            cloud, PIP_SCRIPT, NetworkInterfaces=[{"DeviceIndex": 0, "AssociatePublicIpAddress": False}]
        )
        online_log = wait_for_log_line(cloud, online, "PIP ", 60)
        offline_log = wait_for_log_line(cloud, offline, "PIP ", 60)
        assert "PIP ok 42" in online_log, online_log
        assert "PIP failed" in offline_log, offline_log
        assert not (Path(cloud.worker_processes()[offline]["home"]) / "site" / MODULE).exists()
