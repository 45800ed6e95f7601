"""Image-backed instances: an AMI backed by a real root filesystem boots as an isolated root of its own.

An AMI tagged ``ec2cluster-localcloud:rootfs`` = a flavour (``ec2cluster_localcloud.images``) boots like this:

- Its root is a copy-on-write view of the cached root filesystem: an overlayfs (lower: the cache; upper and
  work: ``<home>/rootfs/``), mounted inside the instance's own mount namespace, so that it disappears with
  the instance (a full copy when the kernel has no overlayfs).
- It runs in new mount, PID and network namespaces (``unshare --mount --pid --net --fork``): PID 1 is the
  instance's init (``/usr/sbin/ec2cluster-init`` in its root, a few lines of bash). At every boot it runs,
  in the background (PID 1 itself only waits for signals), what cloud-init runs: the executable files of
  ``/var/lib/cloud/scripts/per-boot/`` in name order, each waited for (stdin /dev/null, cwd /root), then,
  at the first boot only, the user data (``/var/lib/cloud/instance/user-data.txt``: executed when it starts
  with ``#!``, else given to bash; its semaphore, ``/var/lib/cloud/instance/sem/config_scripts_user``, is
  written before it starts, as cloud-init's is, so user data a reboot interrupted never runs again), all as
  root with cloud-init's environment (PATH, HOME=/root, LANG) plus the endpoint variables. It lives until
  ``shutdown``, ``poweroff`` or ``halt`` (small scripts in its root that send SIGTERM to PID 1) or
  ``reboot`` (SIGINT to PID 1, as ctrl-alt-del). Either way the init sends SIGTERM to every process of the
  instance, waits for them (at most STOP_WAIT_SECONDS), and exits, with REBOOT_EXIT_STATUS for a reboot:
  the kernel then kills whatever is left in the PID namespace, and the runner boots the instance again
  (``boot()`` once more over the same layer: the same disk) or powers it off.
- Its network namespace has only a loopback interface, holding 169.254.169.254: the runner creates the
  instance's listeners *inside* it (a thread joins the namespace with setns just to create the sockets):
  its metadata service at http://169.254.169.254/ (port 80, as on EC2), a TCP forwarder to the local
  cloud's endpoint (and to the package index) for each destination its VPC reaches, and a blackhole
  (connections time out) for the rest. The endpoint variables point at those. Nothing is added to the
  host's network: no interface, address or route, so the host's own 169.254.169.254 is untouched.

When the PID namespace's init exits, the kernel kills every process in it; the mount namespace (and the
overlay) and the network namespace (and its listeners' addresses) go with their last process, so nothing
of an instance outlives it on the host but its home directory (the overlay's upper layer) and the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from ec2cluster_localcloud.blackhole import Blackhole
from ec2cluster_localcloud.metadata import InstanceMetadataService

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOTFS_TAG = "ec2cluster-localcloud:rootfs"  # on an AMI: the flavour of its root filesystem
IMDS_ADDRESS = "169.254.169.254"
CLONE_NEWNET = 0x40000000
READY_TIMEOUT_SECONDS = 30.0
STOP_WAIT_SECONDS = 30  # what the init gives the instance's processes between SIGTERM and its exit
FORWARD_CONNECT_TIMEOUT_SECONDS = 10.0
# cloud-init's environment for user data scripts (no credentials, no region).
INSTANCE_BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
USER_DATA_PATH = "var/lib/cloud/instance/user-data.txt"
INIT_PATH = "usr/sbin/ec2cluster-init"
POWER_COMMANDS = ("shutdown", "poweroff", "halt")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

PER_BOOT_DIR = "var/lib/cloud/scripts/per-boot"
USER_DATA_SEMAPHORE = "var/lib/cloud/instance/sem/config_scripts_user"
REBOOT_EXIT_STATUS = 82  # the init's exit status when the instance reboots (0: it powers off)
# An instance's first process starts as a booted system's does: every signal at its default. A local cloud
# started in the background (`&`, nohup) passes SIGINT, SIGQUIT or SIGHUP on ignored, and a shell cannot trap
# a signal ignored on entry (POSIX): an image's init would never see its reboot signal.
DEFAULT_SIGNALS = ("env", "--default-signal")  # GNU coreutils 8.31+
REBOOT_SIGNAL = signal.SIGINT  # to PID 1: reboot (ctrl-alt-del, for systemd and sysvinit); SIGTERM: power off

INIT_SCRIPT = f"""#!/bin/bash
# PID 1 of an image-backed instance of ec2cluster-localcloud. At every boot, as cloud-init does: the
# per-boot scripts, then the user data at the first boot only. It lives until shutdown/poweroff/halt
# (SIGTERM to PID 1) powers the instance off, or reboot (SIGINT) reboots it (the runner boots it again).
stop_all() {{  # $1: what the console says, $2: the exit status that tells the runner what to do
  trap '' TERM INT PWR USR1 USR2  # one ending at a time: a shutdown during a reboot changes nothing
  kill -TERM -1 2>/dev/null
  # Wait for them by the clock (SECONDS), with builtins only: no forks to slow a busy machine's loop.
  deadline=$((SECONDS + {STOP_WAIT_SECONDS}))
  while :; do
    left=""
    for p in /proc/[0-9]*; do
      [ "${{p#/proc/}}" = 1 ] && continue
      read -r stat 2>/dev/null < "$p/stat" || continue
      rest=${{stat##*) }}
      [ "${{rest%% *}}" = Z ] && continue
      name=${{stat#*(}}
      left="$left ${{p#/proc/}}:${{name%%)*}}"
    done
    [ -z "$left" ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "ec2cluster-localcloud: still running after {STOP_WAIT_SECONDS} s (the kernel kills them):$left"
      break
    fi
    sleep 0.1 & wait $!
  done
  echo "ec2cluster-localcloud: $1"
  exit "$2"
}}
trap 'stop_all "power off" 0' TERM PWR USR1 USR2
trap 'stop_all "stopped for a reboot" {REBOOT_EXIT_STATUS}' INT
boot() {{
  for script in /{PER_BOOT_DIR}/*; do
    [ -f "$script" ] && [ -x "$script" ] || continue
    (cd /root && exec "$script") </dev/null
    echo "ec2cluster-localcloud: per-boot script ${{script##*/}} exited with status $?"
  done
  user_data=/{USER_DATA_PATH}
  if [ -s "$user_data" ] && [ ! -e /{USER_DATA_SEMAPHORE} ]; then
    mkdir -p "$(dirname /{USER_DATA_SEMAPHORE})"
    date +%s > /{USER_DATA_SEMAPHORE}  # before it runs: a reboot never runs it again
    if [ "$(head -c 2 "$user_data")" = '#!' ]; then (cd /root && exec "$user_data") </dev/null
    else (cd /root && exec /bin/bash "$user_data") </dev/null
    fi
    echo "ec2cluster-localcloud: user data exited with status $?"
  fi
  touch /var/lib/cloud/instance/boot-finished
}}
cd /
boot &  # in the background: PID 1 only waits, so that its traps run at once
while :; do sleep 3600 & wait $!; done
"""
POWER_SCRIPT = """#!/bin/sh
# ec2cluster-localcloud: power the instance off (its init, PID 1, ends it)
kill -TERM 1  # the shell's builtin: minbase has no /bin/kill
"""
REBOOT_SCRIPT = """#!/bin/sh
# ec2cluster-localcloud: reboot the instance (its init, PID 1, ends it; the instance runner boots it again)
kill -INT 1
"""


class RootfsInstanceError(RuntimeError):
    """An image-backed instance could not boot."""


def overlay_available() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


def namespace_id(pid: int, kind: str) -> str | None:
    """``/proc/<pid>/ns/<kind>`` (e.g. ``pid:[4026532]``), None when the process is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def pids_in_namespace(ns: str, kind: str = "pid") -> list[int]:
    """The host's pids of the live processes in namespace ``ns`` (as ``namespace_id`` spells it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and namespace_id(int(entry.name), kind) == ns:
            found.append(int(entry.name))
    return found


def child_pids(parent: int) -> list[int]:
    """The live children of ``parent`` (from /proc/<pid>/stat: kernels without the children file too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def in_network_namespace(ns_path: str) -> Callable[[Callable[[], T]], T]:
    """A runner of ``function()`` in the network namespace at ``ns_path``, in a thread of its own.

    Only sockets should be created there: they stay in that namespace; threads the function starts would
    too, so start them afterwards, from the caller's thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def run(function: Callable[[], T]) -> T:
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                fd = os.open(ns_path, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        error = ctypes.get_errno()
                        raise OSError(error, f"setns({ns_path}): {os.strerror(error)}")
                finally:
                    os.close(fd)
                outcome["value"] = function()
            except BaseException as error:  # handed to the caller's thread
                outcome["error"] = error

        thread = threading.Thread(target=target, name="netns-setup")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    return run


class Forwarder:
    """Accepts on ``listener`` (a socket in an instance's namespace) and relays to ``target`` on the host."""

    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self.listener = listener
        self.target = target
        self.port = listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name=f"forward-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=FORWARD_CONNECT_TIMEOUT_SECONDS)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed.is_set():
                client.close()
                upstream.close()
                return
            self._connections.update((client, upstream))
        copier = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        copier.start()
        pump(client, upstream)
        copier.join()
        with self._lock:
            self._connections.difference_update((client, upstream))
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


def pump(source: socket.socket, destination: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``destination``'s write side."""
    try:
        while data := source.recv(65536):
            destination.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        destination.shutdown(socket.SHUT_WR)


def loopback_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


class RootfsInstance:
    """One image-backed instance: its root, namespaces, listeners; ``boot()`` starts it."""

    def __init__(self, instance_id: str, flavour: str, image_root: Path, home: Path, user_data: str) -> None:
        self.instance_id = instance_id
        self.flavour = flavour
        self.image_root = Path(image_root)
        self.home = Path(home)
        self.user_data = user_data
        self.layer_dir = self.home / "rootfs"
        self.root = self.layer_dir / "root"
        self.overlay = overlay_available()
        self.process: subprocess.Popen | None = None
        self.init_pid: int | None = None  # the host's pid of its init (PID 1 inside)
        self.pid_namespace: str | None = None
        self.mount_namespace: str | None = None
        self.net_namespace: str | None = None
        self.env: dict[str, str] = {}
        self._forwarders: list[Forwarder] = []
        self._blackhole: Blackhole | None = None

    def info(self) -> dict:
        return {
            "flavour": self.flavour,
            "root": str(self.root),
            "overlay": self.overlay,
            "init_pid": self.init_pid,
            "pid_namespace": self.pid_namespace,
            "mount_namespace": self.mount_namespace,
            "net_namespace": self.net_namespace,
            "env": dict(self.env),
        }

    # Boot

    def boot(
        self,
        log_path: Path,
        metadata: InstanceMetadataService,
        host_env: Mapping[str, str],
        host_blackhole_url: str,
    ) -> subprocess.Popen:
        """Prepare its root, start its namespaces, put its listeners in them, run its init; its process.

        ``host_env``: the endpoint variables as the process-backed path gives them (host URLs);
        ``host_blackhole_url``: which of those is the blackhole.
        """
        for tool in ("unshare", "ip", "mount", "chroot"):
            if (
                shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
                is None
            ):
                raise RootfsInstanceError(
                    f"booting an image-backed instance needs {tool} (util-linux, iproute2)"
                )
        self._prepare_root()
        ready = self.home / "namespaces-ready"
        ready.unlink(missing_ok=True)
        command = [
            *DEFAULT_SIGNALS,
            *("unshare", "--mount", "--pid", "--net", "--fork", "bash", "-c", self._launcher(ready)),
        ]
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command,
                cwd=self.home,
                env={"PATH": path, "LANG": "C.UTF-8"},
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the runner's SIGTERM/SIGKILL reach it all
            )
        self.init_pid = None
        try:
            init_pid = self.init_pid = self._wait_ready(ready)
            self.pid_namespace = namespace_id(init_pid, "pid")
            self.mount_namespace = namespace_id(init_pid, "mnt")
            self.net_namespace = namespace_id(init_pid, "net")
            create = in_network_namespace(f"/proc/{init_pid}/ns/net")
            metadata.start(host=IMDS_ADDRESS, port=80, create=create)
            self.env = self._endpoints(host_env, host_blackhole_url, create)
            self.process.stdin.write(self._init_env_line().encode())
            self.process.stdin.close()
        except BaseException as error:
            self.kill()
            self.close()
            if isinstance(error, Exception) and not isinstance(error, RootfsInstanceError):
                raise RootfsInstanceError(f"instance {self.instance_id}: {error}") from error
            raise
        log.info(
            "instance %s: booted %s image (pid %s, %s)",
            self.instance_id,
            self.flavour,
            init_pid,
            self.pid_namespace,
        )
        return self.process

    def _prepare_root(self) -> None:
        """The instance's layer (overlay upper, or a full copy): its init, power commands and user data."""
        if self.overlay:
            layer = self.layer_dir / "upper"
            for directory in (layer, self.layer_dir / "work", self.root):
                directory.mkdir(parents=True, exist_ok=True)
        else:
            if not self.root.exists():
                shutil.copytree(self.image_root, self.root, symlinks=True)
            layer = self.root
        files = {INIT_PATH: INIT_SCRIPT, USER_DATA_PATH: self.user_data}
        files.update({f"usr/sbin/{name}": POWER_SCRIPT for name in POWER_COMMANDS})
        files["usr/sbin/reboot"] = REBOOT_SCRIPT
        for relative, text in files.items():
            path = layer / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            path.chmod(0o700 if relative == USER_DATA_PATH else 0o755)

    def _launcher(self, ready: Path) -> str:
        """PID 1 of the new namespaces until it becomes the init: network, root, mounts, then chroot."""
        q = shlex.quote
        root = q(str(self.root))
        lines = [
            "set -eu",
            "ip link set lo up",
            f"ip addr add {IMDS_ADDRESS}/32 dev lo",
        ]
        if self.overlay:
            upper, work = self.layer_dir / "upper", self.layer_dir / "work"
            options = f"lowerdir={self.image_root},upperdir={upper},workdir={work}"
            lines.append(f"mount -t overlay overlay -o {q(options)} {root}")
        lines += [
            f"mount -t proc proc {root}/proc",
            f"mount -t sysfs sysfs {root}/sys || true",
            f"mount -t tmpfs -o mode=0755,nosuid dev {root}/dev",
            f"for d in {' '.join(DEVICES)}; do touch {root}/dev/$d; mount --bind /dev/$d {root}/dev/$d; done",
            f"mkdir -p {root}/dev/shm {root}/dev/pts",
            f"mount -t tmpfs -o mode=1777,nosuid,nodev shm {root}/dev/shm",
            f"ln -s /proc/self/fd {root}/dev/fd",
            f"ln -s /proc/self/fd/0 {root}/dev/stdin",
            f"ln -s /proc/self/fd/1 {root}/dev/stdout",
            f"ln -s /proc/self/fd/2 {root}/dev/stderr",
            f"mount -t tmpfs -o mode=0755,nosuid,nodev run {root}/run",
            f"echo $$ > {q(str(ready))}.tmp && mv {q(str(ready))}.tmp {q(str(ready))}",
            # The runner answers with the init's environment once the listeners are in the namespace.
            "IFS= read -r environment",
            f'eval "exec {" ".join(DEFAULT_SIGNALS)} -i $environment chroot {root} /{INIT_PATH}"',
        ]
        return "\n".join(lines) + "\n"

    def _wait_ready(self, ready: Path) -> int:
        """The init's host pid, once its namespaces, root and mounts are set up."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready.exists():
            if self.process.poll() is not None:
                raise RootfsInstanceError(
                    f"instance {self.instance_id}: its namespaces could not be set up "
                    f"(status {self.process.returncode}); see its console"
                )
            if time.monotonic() > deadline:
                raise RootfsInstanceError(
                    f"instance {self.instance_id}: not ready in {READY_TIMEOUT_SECONDS} s"
                )
            time.sleep(0.02)
        children = [str(pid) for pid in child_pids(self.process.pid)]
        if len(children) != 1:
            raise RootfsInstanceError(f"instance {self.instance_id}: expected one init, found {children}")
        return int(children[0])

    def _endpoints(
        self,
        host_env: Mapping[str, str],
        host_blackhole_url: str,
        create: Callable[[Callable[[], T]], T],
    ) -> dict[str, str]:
        """The endpoint variables inside: a forwarder per reachable host address, the blackhole otherwise."""
        self._blackhole = create(Blackhole)
        inside: dict[str, str] = {}
        for url in sorted(set(host_env.values())):
            if url == host_blackhole_url:
                inside[url] = self._blackhole.url
                continue
            parts = urllib.parse.urlsplit(url)
            forwarder = Forwarder(
                create(loopback_listener), (parts.hostname or "127.0.0.1", parts.port or 80)
            )
            self._forwarders.append(forwarder)
            inside[url] = urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{forwarder.port}"))
        return {variable: inside[url] for variable, url in host_env.items()}

    def _init_env_line(self) -> str:
        pairs = {**INSTANCE_BASE_ENV, **self.env}
        return " ".join(shlex.quote(f"{name}={value}") for name, value in pairs.items()) + "\n"

    # End

    def request_reboot(self) -> bool:
        """Ask its init to reboot (REBOOT_SIGNAL: it stops every process, then exits with
        REBOOT_EXIT_STATUS); False when there is no init to ask (it has ended, or never started)."""
        if self.init_pid is None or self.process is None or self.process.poll() is not None:
            return False
        try:
            os.kill(self.init_pid, REBOOT_SIGNAL)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, 9)
            self.process.wait()

    def close(self) -> None:
        """Close its listeners on the host's side (its namespaces go with its last process)."""
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders = []
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None
