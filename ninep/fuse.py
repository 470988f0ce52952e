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
  the backend's cookies).

Errors: an `OSError` from the backend becomes `FUSEError(errno)`; anything else is logged and
answered EIO. Credentials of each request (ctx.uid/ctx.gid) are passed to the backend as `Cred`.

This module must never make blocking syscalls on the trio loop (the backend runs its own in worker
threads) and never touches paths of the host: everything goes through the Backend.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from fs_backends.base import Attr, Backend, Cred, DirEntry, Node, OpenFile, Qid, SetAttr
from ninep import protocol as P

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

# Host O_* bit -> 9P2000.L (Linux x86) bit. Flags the backend must not see (O_DIRECT: reads land
# in unaligned Python buffers; O_NOFOLLOW/O_CLOEXEC/O_CREAT/...: meaningless here) are dropped.
_OPEN_FLAGS = (
    (os.O_APPEND, P.L_O_APPEND),
    (os.O_NONBLOCK, P.L_O_NONBLOCK),
    (os.O_DSYNC, P.L_O_DSYNC),
    (getattr(os, "O_SYNC", 0), P.L_O_SYNC),
    (getattr(os, "O_NOATIME", 0), P.L_O_NOATIME),
    (os.O_DIRECTORY, P.L_O_DIRECTORY),
    (os.O_TRUNC, P.L_O_TRUNC),
    (os.O_EXCL, P.L_O_EXCL),
    (os.O_CREAT, P.L_O_CREAT),
)


def open_flags_to_dotl(flags: int, *, create: bool = False) -> int:
    """Translate host open(2) flags to the Linux values the Backend takes (L_O_*)."""
    acc = flags & os.O_ACCMODE
    out = {os.O_RDONLY: P.L_O_RDONLY, os.O_WRONLY: P.L_O_WRONLY, os.O_RDWR: P.L_O_RDWR}.get(
        acc, P.L_O_RDWR
    )
    for host, dotl in _OPEN_FLAGS:
        if host and flags & host:
            if not create and host in (os.O_CREAT, os.O_EXCL):
                continue
            out |= dotl
    return out


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


