"""Starting proxy helpers: directly (a subprocess) or through a launcher process.

`HelperSpec` says what to start. `DirectSpawner` runs `python -m fs_backends.proxy --socket-fd N
EXPORT ...` on one end of a fresh SOCK_SEQPACKET socketpair and returns the other end.

`Launcher` serves `ninep serve --user`: it is forked while the server is still privileged, keeps
only the identity helpers need (root for passthrough, the export's owner otherwise), and on each
one-byte request from the server starts one helper (at most a few per minute) and sends back the
server's socket end with SCM_RIGHTS. It accepts nothing else, so the unprivileged server can ask
for a replacement helper after a crash but cannot make the launcher do anything more.

This module never talks the helper protocol; it only creates processes and sockets.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("ninep.proxy")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class HelperSpec:
    export: str
    model: str = "none"
    readonly: bool = False
    multidevs: str = "remap"
    extra_args: list[str] = field(default_factory=list)
    #: an O_PATH fd of the export opened while privileged (the launcher's user may not be able
    #: to walk to the export by path)
    export_fd: int | None = None

    def argv(self, fd: int) -> list[str]:
        a = [sys.executable, "-m", "fs_backends.proxy", "--socket-fd", str(fd),
             "--model", self.model, "--multidevs", self.multidevs]  # fmt: skip
        if self.export_fd is not None:
            a += ["--export-fd", str(self.export_fd)]
        if self.readonly:
            a.append("--readonly")
        return a + self.extra_args + ["--", self.export]


class Spawner(Protocol):
    def spawn(self) -> tuple[socket.socket, int]:
        """Start a helper; returns the server's socket end and the helper's pid."""
        ...

    def reap(self, pid: int, timeout: float = 0) -> int | None:
        """The helper's exit status once it has exited (None while it runs or if unknown)."""
        ...

    def close(self) -> None: ...


class DirectSpawner:
    def __init__(self, spec: HelperSpec) -> None:
        self.spec = spec
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self) -> tuple[socket.socket, int]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            p = subprocess.Popen(
                self.spec.argv(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        # Reap finished helpers lazily so they do not linger as zombies.
        for pid, old in list(self._procs.items()):
            if old.poll() is not None:
                del self._procs[pid]
        self._procs[p.pid] = p
        return mine, p.pid

    def reap(self, pid: int, timeout: float = 0) -> int | None:
        p = self._procs.get(pid)
        if p is None:
            return None
        try:
            return p.wait(timeout) if timeout else p.poll()
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        for p in self._procs.values():
            if p.poll() is None:
                try:
                    p.wait(2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()


class ForkSpawner:
    """Starts helpers by fork() without exec: for the single-threaded launcher only (forking a
    threaded process is unsafe), and needed there because the launcher's user may not be able
    to exec the interpreter (e.g. a Python under /root)."""

    def __init__(self, spec: HelperSpec) -> None:
        self.spec = spec
        self.pids: set[int] = set()

    def spawn(self) -> tuple[socket.socket, int]:
        from fs_backends.proxy import helper

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine.close()
                os.setsid()
                p = argparse.ArgumentParser()
                helper.add_arguments(p)
                args = p.parse_args(self.spec.argv(theirs.fileno())[3:])
                code = helper.main_from_args(args)
            except BaseException:
                log.exception("proxy helper failed")
            finally:
                os._exit(code)
        theirs.close()
        self.pids.add(pid)
        return mine, pid

    def reap(self, pid: int, timeout: float = 0) -> int | None:
        if pid not in self.pids:
            return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.pids.discard(pid)
                return None
            if got:
                self.pids.discard(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def close(self) -> None:
        for pid in list(self.pids):
            if self.reap(pid, 2) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.reap(pid, 2)


# -- the launcher -------------------------------------------------------------------------------

_SPAWN = b"S"
_MAX_SPAWNS = 10
_SPAWN_WINDOW = 60.0


def _recv_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    msg, anc, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(4 * 4))
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return msg, fds


def _launcher_main(sock: socket.socket, spec: HelperSpec, uid: int, gid: int) -> None:
    from fs_backends.proxy import confine as C

    try:
        C.prctl(C.PR_SET_PDEATHSIG, signal.SIGKILL)
        spec.export_fd = os.open(spec.export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.geteuid() == 0 and (uid, gid) != (0, 0):
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        spawner = ForkSpawner(spec)
        recent: list[float] = []
        while True:
            try:
                msg, fds = _recv_fds(sock, 16)
            except OSError:
                break
            for fd in fds:
                os.close(fd)
            if not msg:
                break
            for pid in list(spawner.pids):
                spawner.reap(pid)
            if msg != _SPAWN or fds:
                sock.send(struct.pack("<ii", -errno.EINVAL, 0))
                continue
            now = time.monotonic()
            recent = [t for t in recent if now - t < _SPAWN_WINDOW]
            if len(recent) >= _MAX_SPAWNS:
                sock.send(struct.pack("<ii", -errno.EAGAIN, 0))
                continue
            recent.append(now)
            try:
                s, pid = spawner.spawn()
            except OSError as e:
                sock.send(struct.pack("<ii", -(e.errno or errno.EIO), 0))
                continue
            try:
                sock.sendmsg(
                    [struct.pack("<ii", pid, 0)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))],
                )
            finally:
                s.close()
        spawner.close()
    finally:
        os._exit(0)


class LauncherSpawner:
    """The server's end of a launcher process (see the module docstring)."""

    def __init__(self, spec: HelperSpec, uid: int, gid: int) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.close()
            _launcher_main(theirs, spec, uid, gid)
        theirs.close()
        self.sock = mine
        self.pid = pid

    def spawn(self) -> tuple[socket.socket, int]:
        self.sock.send(_SPAWN)
        msg, fds = _recv_fds(self.sock, 8)
        if len(msg) != 8:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EIO, "launcher gone")
        pid, _ = struct.unpack("<ii", msg)
        if pid < 0 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(-pid if pid < 0 else errno.EIO, "launcher could not start a helper")
        return socket.socket(fileno=fds[0]), pid

    def reap(self, pid: int, timeout: float = 0) -> int | None:
        return None  # the launcher reaps its own children

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
