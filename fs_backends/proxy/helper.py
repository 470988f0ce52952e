"""The proxy helper process: confines itself to the export and answers requests on a socket.

Runs a `LocalBackend` on its private root's /export (so there is exactly one resolver, the local
backend's fd-relative, no-follow one) and maps each request of `fs_backends.proxy.wire` onto it.
Nodes and open files live in handle tables here; the server only ever holds handle numbers and
the fds of opened files (sent with SCM_RIGHTS; the server does read/write/fsync/locks on them).

Every request is validated before use: message length and version, op, each handle (EBADF if
unknown), every name (one component; `..` only in walks, where the backend clamps it at the
root), string and blob lengths. fds sent *to* the helper are closed unread and the request is
refused. Requests run concurrently (bounded), replies go out in completion order tagged by id.

This module must never open a path that a request names other than through the backend, and never
run unconfined (`run` confines before it reads the first request).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import logging
import os
import resource  # noqa: F401  (imported before confinement hides sys.path; _linux needs it)
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

# Everything the helper will run must be imported before confinement hides sys.path.
from fs_backends import local as _local  # noqa: F401
from fs_backends import security as _security  # noqa: F401
from fs_backends.base import FsError
from fs_backends.proxy import confine as C
from fs_backends.proxy import wire as W
from fs_backends.proxy.models import make_local_backend
from ninep.protocol import numbers as P

log = logging.getLogger("ninep.proxy.helper")

MAX_HANDLES = 1 << 20
MAX_IN_FLIGHT = 64
_RECV_SIZE = W.HEADER.size + W.MAX_REQUEST + 1
#: A request answered on the loop that takes longer than this (wall clock) sends requests to
#: tasks for DIRECT_BACKOFF seconds.
DIRECT_SLOW = 0.010
DIRECT_BACKOFF = 1.0
_OK = W.Writer().u32(0).body()  # errno 0: a reply's first field on success
_DIRECT_OPS = frozenset({
    W.WALK, W.RELEASE, W.GETATTR, W.SETATTR, W.OPEN, W.CREATE, W.MKDIR, W.SYMLINK, W.MKNOD,
    W.LINK, W.READLINK, W.RENAME, W.RENAMEAT, W.UNLINKAT, W.REMOVE, W.STATFS, W.XATTR_GET,
    W.XATTR_LIST, W.XATTR_SET, W.XATTR_REMOVE,
})  # fmt: skip


class Tables:
    """Handle numbers for nodes and open files (one namespace, never 0, never reused while live)."""

    def __init__(self) -> None:
        self.nodes: dict[int, Any] = {}
        self.files: dict[int, Any] = {}
        self._next = 1

    def _alloc(self) -> int:
        if len(self.nodes) + len(self.files) >= MAX_HANDLES:
            raise FsError(errno.ENFILE)
        while True:
            h = self._next
            self._next = self._next + 1 if self._next < 0xFFFFFFFF else 1
            if h not in self.nodes and h not in self.files:
                return h

    def add_node(self, n: Any) -> int:
        h = self._alloc()
        self.nodes[h] = n
        return h

    def add_file(self, f: Any) -> int:
        h = self._alloc()
        self.files[h] = f
        return h

    def node(self, h: int) -> Any:
        try:
            return self.nodes[h]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def file(self, h: int) -> Any:
        try:
            return self.files[h]
        except KeyError:
            raise FsError(errno.EBADF) from None


def _walk_name(r: W.Reader) -> str:
    b = r.raw(W.NAME_MAX)
    if not b or b"/" in b or b"\0" in b or b == b".":
        raise W.ProtocolError(errno.EINVAL, "bad name")
    return b.decode("utf-8", "surrogateescape")


def _name(r: W.Reader) -> str:
    n = r.name()
    if n == "..":
        raise W.ProtocolError(errno.EINVAL, "'..' where a new name is expected")
    return n


def _xattr_name(r: W.Reader) -> str:
    b = r.raw(W.NAME_MAX)
    if not b or b"\0" in b:
        raise W.ProtocolError(errno.EINVAL, "bad xattr name")
    return b.decode("utf-8", "surrogateescape")


Result = tuple[W.Writer, list[int]]


class Helper:
    def __init__(self, backend: Any, sock: socket.socket) -> None:
        self.b = backend
        self.t = Tables()
        sock.setblocking(False)
        self.raw = sock
        self._send_lock = trio.Lock()
        self.ops: dict[int, Callable[[W.Reader], Awaitable[Result]]] = {
            W.ATTACH: self.attach, W.WALK: self.walk, W.RELEASE: self.release,
            W.GETATTR: self.getattr, W.SETATTR: self.setattr, W.OPEN: self.open,
            W.CREATE: self.create, W.CLOSE: self.close, W.READDIR: self.readdir,
            W.MKDIR: self.mkdir, W.SYMLINK: self.symlink, W.MKNOD: self.mknod,
            W.LINK: self.link, W.READLINK: self.readlink, W.RENAME: self.rename,
            W.RENAMEAT: self.renameat, W.UNLINKAT: self.unlinkat, W.REMOVE: self.remove,
            W.STATFS: self.statfs, W.XATTR_GET: self.xattr_get, W.XATTR_LIST: self.xattr_list,
            W.XATTR_SET: self.xattr_set, W.XATTR_REMOVE: self.xattr_remove,
            W.LOCKFD: self.lockfd,
        }  # fmt: skip
        #: Requests answered on the loop itself (see serve): those whose backend call runs on
        #: the loop when the backend inlines metadata calls (ATTACH, CLOSE, READDIR and LOCKFD
        #: always go to worker threads, so they run as tasks).
        self._direct_ops = _DIRECT_OPS if getattr(backend, "inline_metadata", False) else frozenset()
        self._direct_until = 0.0

    # -- the loop ---------------------------------------------------------------------------

    async def send(self, op: int, rid: int, body: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        """One reply datagram. Tried at once without a trio checkpoint (the socket almost always
        has room, and each checkpoint is a trip through the scheduler and epoll); only a full
        socket waits, under the lock so replies never interleave with a waiting one."""
        data = W.message(op, rid, body)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if not self._send_lock.locked():
            try:
                self.raw.sendmsg([data], anc, W.MSG_DONTWAIT)
                return
            except BlockingIOError:
                pass
        async with self._send_lock:
            while True:
                await trio.lowlevel.wait_writable(self.raw)
                try:
                    self.raw.sendmsg([data], anc, W.MSG_DONTWAIT)
                    return
                except BlockingIOError:
                    continue

    async def serve(self) -> None:
        """Reads requests as long as there are any without a checkpoint in between (one wakeup
        takes every request queued meanwhile), each becomes a task; at most MAX_IN_FLIGHT run."""
        limiter = trio.CapacityLimiter(MAX_IN_FLIGHT)
        raw = self.raw
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    msg, anc, flags, _ = raw.recvmsg(
                        _RECV_SIZE, W.ANC_SPACE, W.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(raw)
                    continue
                except OSError as e:
                    log.info("socket closed: %s", e)
                    break
                fds = _take_fds(anc)
                for fd in fds:
                    os.close(fd)
                if not msg:
                    log.info("server closed the connection")
                    break
                try:
                    if fds or flags & W.MSG_CTRUNC:
                        raise W.ProtocolError(errno.EBADMSG, "fds sent to the helper")
                    if flags & W.MSG_TRUNC or len(msg) > _RECV_SIZE - 1:
                        raise W.ProtocolError(errno.EMSGSIZE, "request too long")
                    op, rid, body = W.split(msg)
                    handler = self.ops.get(op)
                    if handler is None:
                        raise W.ProtocolError(errno.ENOSYS, f"unknown op {op}")
                except W.ProtocolError as e:
                    rid = W.HEADER.unpack_from(msg)[2] if len(msg) >= W.HEADER.size else 0
                    op = W.HEADER.unpack_from(msg)[1] & 0x7FFF if len(msg) >= W.HEADER.size else 0
                    log.warning("refused request id %d: %s", rid, e)
                    await self.send(op | W.REPLY, rid, W.Writer().u32(e.err).body())
                    continue
                if op in self._direct_ops and self._direct_until <= time.monotonic():
                    # A metadata call the backend runs on this loop: answering it here saves
                    # spawning a task and a trip through the scheduler. One that turns out slow
                    # (it hopped to a thread after all, or the storage stalls) sends the next
                    # ones to tasks again for a while, so requests keep overlapping.
                    start = time.monotonic()
                    await self._answer(op, rid, handler, body)
                    if time.monotonic() - start > DIRECT_SLOW:
                        self._direct_until = time.monotonic() + DIRECT_BACKOFF
                    continue
                token = object()  # ids come from the server and may repeat: not a borrower key
                try:
                    limiter.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(self._run, limiter, token, op, rid, handler, body)
            nursery.cancel_scope.cancel()

    async def _run(
        self,
        limiter: trio.CapacityLimiter,
        token: object,
        op: int,
        rid: int,
        handler: Callable[[W.Reader], Awaitable[Result]],
        body: memoryview,
    ) -> None:
        try:
            await self._answer(op, rid, handler, body)
        finally:
            limiter.release_on_behalf_of(token)

    async def _answer(
        self, op: int, rid: int, handler: Callable[[W.Reader], Awaitable[Result]], body: memoryview
    ) -> None:
        """Run one request and send its reply (an errno for any failure)."""
        close_after: list[int] = []
        try:
            r = W.Reader(body)
            try:
                w, fds = await handler(r)
                reply = _OK + w.body()
                close_after = fds
            except W.ProtocolError as e:
                log.warning("refused %s id %d: %s", W.OP_NAMES.get(op), rid, e)
                reply, fds = W.Writer().u32(e.err).body(), []
            except OSError as e:
                reply, fds = W.Writer().u32(e.errno or errno.EIO).body(), []
            except Exception:
                log.exception("%s failed", W.OP_NAMES.get(op))
                reply, fds = W.Writer().u32(errno.EIO).body(), []
            try:
                await self.send(op | W.REPLY, rid, reply, fds)
            except OSError as e:
                log.info("reply to id %d lost: %s", rid, e)
        finally:
            for fd in close_after:
                os.close(fd)

    # -- handlers: each parses its body completely (r.done()) before acting -----------------------

    async def attach(self, r: W.Reader) -> Result:
        aname = r.str(W.PATH_MAX)
        cred = r.cred()
        r.done()
        if "\0" in aname:
            raise FsError(errno.EINVAL)
        n = await self.b.attach(aname, cred)
        return W.Writer().u32(self.t.add_node(n)).qid(n.qid), []

    async def walk(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        count = r.u16()
        if count > W.MAX_WALK:
            raise W.ProtocolError(errno.E2BIG, "too many names")
        names = [_walk_name(r) for _ in range(count)]
        r.done()
        got = await self.b.walk(node, names)
        w = W.Writer().u16(len(got))
        for n in got:
            w.u32(self.t.add_node(n)).qid(n.qid)
        return w, []

    async def release(self, r: W.Reader) -> Result:
        h = r.u32()
        r.done()
        n = self.t.nodes.pop(h, None)
        if n is None:
            raise FsError(errno.EBADF)
        await self.b.release(n)
        return W.Writer(), []

    async def getattr(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        mask = r.u64()
        r.done()
        a = await self.b.getattr(node, mask)
        w = W.Writer()
        W.put_attr(w, a)
        return w, []

    async def setattr(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        sa = W.get_setattr(r)
        cred = r.cred()
        r.done()
        await self.b.setattr(node, sa, cred)
        return W.Writer().qid(node.qid), []

    async def open(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        flags = r.u32()
        cred = r.cred()
        r.done()
        f = await self.b.open(node, flags, cred)
        return self._file_reply(W.Writer(), f)

    def _file_reply(self, w: W.Writer, f: Any) -> Result:
        if f.fd is None:
            raise FsError(errno.EIO)
        h = self.t.add_file(f)
        is_dir = int(f.node.qid.type & P.QTDIR != 0)
        # A dup for SCM_RIGHTS, closed once sent: the helper keeps its own for readdir/LOCKFD.
        return w.u32(h).qid(f.node.qid).u8(is_dir), [os.dup(f.fd)]

    async def create(self, r: W.Reader) -> Result:
        dnode = self.t.node(r.u32())
        name = _name(r)
        flags = r.u32()
        mode = r.u32()
        cred = r.cred()
        r.done()
        node, f = await self.b.create(dnode, name, flags, mode, cred)
        try:
            nh = self.t.add_node(node)
        except BaseException:
            await self.b.close(f)
            await self.b.release(node)
            raise
        return self._file_reply(W.Writer().u32(nh).qid(node.qid), f)

    async def close(self, r: W.Reader) -> Result:
        h = r.u32()
        r.done()
        f = self.t.files.pop(h, None)
        if f is None:
            raise FsError(errno.EBADF)
        await self.b.close(f)
        return W.Writer(), []

    async def readdir(self, r: W.Reader) -> Result:
        f = self.t.file(r.u32())
        offset = r.u64()
        count = min(r.u32(), W.MAX_READDIR)
        r.done()
        ents = await self.b.readdir(f, offset, count)
        w = W.Writer().u16(len(ents))
        for e in ents:
            W.put_dirent(w, e)
        return w, []

    async def mkdir(self, r: W.Reader) -> Result:
        d = self.t.node(r.u32())
        name = _name(r)
        mode = r.u32()
        cred = r.cred()
        r.done()
        return W.Writer().qid(await self.b.mkdir(d, name, mode, cred)), []

    async def symlink(self, r: W.Reader) -> Result:
        d = self.t.node(r.u32())
        name = _name(r)
        target = r.str(W.PATH_MAX - 1)
        cred = r.cred()
        r.done()
        return W.Writer().qid(await self.b.symlink(d, name, target, cred)), []

    async def mknod(self, r: W.Reader) -> Result:
        d = self.t.node(r.u32())
        name = _name(r)
        mode = r.u32()
        major = r.u32()
        minor = r.u32()
        cred = r.cred()
        r.done()
        return W.Writer().qid(await self.b.mknod(d, name, mode, major, minor, cred)), []

    async def link(self, r: W.Reader) -> Result:
        d = self.t.node(r.u32())
        name = _name(r)
        target = self.t.node(r.u32())
        r.done()
        await self.b.link(d, name, target)
        return W.Writer(), []

    async def readlink(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        r.done()
        return W.Writer().str(await self.b.readlink(node)), []

    async def rename(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        nd = r.u32()
        newdir = None if nd == W.NO_HANDLE else self.t.node(nd)
        name = _name(r)
        r.done()
        await self.b.rename(node, newdir, name)
        return W.Writer(), []

    async def renameat(self, r: W.Reader) -> Result:
        od = self.t.node(r.u32())
        oname = _name(r)
        nd = self.t.node(r.u32())
        nname = _name(r)
        r.done()
        await self.b.renameat(od, oname, nd, nname)
        return W.Writer(), []

    async def unlinkat(self, r: W.Reader) -> Result:
        d = self.t.node(r.u32())
        name = _name(r)
        flags = r.u32()
        r.done()
        await self.b.unlinkat(d, name, flags)
        return W.Writer(), []

    async def remove(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        r.done()
        await self.b.remove(node)
        return W.Writer(), []

    async def statfs(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        r.done()
        w = W.Writer()
        W.put_statfs(w, await self.b.statfs(node))
        return w, []

    async def xattr_get(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        name = _xattr_name(r)
        r.done()
        value = await self.b.xattr_get(node, name)
        if len(value) > W.XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        return W.Writer().blob(value), []

    async def xattr_list(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        r.done()
        names = await self.b.xattr_list(node)
        total = sum(len(os.fsencode(n)) + 1 for n in names)
        if total > W.XATTR_SIZE_MAX or len(names) > 0xFFFF:
            raise FsError(errno.E2BIG)
        w = W.Writer().u16(len(names))
        for n in names:
            w.str(n)
        return w, []

    async def xattr_set(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        name = _xattr_name(r)
        value = r.blob(W.XATTR_SIZE_MAX)
        flags = r.u32()
        r.done()
        await self.b.xattr_set(node, name, value, flags)
        return W.Writer(), []

    async def xattr_remove(self, r: W.Reader) -> Result:
        node = self.t.node(r.u32())
        name = _xattr_name(r)
        r.done()
        await self.b.xattr_remove(node, name)
        return W.Writer(), []

    async def lockfd(self, r: W.Reader) -> Result:
        f = self.t.file(r.u32())
        r.done()
        if f.fd is None:
            raise FsError(errno.EBADF)
        return W.Writer(), [await trio.to_thread.run_sync(self._lock_fd, f)]

    def _lock_fd(self, f: Any) -> int:
        """A new open file description of the same file, for one lock owner's OFD locks (each
        owner needs its own description so owners conflict with each other)."""
        path = f"/proc/self/fd/{f.fd}"
        base = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        if f.node.qid.type & P.QTDIR:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | base)
        acc = {P.L_O_RDONLY: os.O_RDONLY, P.L_O_WRONLY: os.O_WRONLY, P.L_O_RDWR: os.O_RDWR}
        try:
            if self.b.info.readonly:
                raise PermissionError(errno.EROFS, "readonly")
            return os.open(path, os.O_RDWR | base)
        except PermissionError:
            return os.open(path, acc.get(f.flags & P.L_O_ACCMODE, os.O_RDONLY) | base)


def _take_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _report_child(sock_fd: int, pid: int) -> None:
    s = socket.socket(fileno=os.dup(sock_fd))
    try:
        s.send(W.message(W.CHILD, 0, W.Writer().u32(pid).body()))
    finally:
        s.close()


def _isolate_fds(*keep: int | None) -> None:
    """Nothing but the socket and stderr crosses into the helper."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def run(
    sock_fd: int,
    export: str,
    model: str,
    *,
    readonly: bool = False,
    multidevs: str = "remap",
    options: argparse.Namespace | None = None,
    allow_userns: bool = True,
    export_fd: int | None = None,
) -> int:
    """The helper's main: confine, build the backend, say HELLO, serve until the socket closes."""
    sock = socket.socket(fileno=sock_fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        log.error("--socket-fd must be a unix SOCK_SEQPACKET socket")
        return 2
    _isolate_fds(sock_fd, export_fd)
    try:
        conf = C.confine(
            export, model, sock_fd, _report_child, allow_userns=allow_userns, export_fd=export_fd
        )
    except (C.ConfineError, OSError) as e:
        log.error("cannot confine the helper: %s", e)
        return 3
    try:
        backend = make_local_backend(
            C.ROOT_EXPORT, model, readonly=readonly, multidevs=multidevs, options=options,
            userns=conf.mode == "userns",
        )
    except Exception as e:
        log.error("cannot serve %s: %s", export, e)
        return 4
    # Metadata syscalls run on the helper's loop while each stays quick (the local backend's
    # own guard sends them to worker threads for a while after a slow one): a thread hop costs
    # more CPU than the syscall, and a stalled loop here only delays other helper requests,
    # never the 9P server, which waits on a socket. Hence a looser "slow" than the server's
    # 2 ms, which a mere preemption on a loaded machine exceeds.
    backend.inline_metadata = True
    backend.INLINE_SLOW = DIRECT_SLOW
    facts = conf.facts()
    facts.update({k: str(v) for k, v in backend.info.extra.items() if k != "root"})
    facts["readonly"] = str(int(backend.info.readonly))
    facts["block_size"] = str(backend.info.block_size)
    facts["model"] = model

    async def main() -> None:
        h = Helper(backend, sock)
        w = W.Writer()
        W.put_kv(w, facts)
        await h.send(W.HELLO, 0, w.body())
        try:
            await h.serve()
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()

    trio.run(main)
    return 0



def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `ninep proxy-helper` (also `python -m fs_backends.proxy`)."""
    p.add_argument("export", help="the directory to confine to and serve")
    p.add_argument("--socket-fd", type=int, required=True,
                   help="an inherited unix SOCK_SEQPACKET socket to answer requests on")
    p.add_argument("--model", default="none",
                   choices=("none", "passthrough", "mapped-xattr", "mapped-file"),
                   help="credential model (passthrough needs root; the others run unprivileged)")
    p.add_argument("--export-fd", type=int, default=None,
                   help="an inherited O_PATH/O_DIRECTORY fd of EXPORT, used instead of its path")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--multidevs", choices=("remap", "forbid", "warn"), default="remap")
    p.add_argument("--no-userns", action="store_true",
                   help="use the root-only mount-namespace confinement even if user namespaces work")
    p.add_argument("--fmode", type=lambda v: int(v, 8), default=None,
                   help="host mode of new files, octal (mapped models)")
    p.add_argument("--dmode", type=lambda v: int(v, 8), default=None,
                   help="host mode of new directories, octal (mapped models)")  # fmt: skip


def main_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="ninep-proxy-helper %(levelname)s %(message)s")
    return run(
        args.socket_fd,
        args.export,
        args.model,
        readonly=args.readonly,
        multidevs=args.multidevs,
        options=args,
        allow_userns=not args.no_userns,
        export_fd=args.export_fd,
    )
