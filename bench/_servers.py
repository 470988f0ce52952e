"""Starts the servers a benchmark run compares and describes how a client reaches each one.

A `Target` is one (server, transport) pair: ninep over tcp/unix/fd (and vhost-user / Xen ring when
those transports can be imported), diod over tcp/unix/fd, and `raw` (the host directory itself,
used through os.* calls). Servers run as child processes so their CPU time can be read from /proc
apart from the client's. ninep serves the host export through `fs_backends.local` when that
module exists and an in-memory tree otherwise (the run then fills it through 9P).

This module must never measure anything; it only starts, describes and stops servers.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import REPO

#: The msize ninep's servers are started with (the seq workloads ask for 512 KiB and 1 MiB).
SERVER_MSIZE = 1 << 20


@dataclass
class Target:
    name: str  # e.g. "ninep-unix"
    kind: str  # "ninep" | "diod" | "raw"
    transport: str  # "tcp" | "unix" | "fd" | "vhost-user" | "xen" | "host"
    address: str = ""  # for transports.address.connect_address
    fd: int = -1  # client end of an inherited fd pair (fd transports)
    aname: str = ""
    pid: int = 0  # server process, for CPU time and RSS
    multi_conn: bool = True  # can several connections be open at once?
    export: str = ""  # the host directory behind it (raw, diod, ninep with the local backend)
    backend: str = ""  # "local" | "memory" (ninep), "host" otherwise
    note: str = ""
    populate_via_9p: bool = False  # an in-memory ninep tree filled through 9P


@dataclass
class Unavailable:
    name: str
    reason: str


@dataclass
class Servers:
    targets: list[Target] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)


def local_backend_available() -> bool:
    try:
        importlib.import_module("fs_backends.local")
    except Exception:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _wait_unix(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path} within {timeout:.0f} s")


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout:.0f} s")


def ensure_diod() -> str | None:
    """Path of diod, installing the Debian package if it is missing (we run as root)."""
    path = shutil.which("diod") or (os.path.exists("/usr/sbin/diod") and "/usr/sbin/diod") or None
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "diod"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("diod") or (os.path.exists("/usr/sbin/diod") and "/usr/sbin/diod") or None


#: `ninep` under cProfile counting CPU time of the main (event loop) thread only — time spent
#: waiting, or preempted by other work on a busy machine, is not charged — between SIGUSR1
#: (start) and SIGUSR2 (stop and write the profile to argv[1]).
_PROFILED_SERVER = """
import cProfile, signal, sys, time
from ninep.cli.main import main
out = sys.argv[1]
prof = cProfile.Profile(time.thread_time)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
def stop(*_):
    prof.disable()
    prof.dump_stats(out)
