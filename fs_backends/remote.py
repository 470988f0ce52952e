"""A Backend that forwards to a 9P2000.L server through `ninep.client` (FUSE-over-9P, proxying).

One fid per Node (never opened, so it can still be walked from), one more fid per OpenFile (a
clone of the node's fid, then Tlopen). Requests from concurrent callers are pipelined on the one
connection by the client; large reads and writes are split at the negotiated msize and sent
concurrently (sequentially for O_APPEND files, whose chunks must land in order).

Credentials: 9P2000.L carries the user only in Tattach, so everything runs as the attaching user
(`uname`/`n_uname`); creations carry the caller's gid as the protocol allows.

This module must never touch the host filesystem: everything goes over the 9P connection.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import trio

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
from ninep.client import Client, ClientError
from ninep.protocol import messages as m
from ninep.protocol import numbers as P
from ninep.protocol.codec import unpack_dirents
from transports.options import ClientTLS, ConnectOptions


async def _gather(fns: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run the calls concurrently; the first failure is raised as itself (not in a group)."""
    errors: list[BaseException] = []

    async def run(fn: Callable[[], Awaitable[None]], cancel: trio.CancelScope) -> None:
        try:
            await fn()
        except Exception as e:
            errors.append(e)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(run, fn, nursery.cancel_scope)
    if errors:
        raise errors[0]


@dataclass(eq=False, slots=True)
class RemoteNode:
    fid: int
    qid: Qid
    live: bool = True
    #: Names from the attach point as last known and a private fid on that attach point: only
    #: for renames that do not say where to (9P2000 wstat), which need the parent directory.
    path: tuple[str, ...] = ()
    root_fid: int = -1


def _join(path: tuple[str, ...], names: Sequence[str]) -> tuple[str, ...]:
    out = list(path)
    for n in names:
        if n == "..":
            if out:
                out.pop()
        elif n != ".":
            out.append(n)
    return tuple(out)


@dataclass(eq=False, slots=True)
class RemoteOpenFile:
    node: RemoteNode
    ofid: int
    iounit: int
    append: bool
    fd: int | None = None