class InodeTable:
    """inode number ↔ backend Node, with lookup and open counts (see module docstring)."""

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

    def register(self, node: Node, qid: Qid) -> tuple[_Inode, Node | None]:
        """Count one more kernel reference to the file `node` is a handle on.

        Returns the table entry and the Node the caller must release (the new one when the
        file already had an entry, the replaced one when a stale entry was superseded)."""
        ent = self.existing(qid)
        if ent is not None:
            ent.nlookup += 1
            return ent, (node if node is not ent.node else None)
        old_ino = self.by_path.get(qid.path)
        if old_ino is not None:
            # Same qid.path, different type: the old file is gone. Take the number over so the
            # kernel sees the new type (it drops its old inode on the type change).
            stale = self.by_ino[old_ino]
            released = stale.node
            stale.node, stale.qid_type, stale.nlookup = node, qid.type, stale.nlookup + 1
            return stale, released
        ino = self.number_for(qid.path)
        ent = _Inode(ino, node, qid.path, qid.type, nlookup=1)
        self.by_ino[ino] = ent
        self.by_path[qid.path] = ino
        return ent, None

    def forget(self, ino: int, n: int) -> Node | None:
        """Drop `n` lookups; returns the Node to release if the entry went away."""
        ent = self.by_ino.get(ino)
        if ent is None:
            return None
        ent.nlookup = max(0, ent.nlookup - n)
        return self._maybe_drop(ent)

    def close_one(self, ent: _Inode) -> Node | None:
        ent.nopen = max(0, ent.nopen - 1)
        return self._maybe_drop(ent)

    def _maybe_drop(self, ent: _Inode) -> Node | None:
        if ent.nlookup > 0 or ent.nopen > 0 or ent.ino == ROOT_INODE:
            return None
        if self.by_ino.get(ent.ino) is ent:
            del self.by_ino[ent.ino]
            if self.by_path.get(ent.qid_path) == ent.ino:
                del self.by_path[ent.qid_path]
        return ent.node

    def drain(self) -> list[Node]:
        nodes = [e.node for e in self.by_ino.values()]
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
    node: Node | None  # None: '.'/'..' or the resolution failed (entry skipped)
    attr: Attr | None


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


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _handler(fn: F) -> F:
    """Map backend errors to FUSEError and log each call when debugging."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: FuseOperations, *args: Any) -> Any:
        try:
            result = await fn(self, *args)
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
    ) -> None:
        super().__init__()
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

    def stats(self) -> dict[str, int]:
        """Table sizes (logged on SIGUSR1 by the CLI, read by tests)."""
        return {"inodes": len(self.inodes), "files": len(self.files), "dirs": len(self.dirs)}

    def _cred(self, ctx: pyfuse3.RequestContext) -> Cred:
        return Cred(uid=ctx.uid, gid=ctx.gid)

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

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

    async def _register(self, node: Node, attr: Attr) -> pyfuse3.EntryAttributes:
        """One more kernel lookup of the file `node` (fresh from a walk) describes."""
        ent, drop = self.inodes.register(node, attr.qid)
        if drop is not None:
            await self._release_nodes([drop])
        return self._entry(ent.ino, attr)

    async def _walk_one(self, dir: Node, name: str) -> Node:
        nodes = await self.backend.walk(dir, [name])
        if not nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if len(nodes) > 1:  # a backend should never return more; do not leak them
            await self._release_nodes(nodes[1:])
        return nodes[0]

    async def _lookup_new(self, dir: Node, name: str) -> pyfuse3.EntryAttributes:
        node = await self._walk_one(dir, name)
        try:
            attr = await self.backend.getattr(node, P.GETATTR_ALL)
        except BaseException:
            await self._release_nodes([node])
            raise
        return await self._register(node, attr)

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
            attr = await self.backend.getattr(parent.node, P.GETATTR_ALL)
            parent.nlookup += 1
            return self._entry(parent.ino, attr)
        s = ".." if name == b".." else _fsname(name)
        return await self._lookup_new(parent.node, s)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        drops = [self.inodes.forget(ino, n) for ino, n in inode_list]
        if self.debug:
            log.debug("forget(%d inodes) -> table %d", len(inode_list), len(self.inodes))
        await self._release_nodes(drops)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        attr = await self.backend.getattr(ent.node, P.GETATTR_ALL)
        return self._entry(ent.ino, attr)

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
        if sa.valid:
            await self.backend.setattr(ent.node, sa, self._cred(ctx))
        new = await self.backend.getattr(ent.node, P.GETATTR_ALL)
        return self._entry(ent.ino, new)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        ent = self.inodes.get(inode)
        return os.fsencode(await self.backend.readlink(ent.node))

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        s = _fsname(name)
        await self.backend.mknod(
            parent.node, s, mode, os.major(rdev), os.minor(rdev), self._cred(ctx)
        )
        return await self._lookup_new(parent.node, s)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        s = _fsname(name)
        await self.backend.mkdir(parent.node, s, mode & 0o7777, self._cred(ctx))
        return await self._lookup_new(parent.node, s)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        s = _fsname(name)
        await self.backend.symlink(parent.node, s, os.fsdecode(target), self._cred(ctx))
        return await self._lookup_new(parent.node, s)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        parent = self.inodes.get(new_parent_inode)
        await self.backend.link(parent.node, _fsname(new_name), ent.node)
        attr = await self.backend.getattr(ent.node, P.GETATTR_ALL)
        ent.nlookup += 1
        return self._entry(ent.ino, attr)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        await self.backend.unlinkat(parent.node, _fsname(name), 0)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        await self.backend.unlinkat(parent.node, _fsname(name), P.AT_REMOVEDIR)

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
        await self.backend.renameat(old.node, _fsname(name_old), new.node, _fsname(name_new))

    # ----------------------------------------------------------------- files

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        ent = self.inodes.get(inode)
        f = await self.backend.open(ent.node, open_flags_to_dotl(flags), self._cred(ctx))
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
        node, f = await self.backend.create(
            parent.node,
            _fsname(name),
            open_flags_to_dotl(flags, create=True) | P.L_O_CREAT,
            mode & 0o7777,
            self._cred(ctx),
        )
        try:
            attr = await self.backend.getattr(node, P.GETATTR_ALL)
        except BaseException:
            await self._close_quietly(f)
            await self._release_nodes([node])
            raise
        ent, drop = self.inodes.register(node, attr.qid)
        spare = None
        if drop is node:
            spare = node  # the OpenFile was made from it: keep it until the file is closed
        elif drop is not None:
            await self._release_nodes([drop])
        fh = self._fh()
        ent.nopen += 1
        self.files[fh] = _FileHandle(ent, f, spare)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._entry(ent.ino, attr)

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
        f = self._file(fh).f
        view = memoryview(buf)
        done = 0
        while done < len(view):  # FUSE (without direct_io) needs every byte written
            n = await self.backend.write(f, off + done, view[done:])
            if n <= 0:
                raise pyfuse3.FUSEError(errno.EIO)
            done += n
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
        drop = self.inodes.close_one(h.inode)
        await self._release_nodes([drop, h.spare])

    # ----------------------------------------------------------------- directories

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ent = self.inodes.get(inode)
        f = await self.backend.open(ent.node, P.L_O_RDONLY | P.L_O_DIRECTORY, self._cred(ctx))
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
                    node = await self._walk_one(dh.inode.node, e.name)
                    attr = await self.backend.getattr(node, P.GETATTR_ALL)
                except OSError:
                    # Removed since the listing (or unreadable): list it without attributes.
                    if node is not None:
                        await self._release_nodes([node])
                    out[i] = _Resolved(e, None, None)
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
        while True:
            entries = await self._entries_after(dh, cookie)
            if not entries:
                return
            resolved = await self._resolve(dh, entries[:RESOLVE_CHUNK])
            release: list[Node | None] = []
            full = False
            for r in resolved:
                e = r.entry
                if full:
                    if r.node is not None:
                        dh.ready[e.offset] = r  # resolved already: the next call starts here
                    continue
                if e.name in (".", ".."):
                    attrs = self._dot_entry(dh, e)
                elif r.node is None or r.attr is None:
                    cookie = e.offset  # vanished since it was listed: skip it
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
                    _, drop = self.inodes.register(r.node, r.attr.qid)
                    release.append(drop)
            await self._release_nodes(release)
            if full:
                return

    @_handler
    async def releasedir(self, fh: int) -> None:
        dh = self.dirs.pop(fh, None)
        if dh is None:
            return
        await self._close_quietly(dh.f)
        await self._drop_ready(dh)
        drop = self.inodes.close_one(dh.inode)
        await self._release_nodes([drop])

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        dh = self.dirs.get(fh)
        if dh is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self.backend.fsync(dh.f, bool(datasync))

    # ----------------------------------------------------------------- misc

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = await self.backend.statfs(self.root.node)
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
        return bytes(await self.backend.xattr_get(ent.node, os.fsdecode(name)))

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (with getxattr) before calling us.
        ent = self.inodes.get(inode)
        await self.backend.xattr_set(ent.node, os.fsdecode(name), bytes(value), 0)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        ent = self.inodes.get(inode)
        return [os.fsencode(n) for n in await self.backend.xattr_list(ent.node)]

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ent = self.inodes.get(inode)
        await self.backend.xattr_remove(ent.node, os.fsdecode(name))


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