signal.signal(signal.SIGUSR2, stop)
sys.exit(main(sys.argv[2:]))
"""


class ServerPool:
    """Owns every server process of a run; `close` stops them all."""

    def __init__(self, tmp: Path, export: Path, *, profile_server: Path | None = None) -> None:
        self.tmp = tmp
        self.export = export
        self.procs: list[subprocess.Popen[bytes]] = []
        self.keep_fds: list[socket.socket] = []
        self.profile_server = profile_server
        self.backend = "local" if local_backend_available() else "memory"

    # --- ninep ------------------------------------------------------------------------------
    def _ninep_cmd(self, listens: list[str]) -> list[str]:
        export = str(self.export) if self.backend == "local" else "memory:"
        args = ["serve", export, "--msize", str(SERVER_MSIZE)]
        for a in listens:
            args += ["--listen", a]
        if self.profile_server is not None:
            return [sys.executable, "-c", _PROFILED_SERVER, str(self.profile_server), *args]
        return [sys.executable, "-m", "ninep", *args]

    def _spawn(self, cmd: list[str], log: str, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "ab") as logf:
            p = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, pass_fds=pass_fds,
                                 env=env or _env(), preexec_fn=_raise_nofile, cwd=str(self.tmp))
        self.procs.append(p)
        return p

    def ninep_stream(self, want: set[str]) -> list[Target]:
        port, sock = _free_port(), str(self.tmp / "ninep.sock")
        listens = []
        if "tcp" in want:
            listens.append(f"tcp:127.0.0.1:{port}")
        if "unix" in want:
            listens.append(f"unix:{sock}")
        if not listens:
            return []
        p = self._spawn(self._ninep_cmd(listens), "ninep-stream.log")
        if "unix" in want:
            _wait_unix(sock, p)
        if "tcp" in want:
            _wait_tcp(port, p)
        common = dict(kind="ninep", pid=p.pid, export=str(self.export), backend=self.backend,
                      populate_via_9p=self.backend == "memory", aname="")
        out = []
        if "tcp" in want:
            out.append(Target(name="ninep-tcp", transport="tcp", address=f"tcp:127.0.0.1:{port}", **common))  # type: ignore[arg-type]
        if "unix" in want:
            out.append(Target(name="ninep-unix", transport="unix", address=f"unix:{sock}", **common))  # type: ignore[arg-type]
        return out

    def ninep_fd(self) -> Target:
        a, b = socket.socketpair()
        p = self._spawn(self._ninep_cmd([f"fd:{a.fileno()},{a.fileno()}"]), "ninep-fd.log", pass_fds=(a.fileno(),))
        a.close()
        self.keep_fds.append(b)
        time.sleep(0.1)
        if p.poll() is not None:
            raise RuntimeError(f"ninep fd server exited with status {p.returncode}")
        return Target(name="ninep-fd", kind="ninep", transport="fd", fd=b.fileno(), pid=p.pid, multi_conn=False,
                      export=str(self.export), backend=self.backend, populate_via_9p=self.backend == "memory",
                      note="one connection (fd pair); workers take turns on it")

    def ninep_vhost_user(self) -> Target:
        importlib.import_module("transports.virtio")
        sock = str(self.tmp / "vhost-user.sock")
        p = self._spawn(self._ninep_cmd([f"vhost-user:{sock}"]), "ninep-vhost-user.log")
        _wait_unix(sock, p)
        return Target(name="ninep-vhost-user", kind="ninep", transport="vhost-user", address=f"vhost-user:{sock}",
                      pid=p.pid, multi_conn=False, export=str(self.export), backend=self.backend,
                      populate_via_9p=self.backend == "memory",
                      note="in-process vhost-user front-end (VMM + driver) as the client")

    def ninep_xen(self) -> Target:
        importlib.import_module("transports.xen")
        xs = str(self.tmp / "xenstore.sock")
        env = {**_env(), "NINEP_XENSTORE": xs}
        emu = self._spawn([sys.executable, "-m", "ninep", "xenstore-emu", "--socket", xs], "xenstore-emu.log", env=env)
        _wait_unix(xs, emu)
        address = f"xen:1/0,xenstore={xs}"
        p = self._spawn(self._ninep_cmd([address]), "ninep-xen.log", env=env)
        time.sleep(1.0)
        if p.poll() is not None:
            raise RuntimeError(f"ninep xen server exited with status {p.returncode}")
        return Target(name="ninep-xen", kind="ninep", transport="xen", address=address, pid=p.pid, multi_conn=False,
                      export=str(self.export), backend=self.backend, populate_via_9p=self.backend == "memory",
                      note="emulated Xen platform (memfd grants, eventfd event channels)")

    # --- diod -------------------------------------------------------------------------------
    def _diod_cmd(self, diod: str) -> list[str]:
        return [diod, "-f", "-n", "-c", "/dev/null", "-L", str(self.tmp / "diod.log"), "-e", str(self.export)]

    def diod_stream(self, diod: str, want: set[str]) -> list[Target]:
        port, sock = _free_port(), str(self.tmp / "diod.sock")
        cmd = self._diod_cmd(diod)
        if "tcp" in want:
            cmd += ["-l", f"127.0.0.1:{port}"]
        if "unix" in want:
            cmd += ["-l", sock]
        p = self._spawn(cmd, "diod-stream.out")
        if "unix" in want:
            _wait_unix(sock, p)
        if "tcp" in want:
            _wait_tcp(port, p)
        note = "diod negotiates msize ≤ 64 KiB: its 1 MiB Treads/Twrites go out as 64 KiB requests"
        out = []
        if "tcp" in want:
            out.append(Target(name="diod-tcp", kind="diod", transport="tcp", address=f"tcp:127.0.0.1:{port}",
                              aname=str(self.export), pid=p.pid, export=str(self.export), backend="host", note=note))
        if "unix" in want:
            out.append(Target(name="diod-unix", kind="diod", transport="unix", address=f"unix:{sock}",
                              aname=str(self.export), pid=p.pid, export=str(self.export), backend="host", note=note))
        return out

    def diod_fd(self, diod: str) -> Target:
        a, b = socket.socketpair()
        p = self._spawn(self._diod_cmd(diod) + ["-r", str(a.fileno()), "-w", str(a.fileno())], "diod-fd.out",
                        pass_fds=(a.fileno(),))
        a.close()
        self.keep_fds.append(b)
        time.sleep(0.2)
        if p.poll() is not None:
            raise RuntimeError(f"diod fd server exited with status {p.returncode}")
        return Target(name="diod-fd", kind="diod", transport="fd", fd=b.fileno(), aname=str(self.export), pid=p.pid,
                      multi_conn=False, export=str(self.export), backend="host",
                      note="diod negotiates msize ≤ 64 KiB; one connection (fd pair)")

    def close(self) -> None:
        for s in self.keep_fds:
            with contextlib.suppress(OSError):
                s.close()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


ALL_TARGETS = ("ninep-tcp", "ninep-unix", "ninep-fd", "ninep-vhost-user", "ninep-xen",
               "diod-tcp", "diod-unix", "diod-fd", "raw")


def selected(names: str | None) -> list[str]:
    """Target names matching a comma-separated list of names or prefixes ("ninep", "diod-unix")."""
    if not names:
        return list(ALL_TARGETS)
    pats = [n.strip() for n in names.split(",") if n.strip()]
    return [t for t in ALL_TARGETS if any(t == p or t.startswith(p + "-") or t.startswith(p) for p in pats)]


@contextlib.contextmanager
def start(pool: ServerPool, names: list[str]) -> Iterator[Servers]:
    """Starts every wanted target that can run here; the others are listed with the reason."""
    out = Servers()

    def attempt(name: str, fn: object, *a: object) -> None:
        try:
            res = fn(*a)  # type: ignore[operator]
            out.targets.extend(res if isinstance(res, list) else [res])
        except Exception as e:  # a missing optional transport is a fact to report, not a failure
            out.unavailable.append(Unavailable(name, f"{type(e).__name__}: {e}"))

    try:
        stream = {t.split("-")[1] for t in names if t in ("ninep-tcp", "ninep-unix")}
        if stream:
            attempt("ninep-" + "/".join(sorted(stream)), pool.ninep_stream, stream)
        if "ninep-fd" in names:
            attempt("ninep-fd", pool.ninep_fd)
        if "ninep-vhost-user" in names:
            attempt("ninep-vhost-user", pool.ninep_vhost_user)
        if "ninep-xen" in names:
            attempt("ninep-xen", pool.ninep_xen)
        if any(n.startswith("diod") for n in names):
            diod = ensure_diod()
            if diod is None:
                out.unavailable += [Unavailable(n, "diod is not installed and apt-get could not install it")
                                    for n in names if n.startswith("diod")]
            else:
                stream = {t.split("-")[1] for t in names if t in ("diod-tcp", "diod-unix")}
                if stream:
                    attempt("diod-" + "/".join(sorted(stream)), pool.diod_stream, diod, stream)
                if "diod-fd" in names:
                    attempt("diod-fd", pool.diod_fd, diod)
        if "raw" in names:
            out.targets.append(Target(name="raw", kind="raw", transport="host", export=str(pool.export), backend="host",
                                      note="os.* calls in threads on the export directory (physical baseline)"))
        yield out
    finally:
        pool.close()


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process (all its threads), from /proc."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
