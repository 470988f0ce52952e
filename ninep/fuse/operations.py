"""The FUSE frontend's request handlers: pyfuse3 `Operations` (on trio) over any Backend.

The kernel speaks in inode numbers and file handles; a Backend speaks in `Node` and `OpenFile`
handles. The inode numbers are translated by the inode table (`ninep.fuse.inodes`, driven through
`ninep.fuse.nodes`); the file handles here: `FileHandle` for files, `DirHandle` for directories
(listed by `ninep.fuse.readdir`). Credentials of each request (ctx.uid/ctx.gid) are passed to the
backend as `Cred`, and the export's operation policy is checked with the same `Gate` the 9P
session uses. Errors are mapped by `ninep.fuse.errors.handler`.

This module must never make blocking syscalls on the trio loop (the backend runs its own in worker
threads) and never touches paths of the host: everything goes through the Backend.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3

from fs_backends.base import Attr, Backend, Cred, Node, OpenFile
from ninep.fuse.attrs import Timeouts, entry_attributes, setattr_request, statvfs
from ninep.fuse.errors import fsname, handler
from ninep.fuse.inodes import Inode, InodeTable
from ninep.fuse.nodes import Nodes
from ninep.fuse.readdir import DirHandle, drop_ready, fill
from ninep.protocol import numbers as P
from ninep.protocol.openflags import host_to_dotl
from ninep.server.policy import DEFAULT_POLICY, Gate, OperationPolicy

log = logging.getLogger("ninep.fuse")

R = TypeVar("R")

#: How a handler that makes a name asks the backend to: (directory Node, name, credentials).
Make = Callable[[Node, str, Cred], Awaitable[object]]


@dataclass(slots=True)
class FileHandle:
    """An open file: the backend's open file and the inode it is open on."""

    inode: Inode
    f: OpenFile
    #: A Node to release after closing `f` (create() of a file that already had an inode).
    spare: Node | None = None


H = TypeVar("H", FileHandle, DirHandle)


