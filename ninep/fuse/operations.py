"""The FUSE frontend: pyfuse3 `Operations` (on trio) over any Backend.

The kernel speaks in inode numbers and file handles; a Backend speaks in `Node` and `OpenFile`
handles. This module keeps the two tables that translate between them:

- `InodeTable`: inode number ↔ one backend Node, with the kernel's lookup count. An entry is
  freed (its Node released) when `forget` brings the count to zero and no file handle is open on
  it, so a run that creates and deletes many files does not grow the table. Inode numbers come
  from `qid.path` (so hard links share one inode and numbers are stable while the mount lives);
  a qid.path that would collide with a number in use (or with 0/1) gets a number from a reserved
  high range, remembered for the life of the mount so it stays stable too.
- file handles ↔ `OpenFile` (files) and `_DirHandle` (directories, with a cache of the current
  batch of backend entries so a directory of any size is listed in bounded batches, resuming at
  the backend's cookies). The first FULL_ENTRIES entries of a listing go to the kernel with
  attributes (readdirplus, one lookup each); the rest with name, type and inode number only.

Handles the kernel keeps: every inode it knows holds a backend Node (an fd, a fid). Past
`max_inodes` the oldest unused ones are handed back by telling the kernel to drop their dentries.
Nodes of a 9P server whose fids are paths (diod) go stale after a rename or an unlink of another
name; each inode remembers the names it was reached by and is walked to again when that happens.

Errors: an `OSError` from the backend becomes `FUSEError(errno)`; anything else is logged and
answered EIO. Credentials of each request (ctx.uid/ctx.gid) are passed to the backend as `Cred`.

This module must never make blocking syscalls on the trio loop (the backend runs its own in worker
threads) and never touches paths of the host: everything goes through the Backend.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from fs_backends.base import Attr, Backend, Cred, DirEntry, Node, OpenFile, Qid, SetAttr
from ninep.protocol import numbers as P
from ninep.protocol.openflags import host_to_dotl
from ninep.server.policy import DEFAULT_POLICY, Gate, OperationPolicy, Refused

log = logging.getLogger("ninep.fuse")

ROOT_INODE = int(pyfuse3.ROOT_INODE)
#: First number of the range handed to qid.paths that collide with a number already in use.
ALT_INODE_BASE = 1 << 63
#: Entries asked from the backend per readdir call, and how many are resolved (walk+getattr) at
#: once while filling one kernel buffer.
READDIR_BATCH = 512
RESOLVE_CHUNK = 32
#: Concurrent walk/getattr calls while resolving directory entries.
RESOLVE_PARALLEL = 16
#: Entries of one listing handed to the kernel with attributes (readdirplus: each costs a walk,
#: a getattr and a table entry until the kernel forgets it). Past this many, entries carry only
#: name, type and inode number, and the kernel looks up the ones it needs; a directory of any
#: size is then listed without holding a handle per entry.
FULL_ENTRIES = 1024
#: Names remembered per inode (hard links) for finding a file again on a path-based server.
MAX_NAMES = 4



def _find_nodeid_offset() -> int | None:
    """Where pyfuse3 keeps the node id of an EntryAttributes (fuse_entry_param.ino).

    pyfuse3's `st_ino` sets both the node id (the inode the kernel links and will forget) and
    attr.st_ino (the d_ino readdir shows). A readdirplus entry with node id 0 is shown but not
    linked (Linux fuse_direntplus_link), which is what a listing without lookups needs; pyfuse3
    has no API for it, so the field is located once here and the layout checked: node id,
    generation, st_dev, st_ino (struct fuse_entry_param). None if the layout is not that."""
    try:
        magic = 0x5A17_00C0_FFEE_1234
        e = pyfuse3.EntryAttributes()
        e.st_ino = magic
        raw = ctypes.string_at(id(e), type(e).__basicsize__)
        hits = [
            i
            for i in range(0, len(raw) - 7, 8)
            if int.from_bytes(raw[i : i + 8], "little") == magic
        ]
        if len(hits) != 2 or hits[1] - hits[0] != 24:
            return None
        ctypes.c_uint64.from_address(id(e) + hits[0]).value = 0
        if e.st_ino != 0 or ctypes.c_uint64.from_address(id(e) + hits[1]).value != magic:
            return None
        return hits[0]
    except Exception:  # any surprise: do without
        return None


_NODEID_OFFSET = _find_nodeid_offset()


def _unlinked_entry(ino: int, mode: int) -> pyfuse3.EntryAttributes | None:
    """A readdirplus entry showing inode number `ino` with no node for the kernel to link."""
    if _NODEID_OFFSET is None:
        return None
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode = mode
    e.entry_timeout = 0
    e.attr_timeout = 0
    ctypes.c_uint64.from_address(id(e) + _NODEID_OFFSET).value = 0
    return e


_DT_TO_IFMT = {
    P.DT_DIR: stat.S_IFDIR,
    P.DT_REG: stat.S_IFREG,
    P.DT_LNK: stat.S_IFLNK,
    P.DT_FIFO: stat.S_IFIFO,
    P.DT_SOCK: stat.S_IFSOCK,
    P.DT_CHR: stat.S_IFCHR,
    P.DT_BLK: stat.S_IFBLK,
}




def _fsname(name: bytes) -> str:
    s = os.fsdecode(name)
    if not s or "/" in s or "\0" in s:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return s


@dataclass(slots=True)
class _Inode:
    ino: int
    node: Node
    qid_path: int
    qid_type: int
    nlookup: int = 0
    nopen: int = 0
    #: Where the file was last reached, newest first (directory inode, name): lets a Node that
    #: went stale on a path-based server (diod: fids are paths) be walked again.
    names: list[tuple[int, str]] = field(default_factory=list)
    #: Backend calls in progress on `node`; superseded Nodes wait in `retired` until none is.
    busy: int = 0
    retired: list[Node] = field(default_factory=list)
    dropped: bool = False
    #: The newest attributes seen: answered (with nlink 0) for an open file whose Node the
    #: server no longer resolves (an unlinked file on a path-based server such as diod).
    last_attr: Attr | None = None

    def add_name(self, parent: int, name: str) -> None:
        if not parent or name in (".", ".."):
            return
        key = (parent, name)
        if self.names and self.names[0] == key:
            return
        self.names = [key, *(n for n in self.names if n != key)][:MAX_NAMES]

    def drop_name(self, parent: int, name: str) -> None:
        self.names = [n for n in self.names if n != (parent, name)]


class InodeTable:
    """inode number ↔ backend Node, with lookup and open counts (see module docstring).

    Methods that make Nodes unneeded return them; the caller releases them (asynchronously)."""

    def __init__(self) -> None:
        self.by_ino: dict[int, _Inode] = {}
        self.by_path: dict[int, int] = {}  # qid.path -> ino, for entries in by_ino
        self._alt: dict[int, int] = {}  # qid.path -> reserved high number (never reused)
        self._alt_used: set[int] = set()
        self._next_alt = ALT_INODE_BASE

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, ino: int) -> _Inode:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def number_for(self, qid_path: int) -> int:
        """The inode number qid.path has (or would get) right now."""
        ino = self.by_path.get(qid_path)
        if ino is not None:
            return ino
        alt = self._alt.get(qid_path)
        if alt is not None:
            return alt
        if (
            qid_path not in (0, ROOT_INODE)
            and qid_path < (1 << 64)
            and qid_path not in self.by_ino
            and qid_path not in self._alt_used
        ):
            return qid_path
        while self._next_alt in self.by_ino or self._next_alt in self._alt_used:
            self._next_alt += 1
        alt = self._next_alt
        self._next_alt += 1
        self._alt[qid_path] = alt
        self._alt_used.add(alt)
        return alt

    def add_root(self, node: Node) -> _Inode:
        ent = _Inode(ROOT_INODE, node, node.qid.path, node.qid.type, nlookup=1)
        self.by_ino[ROOT_INODE] = ent
        self.by_path[node.qid.path] = ROOT_INODE
        return ent

    def existing(self, qid: Qid) -> _Inode | None:
        ino = self.by_path.get(qid.path)
        if ino is None:
            return None
        ent = self.by_ino[ino]
        if ent.qid_type != qid.type:
            return None  # the host reused the number for a different kind of file
        return ent

    def register(self, node: Node, qid: Qid, parent: int, name: str) -> tuple[_Inode, list[Node]]:
        """Count one more kernel reference to the file `node` (fresh from a walk of `name` in
        directory inode `parent`) is a handle on. The fresh Node replaces the entry's older one:
        on a path-based server it is the one that names the file as it is now."""
        ent = self.existing(qid)
        if ent is None:
            old_ino = self.by_path.get(qid.path)
            if old_ino is not None:
                # Same qid.path, different type: the old file is gone. Take the number over so
                # the kernel sees the new type (it drops its old inode on the type change).
                ent = self.by_ino[old_ino]
                ent.qid_type = qid.type
        if ent is None:
            ino = self.number_for(qid.path)
            ent = _Inode(ino, node, qid.path, qid.type, nlookup=1)
            ent.add_name(parent, name)
            self.by_ino[ino] = ent
            self.by_path[qid.path] = ino
            return ent, []
        ent.nlookup += 1
        ent.add_name(parent, name)
        return ent, self.replace_node(ent, node)

    def replace_node(self, ent: _Inode, node: Node) -> list[Node]:
        if node is ent.node:
            return []
        ent.retired.append(ent.node)
        ent.node = node
        return self.reap(ent)

    def reap(self, ent: _Inode) -> list[Node]:
        """Superseded Nodes nobody uses any more (and all of them once the entry is gone)."""
        if ent.busy:
            return []
        out, ent.retired = ent.retired, []
        if ent.dropped:
            out.append(ent.node)
            ent.dropped = False
        return out

    def forget(self, ino: int, n: int) -> list[Node]:
        """Drop `n` lookups; returns the Nodes to release if the entry went away."""
        ent = self.by_ino.get(ino)
        if ent is None:
            return []
        ent.nlookup = max(0, ent.nlookup - n)
        return self._maybe_drop(ent)

    def close_one(self, ent: _Inode) -> list[Node]:
        ent.nopen = max(0, ent.nopen - 1)
        return self._maybe_drop(ent)

    def _maybe_drop(self, ent: _Inode) -> list[Node]:
        if ent.nlookup > 0 or ent.nopen > 0 or ent.ino == ROOT_INODE:
            return []
        if self.by_ino.get(ent.ino) is not ent:
            return []
        del self.by_ino[ent.ino]
        if self.by_path.get(ent.qid_path) == ent.ino:
            del self.by_path[ent.qid_path]
        ent.dropped = True
        return self.reap(ent)

    def drain(self) -> list[Node]:
        nodes: list[Node] = []
        for e in self.by_ino.values():
            nodes.append(e.node)
            nodes.extend(e.retired)
        self.by_ino.clear()
        self.by_path.clear()
        return nodes


@dataclass(slots=True)
class _FileHandle:
    inode: _Inode
    f: OpenFile
    #: A Node to release after closing `f` (create() of a file that already had an inode).
    spare: Node | None = None


@dataclass(slots=True)
class _Resolved:
    """A directory entry made ready for readdirplus: the Node to register and its attributes."""

    entry: DirEntry
    node: Node | None  # None: '.'/'..', a light entry, or the resolution failed
    attr: Attr | None
    gone: bool = False  # the name vanished since it was listed: leave it out


@dataclass(slots=True)
class _DirHandle:
    inode: _Inode
    f: OpenFile
    # The batch of backend entries last read and the cookie it was read from.
    batch: list[DirEntry] = field(default_factory=list)
    batch_cookie: int = -1
    index: dict[int, int] = field(default_factory=dict)  # entry.offset -> position in batch
    # Entries resolved for a kernel buffer that had no room left: reused by the next call.
    ready: dict[int, _Resolved] = field(default_factory=dict)  # entry.offset -> resolved
    # Entries handed to the kernel with attributes since the listing started (FULL_ENTRIES).
    full_sent: int = 0


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
#: Handlers that change nothing, so running them again after EMFILE is safe.
_RETRY_ON_EMFILE = frozenset(
    {
        "lookup",
        "getattr",
        "open",
        "opendir",
        "readdir",
        "readlink",
        "getxattr",
        "listxattr",
        "statfs",
    }
)
R = TypeVar("R")


def _handler(fn: F) -> F:
    """Map backend errors to FUSEError and log each call when debugging."""
    name = fn.__name__

    retry = name in _RETRY_ON_EMFILE

    @functools.wraps(fn)
    async def wrapper(self: FuseOperations, *args: Any) -> Any:
        try:
            try:
                result = await fn(self, *args)
            except OSError as e:
                # Out of fds (or fids): make the kernel give some inodes back, then try again.
                if not retry or e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if not self._shed(force=True):
                    raise
                await trio.sleep(0.2)
                result = await fn(self, *args)
        except Refused as e:
            e.log("fuse", name)
            raise pyfuse3.FUSEError(e.errno or errno.EPERM) from None
        except pyfuse3.FUSEError as e:
            if self.debug:
                log.debug("%s%s -> %s", name, _short(args), errno.errorcode.get(e.errno, e.errno))
            raise
        except OSError as e:
            err = e.errno or errno.EIO
            if self.debug:
                log.debug("%s%s -> %s", name, _short(args), errno.errorcode.get(err, err))
            raise pyfuse3.FUSEError(err) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s%s failed", name, _short(args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.debug:
            log.debug("%s%s -> %s", name, _short(args), _short_result(result))
        return result

    return cast(F, wrapper)


def _short(args: Sequence[Any]) -> str:
    parts = []
    for a in args:
        if isinstance(a, pyfuse3.RequestContext):
            parts.append(f"ctx(uid={a.uid},gid={a.gid},pid={a.pid})")
        elif isinstance(a, bytes | bytearray | memoryview) and len(a) > 64:
            parts.append(f"<{len(a)} bytes>")
        elif isinstance(a, pyfuse3.EntryAttributes | pyfuse3.SetattrFields):
            parts.append(type(a).__name__)
        else:
            parts.append(repr(a))
    return "(" + ", ".join(parts) + ")"


def _short_result(r: object) -> str:
    if isinstance(r, pyfuse3.EntryAttributes):
        return f"ino={r.st_ino} mode={r.st_mode:o} size={r.st_size}"
    if isinstance(r, bytes) and len(r) > 64:
        return f"<{len(r)} bytes>"
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], pyfuse3.FileInfo):
        return f"fh={r[0].fh} {_short_result(r[1])}"
    if isinstance(r, pyfuse3.FileInfo):
        return f"fh={r.fh}"
    return repr(r)


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 request handlers translating to one Backend rooted at `root`."""

    # The kernel may look up '.' and '..' (NFS export style): we answer them.
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        backend: Backend,
        root: Node,
        *,
        attr_timeout: float = 1.0,
        entry_timeout: float = 1.0,
        debug: bool = False,
        max_inodes: int | None = None,
        policy: OperationPolicy = DEFAULT_POLICY,
    ) -> None:
        super().__init__()
        #: The export's operation policy (devices, setid bits, privileged xattrs), checked with
        #: the same `Gate` the 9P session uses.
        self.policy = policy
        #: Above this many inodes the oldest unused ones are handed back (see _shed): every
        #: inode holds a backend handle (an fd for a local export, a fid for a 9P server).
        self.max_inodes = max_inodes
        #: Whether backend Nodes can stop naming their file (9P servers whose fids are paths,
        #: like diod): then ENOENT/ESTALE on a Node makes us walk to the file again. Local and
        #: memory Nodes hold the file itself.
        self.stale_nodes = backend.info.name not in ("local", "memory")
        self._asked: set[int] = set()
        self._last_shed = 0.0
        self.backend = backend
        self.inodes = InodeTable()
        self.root = self.inodes.add_root(root)
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.debug = debug
        self.files: dict[int, _FileHandle] = {}
        self.dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1

    # ----------------------------------------------------------------- helpers

    def _maybe_shed(self) -> None:
        # Entries already asked are on their way out: only more than that calls for a scan.
        if self.max_inodes is not None and len(self.inodes) - len(self._asked) > self.max_inodes:
            self._shed()

    def _shed(self, force: bool = False) -> int:
        """Ask the kernel to drop the dentries of the oldest unused inodes, down to 80% of the
        limit; it then forgets them and their backend handles are released. The kernel only
        knows inodes through its dentries, so this is the one way to make it let go early.
        Entries already asked (the kernel forgets asynchronously) are not asked again."""
        by_ino = self.inodes.by_ino
        self._asked = {i for i in self._asked if i in by_ino}
        limit = self.max_inodes if self.max_inodes is not None else len(by_ino)
        want = len(by_ino) - int(limit * 0.8) - len(self._asked)
        if force:
            want = max(want, 64)
        asked = 0
        for ent in list(by_ino.values()):
            if asked >= want:
                break
            if ent.ino == ROOT_INODE or ent.nopen or ent.busy or not ent.names:
                continue
            if ent.ino in self._asked:
                continue
            for parent, name in ent.names:
                if parent in by_ino:
                    # "deleted": without it the kernel drops the dentry but keeps the inode in
                    # its cache (and sends no forget); with it the unused inode is evicted. A
                    # later lookup brings the same inode number back.
                    pyfuse3.invalidate_entry_async(
                        parent, os.fsencode(name), deleted=ent.ino, ignore_enoent=True
                    )
            self._asked.add(ent.ino)
            asked += 1
        if asked and time.monotonic() - self._last_shed > 5:
            self._last_shed = time.monotonic()
            log.info("inode table at %d: asked the kernel to forget %d", len(by_ino), asked)
        return asked

    def stats(self) -> dict[str, int]:
        """Table sizes (logged on SIGUSR1 by the CLI, read by tests)."""
        return {"inodes": len(self.inodes), "files": len(self.files), "dirs": len(self.dirs)}

    def _gate(self, cred: Cred) -> Gate:
        return Gate(self.policy, self.backend.info, cred)

    def _cred(self, ctx: pyfuse3.RequestContext) -> Cred:
        return Cred(uid=ctx.uid, gid=ctx.gid)

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _seen(self, ent: _Inode, a: Attr) -> pyfuse3.EntryAttributes:
        ent.last_attr = a
        return self._entry(ent.ino, a)

    def _entry(self, ino: int, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize or 4096
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_sec * 1_000_000_000 + a.atime_nsec
        e.st_mtime_ns = a.mtime_sec * 1_000_000_000 + a.mtime_nsec
        e.st_ctime_ns = a.ctime_sec * 1_000_000_000 + a.ctime_nsec
        e.st_birthtime_ns = a.btime_sec * 1_000_000_000 + a.btime_nsec
        return e

    async def _release_nodes(self, nodes: Sequence[Node | None]) -> None:
        for n in nodes:
            if n is None:
                continue
            try:
                await self.backend.release(n)
            except Exception:  # release must not fail a request; the contract says it won't
                log.exception("backend release failed")

    async def _on(
        self, ent: _Inode, op: Callable[[Node], Awaitable[R]], *, names: bool = False
    ) -> R:
        """Run `op(ent.node)`; if the Node went stale (ENOENT/ESTALE: a path-based server after
        a rename or unlink of another name) walk to the file again and retry once.

        `names`: `op` works on a name inside the directory (walk, unlink, create...), so ENOENT
        usually means the name is missing; a getattr on the directory tells which it is."""
        ent.busy += 1
        try:
            try:
                return await op(ent.node)
            except OSError as e:
                if not self.stale_nodes or e.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
                if not ent.names:
                    raise
                if names and await self._node_ok(ent.node):
                    raise
                if not await self._rewalk(ent):
                    raise
            return await op(ent.node)
        finally:
            ent.busy -= 1
            if not ent.busy and (ent.retired or ent.dropped):
                await self._release_nodes(self.inodes.reap(ent))

    async def _node_ok(self, node: Node) -> bool:
        try:
            await self.backend.getattr(node, P.GETATTR_MODE)
        except OSError:
            return False
        return True

    async def _rewalk(self, ent: _Inode, depth: int = 0) -> bool:
        """Find the file `ent` describes again by one of its known (directory, name)s."""
        if depth > 64:
            return False
        for parent_ino, name in list(ent.names):
            parent = self.inodes.by_ino.get(parent_ino)
            if parent is None or parent is ent:
                ent.drop_name(parent_ino, name)
                continue
            node = await self._walk_again(parent, name, depth)
            if node is None:
                ent.drop_name(parent_ino, name)
                continue
            if node.qid.path != ent.qid_path:
                await self._release_nodes([node])  # the name now names another file
                ent.drop_name(parent_ino, name)
                continue
            await self._release_nodes(self.inodes.replace_node(ent, node))
            return True
        return False

    async def _walk_again(self, parent: _Inode, name: str, depth: int) -> Node | None:
        parent.busy += 1
        try:
            for attempt in range(2):
                try:
                    return await self._walk_one(parent.node, name)
                except OSError as e:
                    if attempt or e.errno not in (errno.ENOENT, errno.ESTALE):
                        return None
                    if await self._node_ok(parent.node):
                        return None
                    if not await self._rewalk(parent, depth + 1):
                        return None
            return None
        finally:
            parent.busy -= 1
            if not parent.busy and (parent.retired or parent.dropped):
                await self._release_nodes(self.inodes.reap(parent))

    async def _register(
        self, node: Node, attr: Attr, parent: _Inode, name: str
    ) -> pyfuse3.EntryAttributes:
        """One more kernel lookup of the file `node` (fresh from a walk) describes."""
        ent, drop = self.inodes.register(node, attr.qid, parent.ino, name)
        self._asked.discard(ent.ino)
        await self._release_nodes(drop)
        self._maybe_shed()
        return self._seen(ent, attr)

    async def _walk_one(self, dir: Node, name: str) -> Node:
        nodes = await self.backend.walk(dir, [name])
        if not nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if len(nodes) > 1:  # a backend should never return more; do not leak them
            await self._release_nodes(nodes[1:])
        return nodes[0]

    async def _lookup_new(self, parent: _Inode, name: str) -> pyfuse3.EntryAttributes:
        node = await self._on(parent, lambda d: self._walk_one(d, name), names=True)
        try:
            attr = await self.backend.getattr(node, P.GETATTR_ALL)
        except BaseException:
            await self._release_nodes([node])
            raise
        return await self._register(node, attr, parent, name)

    async def forget_all(self) -> None:
        """Release every handle (after unmount: the kernel will not send the last forgets)."""
        for fh in list(self.files.values()):
            await self._close_quietly(fh.f)
            await self._release_nodes([fh.spare])
        for dh in list(self.dirs.values()):
            await self._close_quietly(dh.f)
            await self._drop_ready(dh)
        self.files.clear()
        self.dirs.clear()
        await self._release_nodes(self.inodes.drain())

    async def _close_quietly(self, f: OpenFile) -> None:
        try:
            await self.backend.close(f)
        except Exception:
            log.exception("backend close failed")

    # ----------------------------------------------------------------- names

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        if name == b".":
            attr = await self._on(parent, lambda n: self.backend.getattr(n, P.GETATTR_ALL))
            parent.nlookup += 1
            return self._entry(parent.ino, attr)
        s = ".." if name == b".." else _fsname(name)
        return await self._lookup_new(parent, s)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        drops: list[Node] = []
        for ino, n in inode_list:
            gone = self.inodes.forget(ino, n)
            if gone:
                self._asked.discard(ino)
                drops += gone
        if self.debug:
            log.debug("forget(%d inodes) -> table %d", len(inode_list), len(self.inodes))
        await self._release_nodes(drops)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        try:
            attr = await self._on(ent, lambda n: self.backend.getattr(n, P.GETATTR_ALL))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE) or not ent.nopen or not ent.last_attr:
                raise
            ent.last_attr.nlink = 0  # open but unreachable: it was unlinked
            return self._entry(ent.ino, ent.last_attr)
        return self._seen(ent, attr)

    @_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        sa = SetAttr(valid=0)
        if fields.update_mode:
            sa.valid |= P.SETATTR_MODE
            sa.mode = attr.st_mode & 0o7777
        if fields.update_uid:
            sa.valid |= P.SETATTR_UID
            sa.uid = attr.st_uid
        if fields.update_gid:
            sa.valid |= P.SETATTR_GID
            sa.gid = attr.st_gid
        if fields.update_size:
            sa.valid |= P.SETATTR_SIZE
            sa.size = attr.st_size
        if fields.update_atime:
            sa.valid |= P.SETATTR_ATIME | P.SETATTR_ATIME_SET
            sa.atime_sec, sa.atime_nsec = divmod(attr.st_atime_ns, 1_000_000_000)
        if fields.update_mtime:
            sa.valid |= P.SETATTR_MTIME | P.SETATTR_MTIME_SET
            sa.mtime_sec, sa.mtime_nsec = divmod(attr.st_mtime_ns, 1_000_000_000)
        if fields.update_ctime:
            sa.valid |= P.SETATTR_CTIME
        cred = self._cred(ctx)
        if fields.update_mode:
            self._gate(cred).mode(ent.names[0][1] if ent.names else str(inode), sa.mode, stat.S_ISDIR(attr.st_mode))

        async def op(n: Node) -> Attr:
            if sa.valid:
                await self.backend.setattr(n, sa, cred)
            return await self.backend.getattr(n, P.GETATTR_ALL)

        return self._seen(ent, await self._on(ent, op))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        ent = self.inodes.get(inode)
        return os.fsencode(await self._on(ent, self.backend.readlink))

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        s, cred = _fsname(name), self._cred(ctx)
        self._gate(cred).mknod(s, mode)
        await self._on(
            parent,
            lambda d: self.backend.mknod(d, s, mode, os.major(rdev), os.minor(rdev), cred),
            names=True,
        )
        return await self._lookup_new(parent, s)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        s, cred = _fsname(name), self._cred(ctx)
        await self._on(parent, lambda d: self.backend.mkdir(d, s, mode & 0o7777, cred), names=True)
        return await self._lookup_new(parent, s)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        s, cred, t = _fsname(name), self._cred(ctx), os.fsdecode(target)
        await self._on(parent, lambda d: self.backend.symlink(d, s, t, cred), names=True)
        return await self._lookup_new(parent, s)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        parent = self.inodes.get(new_parent_inode)
        s = _fsname(new_name)
        await self._on(
            parent, lambda d: self._on(ent, lambda n: self.backend.link(d, s, n)), names=True
        )
        await self._refresh_name(ent, parent, s)
        attr = await self._on(ent, lambda n: self.backend.getattr(n, P.GETATTR_ALL))
        ent.nlookup += 1
        return self._entry(ent.ino, attr)

    async def _refresh_name(self, ent: _Inode | None, parent: _Inode, name: str) -> _Inode | None:
        """After a link or rename the kernel sends no lookup: walk the new name so the entry's
        Node names the file as it is now (a path-based server's old handle may name nothing)."""
        try:
            node = await self._on(parent, lambda d: self._walk_one(d, name), names=True)
        except OSError:
            return None
        if ent is None:
            ent = self.inodes.existing(node.qid)
        if ent is None or ent.qid_path != node.qid.path:
            await self._release_nodes([node])
            return None
        ent.add_name(parent.ino, name)
        await self._release_nodes(self.inodes.replace_node(ent, node))
        return ent

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        s = _fsname(name)
        await self._on(parent, lambda d: self.backend.unlinkat(d, s, 0), names=True)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        s = _fsname(name)
        await self._on(parent, lambda d: self.backend.unlinkat(d, s, P.AT_REMOVEDIR), names=True)

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            # 9P has no RENAME_NOREPLACE/EXCHANGE; emulating them would not be atomic.
            # EINVAL is what callers (glibc/gnulib renameatu) expect and fall back on.
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self.inodes.get(parent_inode_old)
        new = self.inodes.get(parent_inode_new)
        so, sn = _fsname(name_old), _fsname(name_new)
        await self._on(
            old,
            lambda od: self._on(new, lambda nd: self.backend.renameat(od, so, nd, sn), names=True),
            names=True,
        )
        moved = await self._refresh_name(None, new, sn)
        if moved is not None:
            moved.drop_name(old.ino, so)

    # ----------------------------------------------------------------- files

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        ent = self.inodes.get(inode)
        lflags, cred = host_to_dotl(flags), self._cred(ctx)
        f = await self._on(ent, lambda n: self.backend.open(n, lflags, cred))
        fh = self._fh()
        ent.nopen += 1
        self.files[fh] = _FileHandle(ent, f)
        # Page cache on (mmap needs it), dropped at each open for close-to-open consistency.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    @_handler
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.inodes.get(parent_inode)
        s, cred = _fsname(name), self._cred(ctx)
        self._gate(cred).mode(s, mode, False)
        lflags = host_to_dotl(flags, create=True) | P.L_O_CREAT
        node, f = await self._on(
            parent, lambda d: self.backend.create(d, s, lflags, mode & 0o7777, cred), names=True
        )
        try:
            attr = await self.backend.getattr(node, P.GETATTR_ALL)
        except BaseException:
            await self._close_quietly(f)
            await self._release_nodes([node])
            raise
        ent, drop = self.inodes.register(node, attr.qid, parent.ino, s)
        # `node` backs the OpenFile: if the table hands it back, keep it until the file closes.
        spare = node if node in drop else None
        await self._release_nodes([n for n in drop if n is not node])
        fh = self._fh()
        ent.nopen += 1
        self.files[fh] = _FileHandle(ent, f, spare)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._seen(ent, attr)

    def _file(self, fh: int) -> _FileHandle:
        try:
            return self.files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = await self.backend.read(self._file(fh).f, off, size)
        return bytes(data)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._file(fh)
        f = h.f
        view = memoryview(buf)
        done = 0
        while done < len(view):  # FUSE (without direct_io) needs every byte written
            n = await self.backend.write(f, off + done, view[done:])
            if n <= 0:
                raise pyfuse3.FUSEError(errno.EIO)
            done += n
        last = h.inode.last_attr
        if last is not None and off + done > last.size:
            last.size = off + done
        return done

    @_handler
    async def flush(self, fh: int) -> None:
        self._file(fh)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.backend.fsync(self._file(fh).f, bool(datasync))

    @_handler
    async def release(self, fh: int) -> None:
        h = self.files.pop(fh, None)
        if h is None:
            return
        await self._close_quietly(h.f)
        await self._release_nodes([*self.inodes.close_one(h.inode), h.spare])

    # ----------------------------------------------------------------- directories

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ent = self.inodes.get(inode)
        cred = self._cred(ctx)
        f = await self._on(
            ent, lambda n: self.backend.open(n, P.L_O_RDONLY | P.L_O_DIRECTORY, cred)
        )
        fh = self._fh()
        ent.nopen += 1
        self.dirs[fh] = _DirHandle(ent, f)
        return fh

    async def _entries_after(self, dh: _DirHandle, cookie: int) -> list[DirEntry]:
        """Backend entries following `cookie`: from the cached batch when a sequential listing
        continues in it, else one more backend readdir (always for cookie 0, so rewinddir sees
        the directory as it is now)."""
        if cookie != 0:
            if cookie == dh.batch_cookie and dh.batch:
                return dh.batch
            pos = dh.index.get(cookie)
            if pos is not None and pos + 1 < len(dh.batch):
                return dh.batch[pos + 1 :]
        else:
            await self._drop_ready(dh)
        batch = await self.backend.readdir(dh.f, cookie, READDIR_BATCH)
        dh.batch, dh.batch_cookie = batch, cookie
        dh.index = {e.offset: i for i, e in enumerate(batch)}
        return batch

    async def _drop_ready(self, dh: _DirHandle) -> None:
        nodes: list[Node | None] = [r.node for r in dh.ready.values()]
        dh.ready.clear()
        await self._release_nodes(nodes)

    async def _resolve(self, dh: _DirHandle, entries: Sequence[DirEntry]) -> list[_Resolved]:
        out: list[_Resolved | None] = [None] * len(entries)
        limiter = trio.CapacityLimiter(RESOLVE_PARALLEL)

        async def one(i: int, e: DirEntry) -> None:
            async with limiter:
                node: Node | None = None
                try:
                    node = await self._on(dh.inode, lambda d: self._walk_one(d, e.name), names=True)
                    attr = await self.backend.getattr(node, P.GETATTR_ALL)
                except OSError as err:
                    if node is not None:
                        await self._release_nodes([node])
                    if err.errno != errno.ENOENT and _NODEID_OFFSET is None:
                        raise
                    # Removed since the listing: left out. Unreachable for another reason
                    # (EMFILE, EACCES...): listed without attributes.
                    out[i] = _Resolved(e, None, None, gone=err.errno == errno.ENOENT)
                    return
                out[i] = _Resolved(e, node, attr)

        async with trio.open_nursery() as nursery:
            for i, e in enumerate(entries):
                if e.name in (".", ".."):
                    out[i] = _Resolved(e, None, None)
                elif e.offset in dh.ready:
                    out[i] = dh.ready.pop(e.offset)
                else:
                    nursery.start_soon(one, i, e)
        return [r for r in out if r is not None]

    def _dot_entry(self, dh: _DirHandle, e: DirEntry) -> pyfuse3.EntryAttributes:
        # The kernel links no inode for '.'/'..' (it only shows d_ino and d_type).
        a = pyfuse3.EntryAttributes()
        a.st_ino = dh.inode.ino if e.name == "." else self.inodes.number_for(e.qid.path)
        a.st_mode = stat.S_IFDIR
        return a

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            dh = self.dirs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        cookie = start_id
        if cookie == 0:
            dh.full_sent = 0
        while True:
            entries = await self._entries_after(dh, cookie)
            if not entries:
                return
            if dh.full_sent >= FULL_ENTRIES and _NODEID_OFFSET is not None:
                light = [_Resolved(e, None, None) for e in entries[:READDIR_BATCH]]
                resolved = light
            else:
                resolved = await self._resolve(dh, entries[:RESOLVE_CHUNK])
            release: list[Node] = []
            full = False
            for r in resolved:
                e = r.entry
                if full:
                    if r.node is not None:
                        dh.ready[e.offset] = r  # resolved already: the next call starts here
                    continue
                attrs: pyfuse3.EntryAttributes | None
                if e.name in (".", ".."):
                    attrs = self._dot_entry(dh, e)
                elif r.gone:
                    cookie = e.offset  # vanished since it was listed: skip it
                    continue
                elif r.node is None or r.attr is None:
                    ifmt = _DT_TO_IFMT.get(e.type, stat.S_IFREG)
                    attrs = _unlinked_entry(self.inodes.number_for(e.qid.path), ifmt)
                    if attrs is None:
                        cookie = e.offset
                        continue
                else:
                    attrs = self._entry(self.inodes.number_for(r.attr.qid.path), r.attr)
                if not pyfuse3.readdir_reply(token, os.fsencode(e.name), attrs, e.offset):
                    full = True
                    if r.node is not None:
                        dh.ready[e.offset] = r
                    continue
                cookie = e.offset
                if r.node is not None and r.attr is not None:
                    # The kernel now holds a lookup on this entry (readdirplus).
                    ent, drop = self.inodes.register(r.node, r.attr.qid, dh.inode.ino, e.name)
                    ent.last_attr = r.attr
                    self._asked.discard(ent.ino)
                    dh.full_sent += 1
                    release += drop
            await self._release_nodes(release)
            self._maybe_shed()
            if full:
                return

    @_handler
    async def releasedir(self, fh: int) -> None:
        dh = self.dirs.pop(fh, None)
        if dh is None:
            return
        await self._close_quietly(dh.f)
        await self._drop_ready(dh)
        await self._release_nodes(self.inodes.close_one(dh.inode))

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        dh = self.dirs.get(fh)
        if dh is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self.backend.fsync(dh.f, bool(datasync))

    # ----------------------------------------------------------------- misc

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = await self._on(self.root, self.backend.statfs)
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.bsize
        out.f_blocks = s.blocks
        out.f_bfree = s.bfree
        out.f_bavail = s.bavail
        out.f_files = s.files
        out.f_ffree = s.ffree
        out.f_favail = s.ffree
        out.f_namemax = s.namelen
        return out

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        ent = self.inodes.get(inode)
        s = os.fsdecode(name)
        self._gate(self._cred(ctx)).xattr(s, False)
        return bytes(await self._on(ent, lambda n: self.backend.xattr_get(n, s)))

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (with getxattr) before calling us.
        ent = self.inodes.get(inode)
        s, v = os.fsdecode(name), bytes(value)
        self._gate(self._cred(ctx)).xattr(s, True)
        await self._on(ent, lambda n: self.backend.xattr_set(n, s, v, 0))

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        ent = self.inodes.get(inode)
        names = self._gate(self._cred(ctx)).xattr_names(await self._on(ent, self.backend.xattr_list))
        return [os.fsencode(n) for n in names]

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ent = self.inodes.get(inode)
        s = os.fsdecode(name)
        self._gate(self._cred(ctx)).xattr(s, True)
        await self._on(ent, lambda n: self.backend.xattr_remove(n, s))


def mount_options(
    fsname: str, *, readonly: bool = False, extra: Sequence[str] = (), debug: bool = False
) -> set[str]:
    """The option set given to pyfuse3.init: default_permissions (the kernel checks modes, as a 9P
    client does), fsname/subtype for df and mount(8), plus what the user passed with -o."""
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={fsname.replace(',', '_')}")
    opts.add("subtype=ninep")
    if readonly:
        opts.add("ro")
    for o in extra:
        if o:
            opts.add(o)
    if debug:
        opts.add("debug")
    return opts


async def serve(ops: FuseOperations, mountpoint: str, options: set[str]) -> None:
    """Mount and serve until unmounted (fusermount3 -u) or cancelled; always unmounts."""
    pyfuse3.init(ops, mountpoint, options)
    unmounted_cleanly = False
    try:
        await pyfuse3.main()
        unmounted_cleanly = True
    finally:
        with trio.CancelScope(shield=True):
            pyfuse3.close(unmount=not unmounted_cleanly)
            await ops.forget_all()
