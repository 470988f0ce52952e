"""The emulated Xen platform daemon (xenstore + grant memory + event channels): `serve_xenstore`,
which `ninep xenstore-emu` (`ninep.cli.xen`) runs.

One unix socket; each connection introduces itself as a domain. It keeps:
- a xenstore tree (read/write/mkdir/rm/directory), watches (fire once when set, then on every
  change at or below the watched path) and transactions (optimistic: a transaction that touched a
  node someone else changed since it started fails with EAGAIN and is retried by the caller);
- per domain the memfd holding its grantable pages (sealed against shrinking so a mapping peer
  never takes SIGBUS), handed to a mapping domain with SCM_RIGHTS;
- interdomain event channels: two eventfds (one per direction), handed to each end.

It is a test and development stand-in for the hypervisor, not a security boundary: there are no
xenstore permissions and any connection may claim any domain id that is not in use. It must never
block on one client (events to a slow client are queued, and a client that stops reading is
dropped) and a client's failure must never take it down.

`toolstack_create_device` plays libxl's part: it creates the frontend and backend directories of
a 9pfs device in state Initialising.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from transports.xen.platform import PAGE, XenPlatform
from transports.xen.wire import FrameSocket, WireError

log = logging.getLogger("ninep.xen.emu")

MAX_PATH = 3072
MAX_VALUE = 4096
STATE_INITIALISING = 1


class OpError(Exception):
    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = err


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH:
        raise OpError(errno.EINVAL, f"bad path {path!r}")
    if path != "/" and (path.endswith("/") or "//" in path):
        raise OpError(errno.EINVAL, f"bad path {path!r}")
    return path


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


class Tree:
    """Nodes as a flat dict path → value (every ancestor of a node exists)."""

    def __init__(self, nodes: dict[str, str] | None = None) -> None:
        self.nodes: dict[str, str] = nodes if nodes is not None else {"/": ""}

    def read(self, path: str) -> str:
        if path not in self.nodes:
            raise OpError(errno.ENOENT, path)
        return self.nodes[path]

    def write(self, path: str, value: str) -> list[str]:
        changed = [path]
        p = _parent(path)
        while p not in self.nodes:
            self.nodes[p] = ""
            changed.append(p)
            p = _parent(p)
        self.nodes[path] = value
        return changed

    def mkdir(self, path: str) -> list[str]:
        if path in self.nodes:
            return []
        return self.write(path, "")

    def rm(self, path: str) -> list[str]:
        if path not in self.nodes:
            raise OpError(errno.ENOENT, path)
        if path == "/":
            raise OpError(errno.EINVAL, "cannot remove /")
        prefix = path + "/"
        gone = [p for p in self.nodes if p == path or p.startswith(prefix)]
        for p in gone:
            del self.nodes[p]
        return gone

    def directory(self, path: str) -> list[str]:
        if path not in self.nodes:
            raise OpError(errno.ENOENT, path)
        prefix = path.rstrip("/") + "/"
        return sorted(
            p[len(prefix) :]
            for p in self.nodes
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        )


@dataclass
class Transaction:
    conn: Conn
    start_gen: int
    tree: Tree
    touched: set[str] = field(default_factory=set)
    log: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Domain:
    domid: int
    conn: Conn
    memfd: int = -1
    pages: int = 0


@dataclass
class Port:
    port: int
    owner: int  # domid that allocated it
    remote: int  # domid allowed to bind it
    owner_conn: Conn
    to_owner: int  # eventfd the owner waits on
    to_remote: int  # eventfd the remote waits on
    bound_by: Conn | None = None


class Conn:
    def __init__(self, fs: FrameSocket) -> None:
        self.fs = fs
        self.domid: int | None = None
        self.watches: set[tuple[str, str]] = set()
        self.send_q, self.recv_q = trio.open_memory_channel[tuple[dict[str, Any], list[int]]](4096)


class Daemon:
    def __init__(self) -> None:
        self.tree = Tree()
        self.gen = 0
        self.node_gen: dict[str, int] = {}
        self.conns: set[Conn] = set()
        self.domains: dict[int, Domain] = {}
        self.ports: dict[int, Port] = {}
        self.next_port = 1
        self.txs: dict[int, Transaction] = {}
        self.next_tx = 1

    # -- plumbing -------------------------------------------------------------------------------

    def _queue(self, conn: Conn, obj: dict[str, Any], fds: list[int] | None = None) -> None:
        """Queues a frame for `conn`; takes ownership of `fds`."""
        try:
            conn.send_q.send_nowait((obj, fds or []))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            for fd in fds or []:
                os.close(fd)
            if not conn.fs.closed:
                log.warning("dropping a xenstore client that stopped reading")
                conn.fs.close()

    def _fire(self, paths: list[str]) -> None:
        for path in paths:
            for conn in list(self.conns):
                for wpath, token in list(conn.watches):
                    if path == wpath or path.startswith(wpath.rstrip("/") + "/"):
                        self._queue(conn, {"ev": "watch", "path": path, "token": token})

    def _touch(self, paths: list[str]) -> None:
        self.gen += 1
        for p in paths:
            self.node_gen[p] = self.gen

    def _apply(self, op: str, path: str, value: str) -> list[str]:
        if op == "write":
            changed = self.tree.write(path, value)
        elif op == "mkdir":
            changed = self.tree.mkdir(path)
        else:
            changed = self.tree.rm(path)
        self._touch(changed)
        return changed

    async def serve_conn(self, fs: FrameSocket) -> None:
        conn = Conn(fs)
        self.conns.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                try:
                    while True:
                        obj, fds = await fs.receive()
                        try:
                            self._handle(conn, obj, fds)
                        finally:
                            for fd in fds:
                                os.close(fd)
                except (EOFError, WireError, OSError, trio.ClosedResourceError) as e:
                    log.debug("xenstore client gone: %s", e)
                nursery.cancel_scope.cancel()
        finally:
            self._drop(conn)
            fs.close()

    async def _writer(self, conn: Conn) -> None:
        async for obj, fds in conn.recv_q:
            try:
                await conn.fs.send(obj, fds)
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                return
            finally:
                for fd in fds:
                    os.close(fd)

    def _drop(self, conn: Conn) -> None:
        self.conns.discard(conn)
        conn.send_q.close()
        while True:  # frames the writer never sent still own their fds
            try:
                _, fds = conn.recv_q.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            for fd in fds:
                os.close(fd)
        for txid in [t for t, tx in self.txs.items() if tx.conn is conn]:
            del self.txs[txid]
        dom = self.domains.get(conn.domid) if conn.domid is not None else None
        if dom is not None and dom.conn is conn:
            del self.domains[dom.domid]
            if dom.memfd >= 0:
                os.close(dom.memfd)
                # A guest domain went away: as after a domain destroy, its devices are Closed, so
                # backends tear down instead of serving rings nobody will ever use again.
                prefix = f"/local/domain/{dom.domid}/device/"
                dead = [p for p in self.tree.nodes if p.startswith(prefix) and p.endswith("/state")]
                for p in dead:
                    self._fire(self._apply("write", p, "6"))
        for port in list(self.ports.values()):
            if port.owner_conn is conn:
                self._close_port(port)
            elif port.bound_by is conn:
                port.bound_by = None

    def _close_port(self, port: Port) -> None:
        self.ports.pop(port.port, None)
        os.close(port.to_owner)
        os.close(port.to_remote)

    # -- requests -------------------------------------------------------------------------------

    def _handle(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> None:
        rid = obj.get("id")
        op = obj.get("op")
        handler: Callable[[Conn, dict[str, Any], list[int]], tuple[Any, list[int]]] | None
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        try:
            if handler is None:
                raise OpError(errno.ENOSYS, f"unknown op {op!r}")
            if op != "introduce" and conn.domid is None:
                raise OpError(errno.EPERM, "introduce first")
            value, out_fds = handler(conn, obj, fds)
        except OpError as e:
            self._queue(conn, {"id": rid, "ok": False, "errno": e.errno, "error": str(e)})
            return
        except (KeyError, TypeError, ValueError) as e:
            self._queue(conn, {"id": rid, "ok": False, "errno": errno.EINVAL, "error": repr(e)})
            return
        # Dups: the daemon may close its own copy (port closed, domain gone) before the writer
        # gets to send this reply.
        self._queue(conn, {"id": rid, "ok": True, "value": value}, [os.dup(fd) for fd in out_fds])

    def op_introduce(
        self, conn: Conn, obj: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        domid = int(obj["domid"])
        if conn.domid is not None:
            raise OpError(errno.EEXIST, "already introduced")
        conn.domid = domid
        if not fds:
            # A control-domain style client (a backend, a tool): any number may share a domid.
            return domid, []
        if domid in self.domains:
            conn.domid = None
            raise OpError(errno.EEXIST, f"domain {domid} is already connected")
        dom = Domain(domid, conn)
        if fds:
            fd = fds[0]
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            pages = os.fstat(fd).st_size // PAGE
            dom.memfd = os.dup(fd)
            dom.pages = pages
        self.domains[domid] = dom
        return domid, []

    def _tx(self, conn: Conn, obj: dict[str, Any]) -> Transaction | None:
        txid = int(obj.get("tx", 0))
        if txid == 0:
            return None
        tx = self.txs.get(txid)
        if tx is None or tx.conn is not conn:
            raise OpError(errno.ENOENT, f"no transaction {txid}")
        return tx

    def op_read(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        path = _check_path(obj["path"])
        tx = self._tx(conn, obj)
        if tx is not None:
            tx.touched.add(path)
            return tx.tree.read(path), []
        return self.tree.read(path), []

    def op_directory(
        self, conn: Conn, obj: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        path = _check_path(obj["path"])
        tx = self._tx(conn, obj)
        if tx is not None:
            tx.touched.add(path)
            return tx.tree.directory(path), []
        return self.tree.directory(path), []

    def _mutate(self, conn: Conn, obj: dict[str, Any], op: str) -> tuple[Any, list[int]]:
        path = _check_path(obj["path"])
        value = str(obj.get("value", ""))
        if len(value) > MAX_VALUE:
            raise OpError(errno.E2BIG, "value too long")
        tx = self._tx(conn, obj)
        if tx is not None:
            if op == "write":
                tx.tree.write(path, value)
            elif op == "mkdir":
                tx.tree.mkdir(path)
            else:
                tx.tree.rm(path)
            tx.touched.add(path)
            tx.log.append((op, path, value))
            return None, []
        self._fire(self._apply(op, path, value))
        return None, []

    def op_write(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return self._mutate(conn, obj, "write")

    def op_mkdir(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return self._mutate(conn, obj, "mkdir")

    def op_rm(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        return self._mutate(conn, obj, "rm")

    def op_watch(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        path = _check_path(obj["path"])
        token = str(obj["token"])
        if len(conn.watches) >= 1024:
            raise OpError(errno.E2BIG, "too many watches")
        conn.watches.add((path, token))
        # Xenstore fires a new watch once, so "read, then wait for a change" never misses one.
        self._queue(conn, {"ev": "watch", "path": path, "token": token})
        return None, []

    def op_unwatch(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        conn.watches.discard((_check_path(obj["path"]), str(obj["token"])))
        return None, []

    def op_tx_start(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        if sum(1 for t in self.txs.values() if t.conn is conn) >= 16:
            raise OpError(errno.EBUSY, "too many transactions")
        txid = self.next_tx
        self.next_tx += 1
        self.txs[txid] = Transaction(conn, self.gen, Tree(dict(self.tree.nodes)))
        return txid, []

    def op_tx_end(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        tx = self._tx(conn, obj)
        if tx is None:
            raise OpError(errno.EINVAL, "tx 0")
        del self.txs[int(obj["tx"])]
        if not obj.get("commit", True):
            return None, []
        for path in tx.touched:
            # A node (or an ancestor, for creation) changed after the transaction started.
            p = path
            while True:
                if self.node_gen.get(p, 0) > tx.start_gen:
                    raise OpError(errno.EAGAIN, "transaction conflict")
                if p == "/":
                    break
                p = _parent(p)
        changed: list[str] = []
        for op, path, value in tx.log:
            with contextlib.suppress(OpError):
                changed += self._apply(op, path, value)
        self._fire(changed)
        return None, []

    def op_grant_fd(self, conn: Conn, obj: dict[str, Any], fds: list[int]) -> tuple[Any, list[int]]:
        dom = self.domains.get(int(obj["domid"]))
        if dom is None or dom.memfd < 0:
            raise OpError(errno.ESRCH, f"domain {obj['domid']} has no grantable memory")
        return dom.pages, [dom.memfd]

    def op_evtchn_alloc(
        self, conn: Conn, obj: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        assert conn.domid is not None
        if sum(1 for p in self.ports.values() if p.owner_conn is conn) >= 256:
            raise OpError(errno.ENOSPC, "too many event channels")
        a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        port = Port(self.next_port, conn.domid, int(obj["remote"]), conn, a, b)
        self.next_port += 1
        self.ports[port.port] = port
        # Handed over as dups: the daemon keeps its copies until the owner closes the port.
        return port.port, [a, b]

    def op_evtchn_bind(
        self, conn: Conn, obj: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        port = self.ports.get(int(obj["port"]))
        if port is None or port.owner != int(obj["domid"]) or port.remote != conn.domid:
            raise OpError(
                errno.EINVAL, f"no unbound port {obj['port']} of domain {obj['domid']} for us"
            )
        if port.bound_by is not None:
            raise OpError(errno.EBUSY, f"port {port.port} already bound")
        port.bound_by = conn
        return port.port, [port.to_remote, port.to_owner]

    def op_evtchn_close(
        self, conn: Conn, obj: dict[str, Any], fds: list[int]
    ) -> tuple[Any, list[int]]:
        port = self.ports.get(int(obj["port"]))
        if port is None:
            return None, []
        if port.owner_conn is conn:
            self._close_port(port)
        elif port.bound_by is conn:
            port.bound_by = None
        return None, []


async def serve_xenstore(
    socket_path: str, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
) -> None:
    """Runs the daemon on `socket_path` until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    daemon = Daemon()
    try:
        await sock.bind(socket_path)
        os.chmod(socket_path, 0o600)
        sock.listen(64)
        task_status.started(daemon)
        async with trio.open_nursery() as nursery:
            while True:
                client, _ = await sock.accept()
                nursery.start_soon(daemon.serve_conn, FrameSocket(client))
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def frontend_dir(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/9pfs/{devid}"


def backend_dir(back_domid: int, domid: int, devid: int) -> str:
    return f"/local/domain/{back_domid}/backend/9pfs/{domid}/{devid}"


async def toolstack_create_device(
    platform: XenPlatform,
    domid: int,
    devid: int,
    *,
    back_domid: int = 0,
    tag: str = "ninep",
    path: str = "",
    security_model: str = "none",
) -> None:
    """What libxl does for a `p9=[...]` entry: both directories in state Initialising, each
    pointing at the other. Idempotent for the fixed nodes; states are reset."""
    fe = frontend_dir(domid, devid)
    be = backend_dir(back_domid, domid, devid)
    while True:
        tx = await platform.transaction_start()
        await platform.write(f"{fe}/backend", be, tx)
        await platform.write(f"{fe}/backend-id", str(back_domid), tx)
        await platform.write(f"{fe}/tag", tag, tx)
        await platform.write(f"{fe}/state", str(STATE_INITIALISING), tx)
        await platform.write(f"{be}/frontend", fe, tx)
        await platform.write(f"{be}/frontend-id", str(domid), tx)
        await platform.write(f"{be}/path", path, tx)
        await platform.write(f"{be}/security_model", security_model, tx)
        await platform.write(f"{be}/state", str(STATE_INITIALISING), tx)
        if await platform.transaction_end(tx):
            return