class RemoteBackend:
    """Exports what a 9P2000.L server exports (see the module docstring)."""

    def __init__(self, client: Client, *, uname: str = "root", n_uname: int | None = None) -> None:
        self.client = client
        self.uname = uname
        self.n_uname = os.geteuid() if n_uname is None else n_uname
        self.info = BackendInfo(
            name="remote",
            extra={"peer": getattr(client.channel, "peer", "?"), "msize": str(client.msize)},
        )
        self._closed = False
        self._no_unlinkat = False
        self._no_renameat = False
        self._root_fids: list[int] = []

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str,
        *,
        msize: int = 1024 * 1024,
        uname: str = "root",
        n_uname: int | None = None,
        tls: ClientTLS | None = None,
    ) -> AsyncIterator[RemoteBackend]:
        """Connect to `address` (tcp:H:P, unix:PATH, ...; `tls` for TLS on tcp) and negotiate
        9P2000.L."""
        async with Client.connect(
            address, dialect=P.V9P2000_L, msize=msize, options=ConnectOptions(max_msize=msize, tls=tls)
        ) as client:
            if client.dialect != P.V9P2000_L:
                raise FsError(
                    errno.EPROTONOSUPPORT, f"server speaks {client.dialect}, not 9P2000.L"
                )
            yield cls(client, uname=uname, n_uname=n_uname)

    @property
    def connected(self) -> bool:
        """False once the connection to the server is gone (every call then fails)."""
        return self.client._closed is None and not self._closed

    # --- helpers ---------------------------------------------------------------------------------

    def _chunk(self, f: RemoteOpenFile) -> int:
        # msize - IOHDRSZ, the rule Linux and diod apply to both Tread and Twrite counts.
        limit = self.client.msize - P.IOHDRSZ
        return min(limit, f.iounit) if f.iounit else limit

    async def _clunk(self, fid: int) -> None:
        # The fid is gone either way (or the connection is).
        with suppress(OSError, trio.BrokenResourceError):
            await self.client.clunk(fid)

    async def _clone(self, node: RemoteNode) -> int:
        fid = self.client.new_fid()
        try:
            await self.client.call(m.Twalk(node.fid, fid, []), m.Rwalk)
        except BaseException:
            self.client._free_fids.append(fid)
            raise
        return fid

    # --- tree --------------------------------------------------------------------------------------

    async def attach(self, aname: str, cred: Cred) -> RemoteNode:
        fid = self.client.new_fid()
        uname = cred.uname or self.uname
        try:
            r = await self.client.call(
                m.Tattach(fid, P.NOFID, uname, aname, self.n_uname), m.Rattach
            )
        except BaseException:
            self.client._free_fids.append(fid)
            raise
        root = RemoteNode(fid, r.qid)
        root.root_fid = await self._clone(root)
        self._root_fids.append(root.root_fid)
        return root

    async def walk(self, node: RemoteNode, names: Sequence[str]) -> list[RemoteNode]:
        if not names:
            fid = await self._clone(node)
            return [RemoteNode(fid, node.qid, path=node.path, root_fid=node.root_fid)]
        # One fid per component reached (the contract), each walked from `node` in parallel.
        results: list[RemoteNode | BaseException | None] = [None] * min(len(names), P.MAXWELEM)

        async def prefix(i: int) -> None:
            fid = self.client.new_fid()
            try:
                r = await self.client.call(m.Twalk(node.fid, fid, list(names[: i + 1])), m.Rwalk)
            except (OSError, trio.BrokenResourceError) as e:
                self.client._free_fids.append(fid)
                results[i] = e
                return
            if len(r.wqid) < i + 1:
                # A partial walk creates no fid on the server.
                self.client._free_fids.append(fid)
                results[i] = FsError(errno.ENOENT)
                return
            results[i] = RemoteNode(
                fid, r.wqid[-1], path=_join(node.path, names[: i + 1]), root_fid=node.root_fid
            )

        if len(names) == 1:
            await prefix(0)
        else:
            n = min(len(names), P.MAXWELEM)
            await _gather([functools.partial(prefix, i) for i in range(n)])
        out: list[RemoteNode] = []
        for res in results:
            if isinstance(res, RemoteNode):
                out.append(res)
            else:
                break
        if len(out) == P.MAXWELEM < len(names):
            # Twalk carries at most 16 names: go on from the 16th node.
            with suppress(OSError):
                out += await self.walk(out[-1], names[P.MAXWELEM :])
        # Release anything reached past the first failure (cannot happen on a sane server).
        for res in results[len(out) :]:
            if isinstance(res, RemoteNode):
                await self._clunk(res.fid)
        if not out:
            first = results[0]
            if isinstance(first, OSError):
                raise first
            raise FsError(errno.ENOENT)
        return out

    async def release(self, node: RemoteNode) -> None:
        if node.live:
            node.live = False
            await self._clunk(node.fid)

    async def getattr(self, node: RemoteNode, mask: int) -> Attr:
        r = await self.client.getattr(node.fid, mask)
        node.qid = r.qid
        return Attr(
            valid=r.valid,
            qid=r.qid,
            mode=r.mode,
            uid=r.uid,
            gid=r.gid,
            nlink=r.nlink,
            rdev=r.rdev,
            size=r.size,
            blksize=r.blksize,
            blocks=r.blocks,
            atime_sec=r.atime_sec,
            atime_nsec=r.atime_nsec,
            mtime_sec=r.mtime_sec,
            mtime_nsec=r.mtime_nsec,
            ctime_sec=r.ctime_sec,
            ctime_nsec=r.ctime_nsec,
            btime_sec=r.btime_sec,
            btime_nsec=r.btime_nsec,
            gen=r.gen,
            data_version=r.data_version,
        )

    async def setattr(self, node: RemoteNode, attr: SetAttr, cred: Cred) -> None:
        await self.client.setattr(
            node.fid,
            attr.valid,
            mode=attr.mode,
            uid=attr.uid,
            gid=attr.gid,
            size=attr.size,
            atime=(attr.atime_sec, attr.atime_nsec),
            mtime=(attr.mtime_sec, attr.mtime_nsec),
        )

    # --- open files --------------------------------------------------------------------------------

    async def open(self, node: RemoteNode, flags: int, cred: Cred) -> RemoteOpenFile:
        fid = await self._clone(node)
        try:
            qid, iounit = await self.client.lopen(fid, flags)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._clunk(fid)
            raise
        return RemoteOpenFile(node, fid, iounit, bool(flags & P.L_O_APPEND))

    async def create(
        self, dir: RemoteNode, name: str, flags: int, mode: int, cred: Cred
    ) -> tuple[RemoteNode, RemoteOpenFile]:
        ofid = await self._clone(dir)
        try:
            qid, iounit = await self.client.lcreate(
                ofid, name, flags & ~P.L_O_CREAT, mode, cred.gid
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._clunk(ofid)
            raise
        # The created fid is opened (it cannot be walked from): the Node is a fresh walk.
        try:
            node = (await self.walk(dir, [name]))[0]
            await self._own(dir, name, node, cred)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._clunk(ofid)
            raise
        return node, RemoteOpenFile(node, ofid, iounit, bool(flags & P.L_O_APPEND))

    async def close(self, f: RemoteOpenFile) -> None:
        await self._clunk(f.ofid)

    async def read(self, f: RemoteOpenFile, offset: int, count: int) -> bytes:
        chunk = self._chunk(f)
        if count <= chunk:
            r = await self.client.call(m.Tread(f.ofid, offset, count), m.Rread)
            data = bytes(r.data)
            if 0 < len(data) < count:  # a server may answer short before EOF: keep going
                return data + await self.read(f, offset + len(data), count - len(data))
            return data
        parts: list[bytes] = [b""] * ((count + chunk - 1) // chunk)

        async def one(i: int) -> None:
            n = min(chunk, count - i * chunk)
            r = await self.client.call(m.Tread(f.ofid, offset + i * chunk, n), m.Rread)
            parts[i] = bytes(r.data)

        await _gather([functools.partial(one, i) for i in range(len(parts))])
        out = bytearray()
        for i, p in enumerate(parts):
            out += p
            if len(p) < min(chunk, count - i * chunk):
                if p:  # short but not empty: there may be more after it
                    rest = count - len(out)
                    if rest > 0:
                        out += await self.read(f, offset + len(out), rest)
                break
        return bytes(out)

    async def write(self, f: RemoteOpenFile, offset: int, data: bytes | memoryview) -> int:
        view = memoryview(data)
        chunk = self._chunk(f)
        if len(view) <= chunk or f.append:
            done = 0
            while done < len(view):
                n = await self.client.write(f.ofid, offset + done, view[done : done + chunk])
                if n <= 0:
                    break
                done += n
            return done
        counts: list[int] = [0] * ((len(view) + chunk - 1) // chunk)

        async def one(i: int) -> None:
            part = view[i * chunk : (i + 1) * chunk]
            counts[i] = await self.client.write(f.ofid, offset + i * chunk, part)

        await _gather([functools.partial(one, i) for i in range(len(counts))])
        done = 0
        for i, n in enumerate(counts):
            done += n
            if n < len(view[i * chunk : (i + 1) * chunk]):
                break
        return done

    async def readdir(self, f: RemoteOpenFile, offset: int, max_entries: int) -> list[DirEntry]:
        # ~32 bytes per entry plus its name; ask for about what max_entries needs.
        want = min(self.client.msize - P.IOHDRSZ, max(4096, max_entries * 64))
        r = await self.client.call(m.Treaddir(f.ofid, offset, want), m.Rreaddir)
        entries = unpack_dirents(r.data)
        return [DirEntry(q, off, t, name) for q, off, t, name in entries[:max_entries]]

    async def fsync(self, f: RemoteOpenFile, datasync: bool) -> None:
        await self.client.fsync(f.ofid, datasync)

    # --- names -------------------------------------------------------------------------------------

    async def mkdir(self, dir: RemoteNode, name: str, mode: int, cred: Cred) -> Qid:
        qid = await self.client.mkdir(dir.fid, name, mode, cred.gid)
        await self._own(dir, name, None, cred)
        return qid

    async def symlink(self, dir: RemoteNode, name: str, target: str, cred: Cred) -> Qid:
        qid = await self.client.symlink(dir.fid, name, target, cred.gid)
        await self._own(dir, name, None, cred)
        return qid

    async def mknod(
        self, dir: RemoteNode, name: str, mode: int, major: int, minor: int, cred: Cred
    ) -> Qid:
        qid = await self.client.mknod(dir.fid, name, mode, major, minor, cred.gid)
        await self._own(dir, name, None, cred)
        return qid

    async def _own(self, dir: RemoteNode, name: str, node: RemoteNode | None, cred: Cred) -> None:
        """Give a new file to the user who made it when that is not the attaching user: 9P2000.L
        creates as the attach uid. Best effort (a server that may not chown keeps its owner)."""
        if cred.uid == self.n_uname:
            return
        own = node
        try:
            if own is None:
                own = (await self.walk(dir, [name]))[0]
            await self.client.setattr(
                own.fid, P.SETATTR_UID | P.SETATTR_GID, uid=cred.uid, gid=cred.gid
            )
        except OSError:
            pass
        finally:
            if node is None and own is not None:
                await self.release(own)

    async def link(self, dir: RemoteNode, name: str, target: RemoteNode) -> None:
        await self.client.link(dir.fid, target.fid, name)

    async def readlink(self, node: RemoteNode) -> str:
        return await self.client.readlink(node.fid)

    async def rename(self, node: RemoteNode, newdir: RemoteNode | None, newname: str) -> None:
        if newdir is None:
            # Trename needs the directory: walk to it again from the attach point.
            if not node.path or node.root_fid < 0:
                raise FsError(errno.EBUSY)  # the attach point itself
            parent = self.client.new_fid()
            try:
                await self.client.walk(node.root_fid, list(node.path[:-1]), parent)
            except BaseException:
                self.client._free_fids.append(parent)
                raise
            try:
                await self.client.rename(node.fid, parent, newname)
            finally:
                await self._clunk(parent)
            node.path = (*node.path[:-1], newname)
            return
        await self.client.rename(node.fid, newdir.fid, newname)
        node.path = (*newdir.path, newname)

    async def renameat(
        self, olddir: RemoteNode, oldname: str, newdir: RemoteNode, newname: str
    ) -> None:
        if not self._no_renameat:
            try:
                await self.client.renameat(olddir.fid, oldname, newdir.fid, newname)
                return
            except ClientError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._no_renameat = True  # diod: fall back to walk + Trename, as Linux does
        node = (await self.walk(olddir, [oldname]))[0]
        try:
            await self.client.rename(node.fid, newdir.fid, newname)
        finally:
            await self.release(node)

    async def unlinkat(self, dir: RemoteNode, name: str, flags: int) -> None:
        if not self._no_unlinkat:
            try:
                await self.client.unlinkat(dir.fid, name, flags)
                return
            except ClientError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._no_unlinkat = True  # diod: fall back to walk + Tremove, as Linux does
        node = (await self.walk(dir, [name]))[0]
        is_dir = bool(node.qid.type & P.QTDIR)
        if bool(flags & P.AT_REMOVEDIR) != is_dir:
            await self.release(node)
            raise FsError(errno.ENOTDIR if flags & P.AT_REMOVEDIR else errno.EISDIR)
        await self.remove(node)

    async def remove(self, node: RemoteNode) -> None:
        # Tremove clunks the fid whatever the outcome: the later release has nothing to do.
        node.live = False
        await self.client.remove(node.fid)

    async def statfs(self, node: RemoteNode) -> StatFs:
        r = await self.client.statfs(node.fid)
        return StatFs(
            type=r.type,
            bsize=r.bsize,
            blocks=r.blocks,
            bfree=r.bfree,
            bavail=r.bavail,
            files=r.files,
            ffree=r.ffree,
            fsid=r.fsid,
            namelen=r.namelen,
        )

    # --- xattrs ------------------------------------------------------------------------------------

    async def xattr_get(self, node: RemoteNode, name: str) -> bytes:
        return await self.client.xattr_get(node.fid, name)

    async def xattr_list(self, node: RemoteNode) -> list[str]:
        raw = await self.client.xattr_get(node.fid, "")
        return [os.fsdecode(n) for n in raw.split(b"\0") if n]

    async def xattr_set(self, node: RemoteNode, name: str, value: bytes, flags: int) -> None:
        await self.client.xattr_set(node.fid, name, value, flags)

    async def xattr_remove(self, node: RemoteNode, name: str) -> None:
        # 9P has no removal message: Txattrcreate of size 0 with XATTR_REPLACE removes (what
        # Linux v9fs sends for removexattr).
        await self.client.xattr_set(node.fid, name, b"", P.XATTR_REPLACE)

    # --- locks -------------------------------------------------------------------------------------

    async def lock(self, f: RemoteOpenFile, lock: Lock, owner: LockOwner) -> int:
        return await self.client.lock(
            f.ofid,
            lock.type,
            lock.start,
            lock.length,
            flags=lock.flags & ~P.LOCK_FLAGS_BLOCK,
            proc_id=owner.proc_id,
            client_id=owner.client_id or lock.client_id,
        )

    async def getlock(self, f: RemoteOpenFile, lock: Lock, owner: LockOwner) -> Lock:
        r = await self.client.getlock(
            f.ofid,
            lock.type,
            lock.start,
            lock.length,
            proc_id=owner.proc_id,
            client_id=owner.client_id or lock.client_id,
        )
        return Lock(r.type, r.start, r.length, r.proc_id, r.client_id)

    async def release_locks(self, f: RemoteOpenFile, owner: LockOwner | None) -> None:
        # The server drops a fid's locks when it is clunked; an explicit unlock covers the
        # owner case while the fid stays open.
        if owner is None:
            return
        with suppress(ClientError, trio.BrokenResourceError):
            await self.client.lock(
                f.ofid,
                P.LOCK_TYPE_UNLCK,
                0,
                0,
                proc_id=owner.proc_id,
                client_id=owner.client_id,
            )

    async def aclose(self) -> None:
        # The connection belongs to the `connect` block, which closes it on exit; fids die
        # with it on the server.
        self._closed = True
