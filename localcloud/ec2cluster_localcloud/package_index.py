"""The local cloud's "internet": a PEP 503 simple package index on loopback, served from a wheel cache.

An instance that reaches the internet (``ec2cluster_localcloud.network``) gets ``PIP_INDEX_URL`` pointing
here; one that does not gets the blackhole, and its ``pip install`` times out as on a private subnet.

The cache is a directory of distribution files (wheels, sdists), flat, as ``pip download -d DIR`` leaves
them; default ``~/.cache/ec2cluster-localcloud/wheels`` (``$XDG_CACHE_HOME`` honoured), shared across runs.
``/simple/<project>/`` lists the cache's files of that project. A project with no file in the cache is
looked up once on the upstream index (PyPI's JSON simple API; its listing is kept in ``.upstream/``), and
each of its files is downloaded from upstream the first time it is asked for, then served from the cache.
Without an upstream (``upstream=None``) the index serves the cache only and never leaves loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ec2cluster_localcloud.loopback import LoopbackServer, QuietHandler

log = logging.getLogger(__name__)

PYPI_SIMPLE = "https://pypi.org/simple/"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
UPSTREAM_TIMEOUT_SECONDS = 30.0
UPSTREAM_DIR = ".upstream"
DISTRIBUTION_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]*$")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ec2cluster-localcloud" / "wheels"


def normalize(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_of(filename: str) -> str | None:
    """The normalized project a distribution file belongs to (wheel or sdist), None for another file."""
    if filename.endswith(".whl"):
        return normalize(filename.split("-", 1)[0])
    for suffix in DISTRIBUTION_SUFFIXES[1:]:
        if filename.endswith(suffix) and "-" in filename:
            return normalize(filename[: -len(suffix)].rsplit("-", 1)[0])
    return None


class WheelCache:
    """The cache directory: distribution files, flat, and upstream listings in ``.upstream/``."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def add(self, path: str | Path) -> Path:
        """Copy a wheel or sdist into the cache; its path there."""
        source = Path(path)
        if project_of(source.name) is None:
            raise ValueError(f"{source.name}: not a wheel or sdist file name")
        target = self.directory / source.name
        if source.resolve() != target.resolve():

            def copy(out) -> None:
                with open(source, "rb") as data:
                    shutil.copyfileobj(data, out)

            self._write_atomically(target, copy)
        return target

    def files(self, project: str) -> dict[str, Path]:
        """Filename -> path of the cache's files of ``project`` (normalized name)."""
        found = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.is_file() and project_of(entry.name) == project:
                    found[entry.name] = Path(entry.path)
        return found

    def projects(self) -> list[str]:
        names = set()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.is_file() and project_of(entry.name):
                    names.add(project_of(entry.name))
        listings = self.directory / UPSTREAM_DIR
        if listings.is_dir():
            names.update(p.stem for p in listings.glob("*.json"))
        return sorted(names)

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        digest = hashlib.sha256()
        with open(path, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
        with self._lock:
            self._hashes[key] = digest.hexdigest()
        return self._hashes[key]

    def listing_path(self, project: str) -> Path:
        return self.directory / UPSTREAM_DIR / f"{project}.json"

    def upstream_listing(self, project: str) -> list[dict[str, Any]] | None:
        try:
            return json.loads(self.listing_path(project).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def save_listing(self, project: str, files: list[dict[str, Any]]) -> None:
        path = self.listing_path(project)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomically(path, lambda out: out.write(json.dumps(files).encode()))

    def _write_atomically(self, target: Path, write) -> None:
        handle, temporary = tempfile.mkstemp(prefix=".partial-", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                write(out)
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


class UpstreamError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PackageIndex:
    """The index over a ``WheelCache``: ``start()`` serves it on loopback; ``url`` is its /simple/ URL."""

    def __init__(
        self,
        cache: WheelCache,
        *,
        upstream: str | None = PYPI_SIMPLE,
        timeout: float = UPSTREAM_TIMEOUT_SECONDS,
    ) -> None:
        self.cache = cache
        self.upstream = upstream.rstrip("/") + "/" if upstream else None
        self.timeout = timeout
        self._project_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._server: LoopbackServer | None = None
        self.upstream_fetches = 0

    # Serving

    def start(self) -> str:
        index = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                index.handle(self)

        self._server = LoopbackServer(Handler, "package-index")
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"{self._server.url}/simple/"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def handle(self, request: QuietHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(request.path).path)
        parts = [part for part in path.split("/") if part]
        try:
            if parts == ["simple"]:
                return self._send_html(request, self.root_page())
            if len(parts) == 2 and parts[0] == "simple":
                project = normalize(parts[1])
                if parts[1] != project or not path.endswith("/"):
                    return request.send_body(301, b"", {"Location": f"/simple/{project}/"})
                return self._send_html(request, self.project_page(project))
            if len(parts) == 3 and parts[0] == "files" and SAFE_NAME_RE.match(parts[2]):
                return self._send_file(request, self.file(normalize(parts[1]), parts[2]))
        except UpstreamError as error:
            log.info("package index: %s", error)
            return request.send_body(error.status, str(error).encode(), {"Content-Type": "text/plain"})
        request.send_body(404, b"not found", {"Content-Type": "text/plain"})

    def _send_html(self, request: QuietHandler, page: str) -> None:
        request.send_body(200, page.encode("utf-8"), {"Content-Type": "text/html; charset=utf-8"})

    def _send_file(self, request: QuietHandler, path: Path) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(path.stat().st_size))
        request.end_headers()
        with open(path, "rb") as data:
            shutil.copyfileobj(data, request.wfile)

    # Pages

    def root_page(self) -> str:
        links = "".join(f'<a href="/simple/{p}/">{html.escape(p)}</a><br>\n' for p in self.cache.projects())
        return f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n"

    def project_page(self, project: str) -> str:
        entries = self.entries(project)
        if not entries:
            where = "in the cache nor upstream" if self.upstream else "in the cache (no upstream index)"
            raise UpstreamError(404, f"no project {project} {where}")
        links = []
        for entry in sorted(entries.values(), key=lambda e: e["filename"]):
            attributes = ""
            if entry.get("requires-python"):
                attributes += f' data-requires-python="{html.escape(entry["requires-python"])}"'
            if entry.get("yanked"):
                reason = entry["yanked"] if isinstance(entry["yanked"], str) else ""
                attributes += f' data-yanked="{html.escape(reason)}"'
            fragment = f"#sha256={entry['sha256']}" if entry.get("sha256") else ""
            href = f"/files/{project}/{urllib.parse.quote(entry['filename'])}{fragment}"
            links.append(f'<a href="{href}"{attributes}>{html.escape(entry["filename"])}</a><br>\n')
        return f"<!DOCTYPE html>\n<html><body>\n<h1>{project}</h1>\n{''.join(links)}</body></html>\n"

    def entries(self, project: str) -> dict[str, dict[str, Any]]:
        """Filename -> {filename, sha256, requires-python, yanked, url}: the cache's, then upstream's."""
        local = self.cache.files(project)
        listing = self.cache.upstream_listing(project)
        if not local and listing is None and self.upstream:
            listing = self.fetch_listing(project)
        found: dict[str, dict[str, Any]] = {}
        for entry in listing or ():
            found[entry["filename"]] = entry
        for filename, path in local.items():
            found[filename] = {
                **found.get(filename, {}),
                "filename": filename,
                "sha256": self.cache.sha256(path),
            }
        return found

    def file(self, project: str, filename: str) -> Path:
        local = self.cache.files(project)
        if filename in local:
            return local[filename]
        entry = next(
            (e for e in self.cache.upstream_listing(project) or () if e["filename"] == filename), None
        )
        if entry is None or not self.upstream:
            raise UpstreamError(404, f"{filename}: not in the cache")
        with self._lock_for(project):
            local = self.cache.files(project)
            if filename not in local:
                self.download(entry)
        return self.cache.directory / filename

    # Upstream

    def _lock_for(self, project: str) -> threading.Lock:
        with self._locks_lock:
            return self._project_locks.setdefault(project, threading.Lock())

    def fetch_listing(self, project: str) -> list[dict[str, Any]] | None:
        """The upstream index's files of ``project`` (None when it has no such project), kept in the cache."""
        with self._lock_for(project):
            listing = self.cache.upstream_listing(project)
            if listing is not None:
                return listing
            url = urllib.parse.urljoin(self.upstream, f"{project}/")
            request = urllib.request.Request(url, headers={"Accept": SIMPLE_JSON})
            self.upstream_fetches += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    document = json.load(answer)
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                raise UpstreamError(502, f"upstream index {url}: HTTP {error.code}") from None
            except (OSError, ValueError) as error:
                raise UpstreamError(502, f"upstream index {url}: {error}") from None
            listing = list(listing_entries(url, document.get("files") or ()))
            self.cache.save_listing(project, listing)
            log.info("package index: %s listed from %s (%d files)", project, url, len(listing))
            return listing

    def download(self, entry: dict[str, Any]) -> None:
        url, filename = entry["url"], entry["filename"]
        self.upstream_fetches += 1
        digest = hashlib.sha256()

        def write(out) -> None:
            with urllib.request.urlopen(url, timeout=self.timeout) as answer:
                for block in iter(lambda: answer.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if entry.get("sha256") and digest.hexdigest() != entry["sha256"]:
                raise UpstreamError(502, f"{filename}: sha256 mismatch from {url}")

        try:
            self.cache._write_atomically(self.cache.directory / filename, write)
        except (OSError, ValueError) as error:
            raise UpstreamError(502, f"{filename}: download from {url} failed: {error}") from None
        log.info("package index: %s downloaded into the cache", filename)


def listing_entries(page_url: str, files: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """The JSON simple API's ``files`` as the cache keeps them."""
    for item in files:
        filename = item.get("filename") or ""
        if not SAFE_NAME_RE.match(filename) or project_of(filename) is None:
            continue
        yield {
            "filename": filename,
            "url": urllib.parse.urljoin(page_url, item.get("url") or ""),
            "sha256": (item.get("hashes") or {}).get("sha256"),
            "requires-python": item.get("requires-python"),
            "yanked": item.get("yanked") or False,
        }