def _handle(table: dict[int, H], fh: int) -> H:
    """The handle `fh` names; EBADF when the kernel names one that is not open."""
    try:
        return table[fh]
    except KeyError:
        raise pyfuse3.FUSEError(errno.EBADF) from None


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
        self.backend = backend
        # Whether backend Nodes can stop naming their file (9P servers whose fids are paths,
        # like diod): then ENOENT/ESTALE on a Node makes us walk to the file again. Local and
        # memory Nodes hold the file itself.
        stale_nodes = backend.info.name not in ("local", "memory")
        self.nodes = Nodes(backend, root, max_inodes=max_inodes, stale_nodes=stale_nodes)
        self.timeouts = Timeouts(attr=attr_timeout, entry=entry_timeout)
        self.debug = debug
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    @property
    def inodes(self) -> InodeTable:
        return self.nodes.table

    # ----------------------------------------------------------------- helpers

    def shed(self, force: bool = False) -> int:
        """Ask the kernel to forget the oldest unused inodes (see `Nodes.shed`)."""
        return self.nodes.shed(force)

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

    def _entry(self, ino: int, a: Attr) -> pyfuse3.EntryAttributes:
        return entry_attributes(ino, a, self.timeouts)

    def _seen(self, ent: Inode, a: Attr) -> pyfuse3.EntryAttributes:
        ent.last_attr = a
        return self._entry(ent.ino, a)

    async def _lookup(self, parent: Inode, name: str) -> pyfuse3.EntryAttributes:
        ent, attr = await self.nodes.lookup(parent, name)
        return self._seen(ent, attr)

    async def _lookup_again(self, ent: Inode) -> pyfuse3.EntryAttributes:
        """One more kernel lookup of an inode it knows already ('.', a new hard link)."""
        attr = await self.nodes.getattr(ent)
        ent.nlookup += 1
        return self._entry(ent.ino, attr)

    async def _make(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
        make: Make,
        check: Callable[[Gate, str], None] | None = None,
    ) -> pyfuse3.EntryAttributes:
        """The shape of every handler that makes a name (mknod, mkdir, symlink): check it
        (`check`, against the export's policy), have the backend make it, look it up."""
        parent = self.inodes.get(parent_inode)
        s, cred = fsname(name), self._cred(ctx)
        if check is not None:
            check(self._gate(cred), s)
        await self.nodes.on(parent, lambda d: make(d, s, cred), names=True)
        return await self._lookup(parent, s)

    async def _unlink(self, parent_inode: int, name: bytes, flags: int) -> None:
        parent = self.inodes.get(parent_inode)
        s = fsname(name)
        await self.nodes.on(parent, lambda d: self.backend.unlinkat(d, s, flags), names=True)

    async def _open(self, ent: Inode, lflags: int, cred: Cred) -> tuple[int, OpenFile]:
        """Open the file `ent` is: a new file handle number and the backend's open file."""
        f = await self.nodes.on(ent, lambda n: self.backend.open(n, lflags, cred))
        ent.nopen += 1
        return self._fh(), f

    async def _close(self, h: FileHandle | DirHandle) -> None:
        """Close the backend's open file of `h` and let go of the Nodes it holds besides its
        inode's (a spare Node of create, entries read ahead for a listing)."""
        await self.nodes.close_quietly(h.f)
        if isinstance(h, DirHandle):
            await drop_ready(self.nodes, h)
        else:
            await self.nodes.release([h.spare])

    async def _release(self, table: dict[int, H], fh: int) -> None:
        """The kernel closed handle `fh` of `table`."""
        h = table.pop(fh, None)
        if h is None:
            return
        await self._close(h)
        await self.nodes.release(self.inodes.close_one(h.inode))

    async def forget_all(self) -> None:
        """Release every handle (after unmount: the kernel will not send the last forgets)."""
        handles: list[FileHandle | DirHandle] = [*self.files.values(), *self.dirs.values()]
        for h in handles:
            await self._close(h)
        self.files.clear()
        self.dirs.clear()
        await self.nodes.release(self.inodes.drain())

    # ----------------------------------------------------------------- names

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        if name == b".":
            return await self._lookup_again(parent)
        s = ".." if name == b".." else fsname(name)
        return await self._lookup(parent, s)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        drops: list[Node] = []
        for ino, n in inode_list:
            gone = self.inodes.forget(ino, n)
            if gone:
                self.nodes.asked.discard(ino)
                drops += gone
        if self.debug:
            log.debug("forget(%d inodes) -> table %d", len(inode_list), len(self.inodes))
        await self.nodes.release(drops)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        try:
            attr = await self.nodes.getattr(ent)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE) or not ent.nopen or not ent.last_attr:
                raise
            ent.last_attr.nlink = 0  # open but unreachable: it was unlinked
            return self._entry(ent.ino, ent.last_attr)
        return self._seen(ent, attr)

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        sa = setattr_request(attr, fields)
        cred = self._cred(ctx)
        if fields.update_mode:
            name = ent.names[0][1] if ent.names else str(inode)
            self._gate(cred).mode(name, sa.mode, stat.S_ISDIR(attr.st_mode))

        async def op(n: Node) -> Attr:
            if sa.valid:
                await self.backend.setattr(n, sa, cred)
            return await self.backend.getattr(n, P.GETATTR_ALL)

        return self._seen(ent, await self.nodes.on(ent, op))

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        ent = self.inodes.get(inode)
        return os.fsencode(await self.nodes.on(ent, self.backend.readlink))

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(
            parent_inode,
            name,
            ctx,
            lambda d, s, cred: self.backend.mknod(d, s, mode, os.major(rdev), os.minor(rdev), cred),
            lambda gate, s: gate.mknod(s, mode),
        )

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(
            parent_inode,
            name,
            ctx,
            lambda d, s, cred: self.backend.mkdir(d, s, mode & 0o7777, cred),
        )

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        t = os.fsdecode(target)
        return await self._make(
            parent_inode, name, ctx, lambda d, s, cred: self.backend.symlink(d, s, t, cred)
        )

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ent = self.inodes.get(inode)
        parent = self.inodes.get(new_parent_inode)
        s = fsname(new_name)
        on = self.nodes.on
        await on(parent, lambda d: on(ent, lambda n: self.backend.link(d, s, n)), names=True)
        await self.nodes.refresh_name(ent, parent, s)
        return await self._lookup_again(ent)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._unlink(parent_inode, name, 0)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._unlink(parent_inode, name, P.AT_REMOVEDIR)

    @handler
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
        so, sn = fsname(name_old), fsname(name_new)
        on = self.nodes.on
        await on(
            old,
            lambda od: on(new, lambda nd: self.backend.renameat(od, so, nd, sn), names=True),
            names=True,
        )
        moved = await self.nodes.refresh_name(None, new, sn)
        if moved is not None:
            moved.drop_name(old.ino, so)

    # ----------------------------------------------------------------- files

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        ent = self.inodes.get(inode)
        fh, f = await self._open(ent, host_to_dotl(flags), self._cred(ctx))
        self.files[fh] = FileHandle(ent, f)
        # Page cache on (mmap needs it), dropped at each open for close-to-open consistency.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    @handler
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.inodes.get(parent_inode)
        s, cred = fsname(name), self._cred(ctx)
        self._gate(cred).mode(s, mode, False)
        lflags = host_to_dotl(flags, create=True) | P.L_O_CREAT
        node, f = await self.nodes.on(
            parent, lambda d: self.backend.create(d, s, lflags, mode & 0o7777, cred), names=True
        )
        attr = await self.nodes.fresh_attr(node, f)
        ent, drop = self.inodes.register(node, attr.qid, parent.ino, s)
        # `node` backs the OpenFile: if the table hands it back, keep it until the file closes.
        spare = node if node in drop else None
        await self.nodes.release([n for n in drop if n is not node])
        fh = self._fh()
        ent.nopen += 1
        self.files[fh] = FileHandle(ent, f, spare)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._seen(ent, attr)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = await self.backend.read(_handle(self.files, fh).f, off, size)
        return bytes(data)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = _handle(self.files, fh)
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

    @handler
    async def flush(self, fh: int) -> None:
        _handle(self.files, fh)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.backend.fsync(_handle(self.files, fh).f, bool(datasync))

    @handler
    async def release(self, fh: int) -> None:
        await self._release(self.files, fh)

    # ----------------------------------------------------------------- directories

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ent = self.inodes.get(inode)
        fh, f = await self._open(ent, P.L_O_RDONLY | P.L_O_DIRECTORY, self._cred(ctx))
        self.dirs[fh] = DirHandle(ent, f)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await fill(self.nodes, _handle(self.dirs, fh), start_id, token, self.timeouts)

    @handler
    async def releasedir(self, fh: int) -> None:
        await self._release(self.dirs, fh)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.backend.fsync(_handle(self.dirs, fh).f, bool(datasync))

    # ----------------------------------------------------------------- misc

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statvfs(await self.nodes.on(self.nodes.root, self.backend.statfs))

    async def _xattr(
        self,
        inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
        write: bool,
        op: Callable[[Node, str], Awaitable[R]],
    ) -> R:
        """An xattr request on `name`: checked against the export's policy, then `op`."""
        ent = self.inodes.get(inode)
        s = os.fsdecode(name)
        self._gate(self._cred(ctx)).xattr(s, write)
        return await self.nodes.on(ent, lambda n: op(n, s))

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return bytes(await self._xattr(inode, name, ctx, False, self.backend.xattr_get))

    @handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (with getxattr) before calling us.
        v = bytes(value)
        await self._xattr(inode, name, ctx, True, lambda n, s: self.backend.xattr_set(n, s, v, 0))

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        ent = self.inodes.get(inode)
        listed = await self.nodes.on(ent, self.backend.xattr_list)
        return [os.fsencode(n) for n in self._gate(self._cred(ctx)).xattr_names(listed)]

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._xattr(inode, name, ctx, True, self.backend.xattr_remove)
