"""ProxyBackend: a Backend whose filesystem access all goes through a confined helper process.

The server holds handle numbers (Nodes) and, for opened files, the real fds the helper sent with
SCM_RIGHTS: read, write, fsync and byte-range locks run on those fds here, with no round trip
(a lock owner's first lock on a file fetches one extra fd, LOCKFD, because each lock owner needs
its own open file description for OFD locks). Everything else is one request to the helper.

Requests are pipelined: each gets an id; the waiting tasks read the replies themselves, one at a
time, and hand each to its owner, waking it in whatever trio run it waits in (so the backend
also works across separate trio.run calls, as the backend test-suite makes them). A watcher
thread only notices a helper hanging up while nobody waits.

Helper failure: when the helper's socket closes (crash, SIGKILL, protocol violation), every
pending request answers EIO, the death is logged, and a new helper is started at once. Requests
made while it starts answer EIO. Handles from the dead helper are *stale*: Nodes and OpenFiles
created before the crash answer ESTALE for anything that needs the helper, until the client
clunks them; data I/O (read/write/fsync/locks) on files opened before the crash keeps working,
since it never needed the helper. Clients re-attach to get fresh handles.

This module must never open a host path itself: every file it touches arrives as an fd.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from fs_backends import _linux, offload
from fs_backends._locktable import (
    LockTable,
    check_getlock_request,
    check_lock_request,
    owner_key,
    span,
)
from fs_backends.base import (
    Attr,
    BackendInfo,
    Cred,
    DirEntry,
    FsError,
    Lock,
    LockOwner,
    Qid,
    SetAttr,
    StatFs,
)
from fs_backends.proxy import wire as W
from fs_backends.proxy.spawn import Spawner
from ninep.protocol import numbers as P

log = logging.getLogger("ninep.proxy")

T = TypeVar("T")

HELLO_TIMEOUT = 20.0


class _Pending:
    """One request waiting for its reply, in whichever trio run sent it."""

    __slots__ = ("token", "event", "body", "fds", "err", "done")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.event = trio.Event()
        self.body: bytes = b""
        self.fds: list[int] = []
        self.err = 0
        self.done = False

    def nudge(self) -> None:
        """Wake the waiter (from any thread or run) to look at its state again."""
        try:
            cur: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            cur = None
        if cur is self.token:
            self.event.set()
            return
        try:
            self.token.run_sync_soon(lambda: self.event.set())
        except trio.RunFinishedError:
            for fd in self.fds:
                os.close(fd)
            self.fds = []


def _take_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


_RECV = W.HEADER.size + W.MAX_REPLY + 1
_ANC = W.ANC_SPACE


class Connection:
    """One running helper: its socket and the requests waiting on it.

    Replies are read by the waiters themselves (leader/follower): one waiting task at a time
    reads the socket in its trio run and hands each reply to its owner; when its own reply has
    come it hands the reading role on. No thread sits between the socket and the waiter, which
    keeps a round trip to the helper's own latency. A watcher thread only polls the socket for
    hang-up, so a helper that dies while nobody is waiting is noticed (and replaced) at once."""

    def __init__(self, sock: socket.socket, pid: int, gen: int) -> None:
        self.sock = sock
        self.pid = pid
        self.child_pid = 0
        self.gen = gen
        self.facts: dict[str, str] = {}
        self.alive = True
        self.pending: dict[int, _Pending] = {}
        self._leader: _Pending | None = None
        self._mu = threading.Lock()
        self._send_mu = threading.Lock()
        self._ids = itertools.count(1)
        self._on_dead: Callable[[Connection, str], None] | None = None
        self._close_when_idle = False

    def handshake(self, timeout: float = HELLO_TIMEOUT) -> None:
        """Wait for the helper's HELLO (and its outer process's CHILD report)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "proxy helper did not start")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            msg, anc, _, _ = self.sock.recvmsg(_RECV, socket.CMSG_SPACE(16))
            for fd in _take_fds(anc):
                os.close(fd)
            if not msg:
                raise OSError(errno.EIO, "proxy helper exited during startup")
            h, body = W.parse(msg)
            if h.op == W.CHILD:
                self.child_pid = W.Reader(body).u32()
            elif h.op == W.HELLO:
                self.facts = W.get_kv(W.Reader(body))
                return

    def start(self, on_dead: Callable[[Connection, str], None]) -> None:
        self._on_dead = on_dead
        self.sock.setblocking(False)
        watch_fd = os.dup(self.sock.fileno())
        threading.Thread(
            target=self._watch, args=(watch_fd,), name=f"proxy-watch-{self.gen}", daemon=True
        ).start()

    def _watch(self, fd: int) -> None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            while self.alive:
                if poller.poll(1000):
                    break
        finally:
            os.close(fd)
        self._die("helper hung up")

    def _die(self, why: str) -> None:
        if self.kill(why) and self._on_dead is not None:
            # Restarting blocks (a new helper starts): never on a trio thread.
            threading.Thread(target=self._on_dead, args=(self, why), daemon=True).start()

    def kill(self, why: str) -> bool:
        """Mark dead and fail everything pending with EIO; True the first time."""
        with self._mu:
            if not self.alive:
                return False
            self.alive = False
            pend, self.pending = self.pending, {}
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for p in pend.values():
            p.err = errno.EIO
            p.done = True
            p.nudge()
        return True

    def _register(self, p: _Pending) -> int:
        with self._mu:
            if not self.alive:
                raise FsError(errno.EIO)
            while True:
                rid = next(self._ids) & 0xFFFFFFFF
                if rid and rid not in self.pending:
                    break
            self.pending[rid] = p
            return rid

    def _send_blocking(self, data: bytes) -> None:
        """Send from a worker thread, waiting for room without ever holding _send_mu while
        blocked (the trio thread takes it for its own non-blocking sends)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        while True:
            if not self.alive:
                raise FsError(errno.EIO)
            with self._send_mu:
                try:
                    self.sock.send(data, W.MSG_DONTWAIT)
                    return
                except BlockingIOError:
                    pass
            poller.poll(100)

    def _drain(self, me: _Pending | None = None) -> None:
        """Read every reply that is there now and hand each to its waiter; stop early once
        `me` has its reply and nobody else waits (saves a read that would find nothing)."""
        while True:
            if me is not None and me.done and not self.pending:
                return
            try:
                msg, anc, flags, _ = self.sock.recvmsg(_RECV, _ANC, W.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                self._die(str(e))
                return
            fds = _take_fds(anc)
            if not msg:
                for fd in fds:
                    os.close(fd)
                self._die("socket closed")
                return
            try:
                if flags & (W.MSG_TRUNC | W.MSG_CTRUNC):
                    raise W.ProtocolError(errno.EMSGSIZE, "oversized reply")
                op, rid, body = W.split(msg)
            except W.ProtocolError as e:
                for fd in fds:
                    os.close(fd)
                self._die(f"protocol violation: {e}")
                return
            if op == W.CHILD:
                with contextlib.suppress(W.ProtocolError):
                    self.child_pid = W.Reader(body).u32()
                continue
            with self._mu:
                p = self.pending.pop(rid, None) if op & W.REPLY else None
            if p is None:
                for fd in fds:
                    os.close(fd)
                continue
            p.body = bytes(body)
            p.fds = fds
            p.done = True
            p.nudge()

    async def _lead(self, me: _Pending) -> None:
        while not me.done and self.alive:
            self._drain(me)
            if me.done:
                return
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (OSError, trio.ClosedResourceError) as e:
                self._die(str(e))
                return

    async def call(self, op: int, body: bytes) -> tuple[W.Reader, list[int]]:
        p = _Pending(trio.lowlevel.current_trio_token())
        rid = self._register(p)
        data = W.message(op, rid, body)
        try:
            with self._send_mu:
                self.sock.send(data, W.MSG_DONTWAIT)
        except BlockingIOError:
            # The helper is behind: wait for room in a worker thread, never on the trio loop
            # (other waiters keep reading replies meanwhile, so the helper can move on).
            try:
                await trio.to_thread.run_sync(self._send_blocking, data)
            except OSError:
                with self._mu:
                    self.pending.pop(rid, None)
                raise FsError(errno.EIO) from None
        except OSError:
            with self._mu:
                self.pending.pop(rid, None)
            raise FsError(errno.EIO) from None
        with trio.CancelScope(shield=True):
            while not p.done:
                with self._mu:
                    lead = self._leader is None and not p.done
                    if lead:
                        self._leader = p
                if lead:
                    try:
                        await self._lead(p)
                    finally:
                        with self._mu:
                            self._leader = None
                            others = [q for q in self.pending.values() if not q.done]
                            close_now = self._close_when_idle
                        if close_now:
                            with contextlib.suppress(OSError):
                                self.sock.close()
                        for q in others:  # one of them takes over reading
                            q.nudge()
                else:
                    await p.event.wait()
                    p.event = trio.Event()
        if p.err:
            raise FsError(p.err)
        r = W.Reader(p.body)
        try:
            err = r.u32()
        except W.ProtocolError:
            err = errno.EIO
        if err:
            for fd in p.fds:
                os.close(fd)
            raise FsError(err)
        return r, p.fds

    def close(self) -> None:
        """Stop using this helper. The socket is only closed once no task waits on it: closing
        an fd under trio's wait_readable would leave that waiter asleep for ever (the shutdown
        in kill() is what wakes it)."""
        self.kill("closed")
        with self._mu:
            if self._leader is not None:
                self._close_when_idle = True
                return
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass(eq=False)
class ProxyNode:
    qid: Qid
    handle: int
    gen: int
    released: bool = False


@dataclass
class _FileLocks:
    table: LockTable = field(default_factory=LockTable)
    fds: dict[Hashable, int] = field(default_factory=dict)


@dataclass(eq=False)
class ProxyOpenFile:
    node: ProxyNode
    fd: int | None
    handle: int
    gen: int
    flags: int
    is_dir: bool
    ident: tuple[int, int]
    lock_owners: set[Hashable] = field(default_factory=set)
    closed: bool = False
    busy: int = 0  # calls using `fd` right now (`hold_fd`); a close waits for the last one


class ProxyBackend:
    """A Backend served by a confined helper process that `spawner` starts."""

    def __init__(self, spawner: Spawner, *, restart: bool = True) -> None:
        self.spawner = spawner
        self.restart = restart
        self._gen = 0
        self._closed = False
        self._mu = threading.Lock()
        self._lk = threading.Lock()
        self._locks: dict[tuple[int, int], _FileLocks] = {}
        self._conn = self._start()
        self.restarts = 0
        f = self._conn.facts
        self.info = BackendInfo(
            name="proxy",
            readonly=f.get("readonly") == "1",
            block_size=int(f.get("block_size", "4096") or 4096),
            extra=dict(f),
        )

    def listening(self) -> None:
        """Called by the server once its listeners are bound (`ninep serve` replaces this with
        the server's own confinement, see ninep.cli.proxy_serve)."""

    # -- helper lifecycle ------------------------------------------------------------------------

    def _start(self) -> Connection:
        self._gen += 1
        sock, pid = self.spawner.spawn()
        conn = Connection(sock, pid, self._gen)
        try:
            conn.handshake()
        except BaseException:
            sock.close()
            self.spawner.reap(pid, 5)
            raise
        conn.start(self._on_dead)
        log.info("proxy helper %d (child %d) ready: %s", pid, conn.child_pid, conn.facts)
        return conn

    def _on_dead(self, conn: Connection, why: str) -> None:
        """Runs in a thread of its own (it starts a new helper, which blocks)."""
        if self._closed or conn is not self._conn:
            return
        status = self.spawner.reap(conn.pid, 2)
        log.error("proxy helper %d died (%s, exit status %s): pending requests failed with EIO",
                  conn.pid, why, status)  # fmt: skip
        conn.close()
        if not self.restart:
            return
        for attempt in range(5):
            if self._closed:
                return
            try:
                new = self._start()
            except (OSError, W.ProtocolError) as e:
                log.error("restarting the proxy helper failed (%s), attempt %d", e, attempt + 1)
                threading.Event().wait(0.2 * (attempt + 1))
                continue
            with self._mu:
                self._conn = new
                self.restarts += 1
            log.warning("proxy helper restarted as %d; handles from before answer ESTALE", new.pid)
            return

    @property
    def helper_pid(self) -> int:
        return self._conn.pid

    @property
    def helper_child_pid(self) -> int:
        return self._conn.child_pid

    def _live(self, gen: int) -> Connection:
        conn = self._conn
        if gen != conn.gen:
            raise FsError(errno.ESTALE)
        if not conn.alive:
            raise FsError(errno.EIO)
        return conn

    async def _call(self, gen: int | None, op: int, w: W.Writer) -> tuple[W.Reader, list[int]]:
        conn = self._conn if gen is None else self._live(gen)
        if not conn.alive:
            raise FsError(errno.EIO)
        try:
            return await conn.call(op, w.body())
        except W.ProtocolError:
            raise FsError(errno.EIO) from None

    async def _simple(self, gen: int, op: int, w: W.Writer) -> W.Reader:
        r, fds = await self._call(gen, op, w)
        for fd in fds:
            os.close(fd)
        return r

    @staticmethod
    def _node_ok(node: ProxyNode) -> None:
        if node.released:
            raise FsError(errno.EBADF)

    @staticmethod
    def _same_gen(*nodes: ProxyNode) -> int:
        gens = {n.gen for n in nodes}
        for n in nodes:
            if n.released:
                raise FsError(errno.EBADF)
        if len(gens) != 1:
            raise FsError(errno.ESTALE)
        return gens.pop()

    # -- nodes ----------------------------------------------------------------------------------

    async def attach(self, aname: str, cred: Cred) -> ProxyNode:
        conn = self._conn
        r = await self._simple(conn.gen, W.ATTACH, W.Writer().str(aname).cred(cred))
        h, q = r.u32(), r.qid()
        return ProxyNode(q, h, conn.gen)

    async def walk(self, node: ProxyNode, names: Sequence[str]) -> list[ProxyNode]:
        self._node_ok(node)
        if len(names) > W.MAX_WALK:
            raise FsError(errno.E2BIG)
        w = W.Writer().u32(node.handle).u16(len(names))
        for n in names:
            w.str(n)
        r = await self._simple(node.gen, W.WALK, w)
        out = []
        for _ in range(r.u16()):
            h, q = r.u32(), r.qid()
            out.append(ProxyNode(q, h, node.gen))
        return out

    async def release(self, node: ProxyNode) -> None:
        if node.released:
            return
        node.released = True
        conn = self._conn
        if conn.gen == node.gen and conn.alive:
            with contextlib.suppress(OSError):
                await self._simple(node.gen, W.RELEASE, W.Writer().u32(node.handle))

    async def getattr(self, node: ProxyNode, mask: int) -> Attr:
        self._node_ok(node)
        r = await self._simple(node.gen, W.GETATTR, W.Writer().u32(node.handle).u64(mask))
        a = W.get_attr(r)
        node.qid = a.qid
        return a

    async def setattr(self, node: ProxyNode, attr: SetAttr, cred: Cred) -> None:
        self._node_ok(node)
        w = W.Writer().u32(node.handle)
        W.put_setattr(w, attr)
        r = await self._simple(node.gen, W.SETATTR, w.cred(cred))
        node.qid = r.qid()

    # -- open files ------------------------------------------------------------------------------

    def _opened(self, node: ProxyNode, r: W.Reader, fds: list[int], flags: int) -> ProxyOpenFile:
        try:
            h, q, is_dir = r.u32(), r.qid(), r.u8()
            if len(fds) != 1:
                raise FsError(errno.EIO)
            st = os.fstat(fds[0])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        node.qid = q
        return ProxyOpenFile(node, fds[0], h, node.gen, flags, bool(is_dir), (st.st_dev, st.st_ino))

    async def open(self, node: ProxyNode, flags: int, cred: Cred) -> ProxyOpenFile:
        self._node_ok(node)
        r, fds = await self._call(node.gen, W.OPEN, W.Writer().u32(node.handle).u32(flags).cred(cred))
        return self._opened(node, r, fds, flags)

    async def create(
        self, dir: ProxyNode, name: str, flags: int, mode: int, cred: Cred
    ) -> tuple[ProxyNode, ProxyOpenFile]:
        self._node_ok(dir)
        w = W.Writer().u32(dir.handle).str(name).u32(flags).u32(mode & 0xFFFFFFFF).cred(cred)
        r, fds = await self._call(dir.gen, W.CREATE, w)
        try:
            nh, nq = r.u32(), r.qid()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        node = ProxyNode(nq, nh, dir.gen)
        return node, self._opened(node, r, fds, flags)

    async def close(self, f: ProxyOpenFile) -> None:
        if f.closed:
            return
        f.closed = True
        try:
            self._release_locks_sync(f, None)
        except OSError:
            log.exception("dropping locks on close failed")
        if f.fd is not None and not f.busy:
            with contextlib.suppress(OSError):
                os.close(f.fd)
            f.fd = None
        conn = self._conn
        if conn.gen == f.gen and conn.alive:
            with contextlib.suppress(OSError):
                await self._simple(f.gen, W.CLOSE, W.Writer().u32(f.handle))

    @staticmethod
    def _fd(f: ProxyOpenFile) -> int:
        if f.closed or f.fd is None:
            raise FsError(errno.EBADF)
        return f.fd

    @contextlib.asynccontextmanager
    async def hold_fd(self, f: ProxyOpenFile) -> AsyncIterator[int]:
        """f's fd, kept open until the block ends even if the file is closed meanwhile (a Tclunk
        racing a Twrite): closed at once, its number could be reused by the next open and the
        write land in another file."""
        fd = self._fd(f)
        f.busy += 1
        try:
            yield fd
        finally:
            f.busy -= 1
            if f.closed and not f.busy and f.fd is not None:
                f.fd = None
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _infile(self, f: ProxyOpenFile, fn: Callable[..., T], *args: Any) -> T:
        """fn(fd, *args) on a worker thread, f's fd held open meanwhile."""
        async with self.hold_fd(f) as fd:
            return await offload.run_sync(lambda: fn(fd, *args))

    async def read(self, f: ProxyOpenFile, offset: int, count: int) -> bytes:
        self._fd(f)
        if offset < 0 or count < 0:
            raise FsError(errno.EINVAL)
        return await self._infile(f, os.pread, count, offset)

    async def write(self, f: ProxyOpenFile, offset: int, data: bytes | memoryview) -> int:
        self._fd(f)
        if offset < 0:
            raise FsError(errno.EINVAL)
        return await self._infile(f, os.pwrite, data, offset)

    async def write_from(self, f: ProxyOpenFile, offset: int, pwrite: Callable[[int, int], int]) -> int:
        """`write` whose data `pwrite(fd, offset)` writes itself (zero-copy from guest memory)."""
        self._fd(f)
        if offset < 0:
            raise FsError(errno.EINVAL)
        return await self._infile(f, pwrite, offset)

    async def fsync(self, f: ProxyOpenFile, datasync: bool) -> None:
        await self._infile(f, os.fdatasync if datasync else os.fsync)

    async def readdir(self, f: ProxyOpenFile, offset: int, max_entries: int) -> list[DirEntry]:
        self._fd(f)
        if not f.is_dir:
            raise FsError(errno.ENOTDIR)
        if max_entries <= 0:
            return []
        if offset < 0:
            raise FsError(errno.EINVAL)
        w = W.Writer().u32(f.handle).u64(offset).u32(min(max_entries, W.MAX_READDIR))
        r = await self._simple(f.gen, W.READDIR, w)
        return [W.get_dirent(r) for _ in range(r.u16())]

    # -- names ------------------------------------------------------------------------------------

    async def mkdir(self, dir: ProxyNode, name: str, mode: int, cred: Cred) -> Qid:
        self._node_ok(dir)
        w = W.Writer().u32(dir.handle).str(name).u32(mode & 0xFFFFFFFF).cred(cred)
        return (await self._simple(dir.gen, W.MKDIR, w)).qid()

    async def symlink(self, dir: ProxyNode, name: str, target: str, cred: Cred) -> Qid:
        self._node_ok(dir)
        w = W.Writer().u32(dir.handle).str(name).str(target).cred(cred)
        return (await self._simple(dir.gen, W.SYMLINK, w)).qid()

    async def mknod(
        self, dir: ProxyNode, name: str, mode: int, major: int, minor: int, cred: Cred
    ) -> Qid:
        self._node_ok(dir)
        w = W.Writer().u32(dir.handle).str(name).u32(mode & 0xFFFFFFFF)
        w.u32(major & 0xFFFFFFFF).u32(minor & 0xFFFFFFFF).cred(cred)
        return (await self._simple(dir.gen, W.MKNOD, w)).qid()

    async def link(self, dir: ProxyNode, name: str, target: ProxyNode) -> None:
        gen = self._same_gen(dir, target)
        await self._simple(gen, W.LINK, W.Writer().u32(dir.handle).str(name).u32(target.handle))

    async def readlink(self, node: ProxyNode) -> str:
        self._node_ok(node)
        return (await self._simple(node.gen, W.READLINK, W.Writer().u32(node.handle))).str()

    async def rename(self, node: ProxyNode, newdir: ProxyNode | None, newname: str) -> None:
        gen = self._same_gen(node, *([newdir] if newdir is not None else []))
        nd = newdir.handle if newdir is not None else W.NO_HANDLE
        await self._simple(gen, W.RENAME, W.Writer().u32(node.handle).u32(nd).str(newname))

    async def renameat(
        self, olddir: ProxyNode, oldname: str, newdir: ProxyNode, newname: str
    ) -> None:
        gen = self._same_gen(olddir, newdir)
        w = W.Writer().u32(olddir.handle).str(oldname).u32(newdir.handle).str(newname)
        await self._simple(gen, W.RENAMEAT, w)

    async def unlinkat(self, dir: ProxyNode, name: str, flags: int) -> None:
        self._node_ok(dir)
        w = W.Writer().u32(dir.handle).str(name).u32(flags & 0xFFFFFFFF)
        await self._simple(dir.gen, W.UNLINKAT, w)

    async def remove(self, node: ProxyNode) -> None:
        self._node_ok(node)
        await self._simple(node.gen, W.REMOVE, W.Writer().u32(node.handle))

    async def statfs(self, node: ProxyNode) -> StatFs:
        self._node_ok(node)
        return W.get_statfs(await self._simple(node.gen, W.STATFS, W.Writer().u32(node.handle)))

    # -- xattrs ---------------------------------------------------------------------------------------

    async def xattr_get(self, node: ProxyNode, name: str) -> bytes:
        self._node_ok(node)
        r = await self._simple(node.gen, W.XATTR_GET, W.Writer().u32(node.handle).str(name))
        return r.blob(W.XATTR_SIZE_MAX)

    async def xattr_list(self, node: ProxyNode) -> list[str]:
        self._node_ok(node)
        r = await self._simple(node.gen, W.XATTR_LIST, W.Writer().u32(node.handle))
        return [r.str(W.NAME_MAX) for _ in range(r.u16())]

    async def xattr_set(self, node: ProxyNode, name: str, value: bytes, flags: int) -> None:
        self._node_ok(node)
        if len(value) > P.XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        w = W.Writer().u32(node.handle).str(name).blob(value).u32(flags & 0xFFFFFFFF)
        await self._simple(node.gen, W.XATTR_SET, w)

    async def xattr_remove(self, node: ProxyNode, name: str) -> None:
        self._node_ok(node)
        await self._simple(node.gen, W.XATTR_REMOVE, W.Writer().u32(node.handle).str(name))

    # -- locks: OFD locks on fds held here; the helper only supplies one fd per owner and file ----

    async def _lock_fd(self, f: ProxyOpenFile, key: Hashable) -> tuple[int, bool]:
        """The OFD-lock fd of owner `key` on f's file, fetched from the helper the first time.
        Returns (fd, new)."""
        with self._lk:
            fl = self._locks.get(f.ident)
            if fl is not None and key in fl.fds:
                return fl.fds[key], False
        r, fds = await self._call(f.gen, W.LOCKFD, W.Writer().u32(f.handle))
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise FsError(errno.EIO)
        with self._lk:
            fl = self._locks.setdefault(f.ident, _FileLocks())
            if key in fl.fds:  # a concurrent request of the same owner won
                os.close(fds[0])
                return fl.fds[key], False
            fl.fds[key] = fds[0]
        return fds[0], True

    def _drop_owner(self, ident: tuple[int, int], fl: _FileLocks, key: Hashable) -> None:
        fl.table.drop(key)
        lfd = fl.fds.pop(key, None)
        if lfd is not None:
            os.close(lfd)
        if not fl.fds:
            self._locks.pop(ident, None)

    async def lock(self, f: ProxyOpenFile, lock: Lock, owner: LockOwner) -> int:
        self._fd(f)
        check_lock_request(lock, f.flags)
        key = owner_key(owner)
        start, end = span(lock.start, lock.length)
        length = 0 if end is None else end - start
        if lock.type == P.LOCK_TYPE_UNLCK:
            with self._lk:
                fl = self._locks.get(f.ident)
                if fl is None or key not in fl.fds:
                    return P.LOCK_SUCCESS
                _linux.ofd_setlk(fl.fds[key], lock.type, start, length)
                fl.table.apply(key, lock.type, start, end)
                if key not in fl.table.owners():
                    self._drop_owner(f.ident, fl, key)
                return P.LOCK_SUCCESS
        lfd, new = await self._lock_fd(f, key)
        with self._lk:
            fl = self._locks.get(f.ident)
            if fl is None or fl.fds.get(key) != lfd:
                raise FsError(errno.EAGAIN)
            try:
                ok = _linux.ofd_setlk(lfd, lock.type, start, length)
            except BaseException:
                if new:
                    self._drop_owner(f.ident, fl, key)
                raise
            if not ok:
                if new:
                    self._drop_owner(f.ident, fl, key)
                return P.LOCK_BLOCKED
            fl.table.apply(key, lock.type, start, end)
            f.lock_owners.add(key)
            return P.LOCK_SUCCESS

    async def getlock(self, f: ProxyOpenFile, lock: Lock, owner: LockOwner) -> Lock:
        self._fd(f)
        check_getlock_request(lock)
        key = owner_key(owner)
        start, end = span(lock.start, lock.length)
        length = 0 if end is None else end - start
        lfd, new = await self._lock_fd(f, key)
        with self._lk:
            try:
                t, s, ln, pid = _linux.ofd_getlk(lfd, lock.type, start, length)
            finally:
                fl = self._locks.get(f.ident)
                if new and fl is not None and key not in fl.table.owners():
                    self._drop_owner(f.ident, fl, key)
            if t == P.LOCK_TYPE_UNLCK:
                return Lock(P.LOCK_TYPE_UNLCK, lock.start, lock.length, lock.proc_id, lock.client_id)
            real = self._locks.get(f.ident)
            c = real.table.conflict(key, lock.type, start, end) if real is not None else None
            if c is not None:
                assert isinstance(c.owner, tuple)
                _, client_id, proc_id = c.owner
                return Lock(c.type, c.start, 0 if c.end is None else c.end - c.start, proc_id, client_id)
            return Lock(t, s, ln, max(pid, 0), "")

    async def release_locks(self, f: ProxyOpenFile, owner: LockOwner | None) -> None:
        try:
            self._release_locks_sync(f, owner)
        except OSError:
            log.exception("release_locks failed")

    def _release_locks_sync(self, f: ProxyOpenFile, owner: LockOwner | None) -> None:
        keys = {owner_key(owner)} if owner is not None else set(f.lock_owners)
        with self._lk:
            fl = self._locks.get(f.ident)
            for k in keys:
                if fl is not None and k in fl.fds:
                    self._drop_owner(f.ident, fl, k)
            f.lock_owners -= keys

    # -- shutdown -----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        await trio.to_thread.run_sync(self._aclose_sync, conn)

    def _aclose_sync(self, conn: Connection) -> None:
        conn.close()
        with self._lk:
            for fl in self._locks.values():
                for lfd in fl.fds.values():
                    os.close(lfd)
            self._locks.clear()
        self.spawner.reap(conn.pid, 5)
        self.spawner.close()


__all__ = ["Connection", "ProxyBackend", "ProxyNode", "ProxyOpenFile"]
