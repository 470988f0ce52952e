"""Fixtures for the proxy tests: an export with a canary directory beside it, raw helper sockets."""

from __future__ import annotations

import array
import hashlib
import os
import select
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_backends.proxy import wire as W
from fs_backends.proxy.backend import Connection
from fs_backends.proxy.models import MODELS, model_available
from fs_backends.proxy.spawn import DirectSpawner, HelperSpec

AVAILABLE_MODELS = [m for m in MODELS if model_available(m) and (m != "passthrough" or os.geteuid() == 0)]
OWNER = 4242  # a non-root owner for exports served by the unprivileged models


def tree_digest(root: Path) -> str:
    """Names, types, modes, owners, sizes, nlinks, mtimes, xattrs, link targets and contents of
    everything under root (and the root's own)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)}|{st.st_mode:o}|{st.st_uid}|{st.st_gid}|{st.st_size}|{st.st_nlink}|{st.st_mtime_ns}\n".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(Path(p).read_bytes())
            for x in sorted(os.listxattr(p, follow_symlinks=False)):
                h.update(x.encode() + os.getxattr(p, x, follow_symlinks=False))
    st = os.lstat(root)
    h.update(f"root|{st.st_mode:o}|{st.st_uid}|{st.st_nlink}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(export, canary): the canary sits beside the export and must never change. The export
    holds symlinks that point at the canary (absolute and relative) and a hard-to-miss secret."""
    export = tmp_path / "export"
    canary = tmp_path / "canary"
    export.mkdir()
    canary.mkdir()
    (canary / "secret").write_text("top secret\n")
    (canary / "sub").mkdir()
    (canary / "sub" / "deep").write_text("deep secret\n")
    os.chmod(canary / "secret", 0o666)
    os.chmod(canary, 0o777)
    (export / "file").write_text("inside\n")
    (export / "dir").mkdir()
    os.symlink(str(canary / "secret"), export / "abs_secret")
    os.symlink("../canary/secret", export / "rel_secret")
    os.symlink("../canary", export / "outdir")
    os.symlink("/", export / "slash")
    for p in (export, export / "file", export / "dir"):
        os.chown(p, OWNER, OWNER)
    for p in ("abs_secret", "rel_secret", "outdir", "slash"):
        os.lchown(export / p, OWNER, OWNER)
    yield export, canary


class RawHelper:
    """A helper started on a socket that the test speaks to directly, like a hijacked server."""

    def __init__(self, export: Path, model: str) -> None:
        self.spawner = DirectSpawner(HelperSpec(str(export), model))
        self.sock, self.pid = self.spawner.spawn()
        conn = Connection(self.sock, self.pid, 1)
        conn.handshake()
        self.facts = conn.facts
        self.child_pid = conn.child_pid
        self.rid = 100

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv(self, timeout: float = 10) -> tuple[W.Header, W.Reader, list[int]]:
        while True:
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                raise TimeoutError("no reply from the helper")
            msg, anc, _, _ = self.sock.recvmsg(W.HEADER.size + W.MAX_REPLY, socket.CMSG_SPACE(64))
            fds: list[int] = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(data)
                    fds.extend(a)
            assert msg, "helper closed the connection"
            h, body = W.parse(msg)
            if h.op == W.CHILD:
                continue
            return h, W.Reader(body), fds

    def call(self, op: int, w: W.Writer | bytes) -> tuple[int, W.Reader, list[int]]:
        """Send one request; returns (errno, reader positioned after the errno, fds)."""
        self.rid += 1
        body = w if isinstance(w, bytes) else w.body()
        self.send_raw(W.message(op, self.rid, body))
        h, r, fds = self.recv()
        assert h.rid == self.rid and h.op == op | W.REPLY
        return r.u32(), r, fds

    def ok(self, op: int, w: W.Writer | bytes) -> tuple[W.Reader, list[int]]:
        err, r, fds = self.call(op, w)
        assert err == 0, os.strerror(err)
        return r, fds

    def close(self) -> None:
        self.sock.close()
        self.spawner.close()


@pytest.fixture(params=AVAILABLE_MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def raw(site: tuple[Path, Path], model: str) -> Iterator[RawHelper]:
    h = RawHelper(site[0], model)
    yield h
    h.close()
