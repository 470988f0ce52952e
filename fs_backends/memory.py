"""An in-memory file tree implementing the Backend protocol, for fast protocol tests.

Directories, regular files, symlinks, device/fifo/socket nodes (metadata only), hard links,
xattrs, POSIX byte-range locks with owners, and readdir cookies that stay valid when entries are
removed (every directory entry gets a monotonically increasing id; a cookie resumes after it).
Plays the role of QEMU's 9p-synth. It must never touch the host filesystem.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

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
from ninep.protocol import numbers as P

_DOT_COOKIE = 1
_DOTDOT_COOKIE = 2
_FIRST_ENTRY_ID = 3
#: Largest file the tree holds (EFBIG beyond): a client must not make the server allocate
#: whatever a Tsetattr size or a Twrite offset says (found by tests/fuzz).
MAX_FILE_SIZE = 1 << 30


def _now() -> tuple[int, int]:
    t = time.time_ns()
    return t // 1_000_000_000, t % 1_000_000_000


@dataclass(eq=False, slots=True)
class _Inode:
    ino: int
    mode: int  # full st_mode including S_IFMT
    uid: int
    gid: int
    rdev: int = 0
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    # Directories: name -> (entry id, inode); ids grow monotonically per backend.
    entries: dict[str, tuple[int, _Inode]] = field(default_factory=dict)
    parent: _Inode | None = None  # directories only: where '..' leads
    nlink: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    atime: tuple[int, int] = (0, 0)
    mtime: tuple[int, int] = (0, 0)
    ctime: tuple[int, int] = (0, 0)
    btime: tuple[int, int] = (0, 0)
    version: int = 0
    locks: LockTable = field(default_factory=LockTable)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def qid(self) -> Qid:
        fmt = stat.S_IFMT(self.mode)
        if fmt == stat.S_IFDIR:
            qt = P.QTDIR
        elif fmt == stat.S_IFLNK:
            qt = P.QTSYMLINK
        else:
            qt = P.QTFILE
        return Qid(qt, self.version & 0xFFFFFFFF, self.ino)

    def touch_m(self) -> None:
        self.mtime = self.ctime = _now()
        self.version += 1

    def touch_c(self) -> None:
        self.ctime = _now()


@dataclass(eq=False)
class MemNode:
    """A handle on one inode, remembering the directory entry it was reached by."""

    qid: Qid
    inode: _Inode
    parent: _Inode | None  # None for the root
    name: str
    released: bool = False


@dataclass(eq=False)
class MemOpenFile:
    node: MemNode
    flags: int
    fd: int | None = None
    lock_owners: set[Hashable] = field(default_factory=set)
    closed: bool = False


def _dtype(mode: int) -> int:
    return {
        stat.S_IFDIR: P.DT_DIR,
        stat.S_IFREG: P.DT_REG,
        stat.S_IFLNK: P.DT_LNK,
        stat.S_IFCHR: P.DT_CHR,
        stat.S_IFBLK: P.DT_BLK,
        stat.S_IFIFO: P.DT_FIFO,
        stat.S_IFSOCK: P.DT_SOCK,
    }.get(stat.S_IFMT(mode), P.DT_UNKNOWN)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FsError(errno.EINVAL)
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise FsError(errno.ENAMETOOLONG)


class MemoryBackend:
    """A synthetic tree held in memory. Not thread-safe; everything runs on the trio loop."""

    def __init__(self, *, readonly: bool = False, uid: int = 0, gid: int = 0,
                 max_file_size: int = MAX_FILE_SIZE) -> None:
        self.info = BackendInfo(name="memory", readonly=readonly)
        self.max_file_size = max_file_size
        self._ino = itertools.count(1)
        self._entry_id = itertools.count(_FIRST_ENTRY_ID)
        self._nodes: set[MemNode] = set()
        self.root = self._new_inode(stat.S_IFDIR | 0o755, uid, gid)
        self.root.parent = self.root
        self.root.nlink = 2
        self.open_files = 0

    # -- helpers ---------------------------------------------------------------------------

    def _new_inode(self, mode: int, uid: int, gid: int, rdev: int = 0) -> _Inode:
        now = _now()
        return _Inode(
            ino=next(self._ino),
            mode=mode,
            uid=uid,
            gid=gid,
            rdev=rdev,
            atime=now,
            mtime=now,
            ctime=now,
            btime=now,
        )

    def _ro(self) -> None:
        if self.info.readonly:
            raise FsError(errno.EROFS)

    def _node(self, inode: _Inode, parent: _Inode | None, name: str) -> MemNode:
        n = MemNode(inode.qid(), inode, parent, name)
        self._nodes.add(n)
        return n

    @staticmethod
    def _live(node: MemNode) -> _Inode:
        if node.released:
            raise FsError(errno.EBADF)
        node.qid = node.inode.qid()
        return node.inode

    @staticmethod
    def _dir(node: MemNode) -> _Inode:
        ino = MemoryBackend._live(node)
        if not ino.is_dir:
            raise FsError(errno.ENOTDIR)
        if ino.nlink == 0:
            raise FsError(errno.ENOENT)
        return ino

    def _link_entry(self, d: _Inode, name: str, ino: _Inode) -> None:
        d.entries[name] = (next(self._entry_id), ino)
        ino.nlink += 1
        if ino.is_dir:
            ino.nlink += 1  # its own '.'
            ino.parent = d
            d.nlink += 1  # the child's '..'
        d.touch_m()

    def _unlink_entry(self, d: _Inode, name: str) -> _Inode:
        _, ino = d.entries.pop(name)
        ino.nlink -= 1
        if ino.is_dir:
            ino.nlink -= 1
            d.nlink -= 1
        ino.touch_c()
        d.touch_m()
        return ino

    def _create_inode(self, d: _Inode, name: str, mode: int, cred: Cred, rdev: int = 0) -> _Inode:
        _check_name(name)
        self._ro()
        if name in d.entries:
            raise FsError(errno.EEXIST)
        gid = d.gid if d.mode & stat.S_ISGID else cred.gid
        ino = self._new_inode(mode, cred.uid, gid, rdev)
        if ino.is_dir and d.mode & stat.S_ISGID:
            ino.mode |= stat.S_ISGID
        self._link_entry(d, name, ino)
        return ino

    # -- Backend protocol ------------------------------------------------------------------

    async def attach(self, aname: str, cred: Cred) -> MemNode:
        node = self._node(self.root, None, "")
        parts = [p for p in aname.split("/") if p and p != "."]
        if not parts:
            return node
        try:
            nodes = await self.walk(node, parts)
        finally:
            await self.release(node)
        if len(nodes) != len(parts):
            for n in nodes:
                await self.release(n)
            raise FsError(errno.ENOENT)
        for n in nodes[:-1]:
            await self.release(n)
        if not nodes[-1].inode.is_dir:
            await self.release(nodes[-1])
            raise FsError(errno.ENOTDIR)
        return nodes[-1]

    async def walk(self, node: MemNode, names: Sequence[str]) -> list[MemNode]:
        cur = self._live(node)
        if not names:
            return [self._node(cur, node.parent, node.name)]
        out: list[MemNode] = []
        parent = node.parent
        name = node.name
        for comp in names:
            try:
                if not cur.is_dir:
                    raise FsError(errno.ENOTDIR)
                if comp == "..":
                    if cur is self.root:
                        nxt, parent, name = cur, None, ""
                    else:
                        assert cur.parent is not None
                        nxt = cur.parent
                        # Find the grandparent entry naming nxt (for remove/rename of the node).
                        gp = nxt.parent if nxt is not self.root else None
                        parent, name = gp, ""
                        if gp is not None:
                            for n, (_, i) in gp.entries.items():
                                if i is nxt:
                                    name = n
                                    break
                else:
                    if comp in ("", ".") or "/" in comp:
                        raise FsError(errno.EINVAL)
                    ent = cur.entries.get(comp)
                    if ent is None:
                        raise FsError(errno.ENOENT)
                    parent, name, nxt = cur, comp, ent[1]
            except FsError:
                if not out:
                    raise
                break
            out.append(self._node(nxt, parent, name))
            cur = nxt
        return out

    async def release(self, node: MemNode) -> None:
        node.released = True
        self._nodes.discard(node)

    async def getattr(self, node: MemNode, mask: int) -> Attr:
        i = self._live(node)
        return Attr(
            valid=P.GETATTR_ALL,
            qid=i.qid(),
            mode=i.mode,
            uid=i.uid,
            gid=i.gid,
            nlink=i.nlink,
            rdev=i.rdev,
            size=len(i.data) if stat.S_ISREG(i.mode) else len(i.target.encode()),
            blksize=4096,
            blocks=(len(i.data) + 511) // 512,
            atime_sec=i.atime[0],
            atime_nsec=i.atime[1],
            mtime_sec=i.mtime[0],
            mtime_nsec=i.mtime[1],
            ctime_sec=i.ctime[0],
            ctime_nsec=i.ctime[1],
            btime_sec=i.btime[0],
            btime_nsec=i.btime[1],
            gen=0,
            data_version=i.version,
        )

    async def setattr(self, node: MemNode, attr: SetAttr, cred: Cred) -> None:
        i = self._live(node)
        self._ro()
        v = attr.valid
        if v & P.SETATTR_SIZE:
            if i.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(i.mode):
                raise FsError(errno.EINVAL)
            if attr.size < 0:
                raise FsError(errno.EINVAL)
            if attr.size > self.max_file_size:
                raise FsError(errno.EFBIG)
            if attr.size < len(i.data):
                del i.data[attr.size :]
            else:
                i.data.extend(bytes(attr.size - len(i.data)))
            i.touch_m()
        if v & P.SETATTR_MODE:
            i.mode = stat.S_IFMT(i.mode) | (attr.mode & 0o7777)
        if v & P.SETATTR_UID:
            i.uid = attr.uid
        if v & P.SETATTR_GID:
            i.gid = attr.gid
        now = _now()
        if v & P.SETATTR_ATIME:
            i.atime = (attr.atime_sec, attr.atime_nsec) if v & P.SETATTR_ATIME_SET else now
        if v & P.SETATTR_MTIME:
            i.mtime = (attr.mtime_sec, attr.mtime_nsec) if v & P.SETATTR_MTIME_SET else now
            i.version += 1
        if v:
            i.ctime = now
        node.qid = i.qid()

    async def open(self, node: MemNode, flags: int, cred: Cred) -> MemOpenFile:
        i = self._live(node)
        acc = flags & P.L_O_ACCMODE
        writing = acc in (P.L_O_WRONLY, P.L_O_RDWR) or bool(flags & P.L_O_TRUNC)
        if i.is_dir:
            if writing:
                raise FsError(errno.EISDIR)
        elif stat.S_ISLNK(i.mode):
            raise FsError(errno.ELOOP)
        elif not stat.S_ISREG(i.mode):
            raise FsError(errno.ENXIO)
        elif flags & P.L_O_DIRECTORY:
            raise FsError(errno.ENOTDIR)
        if writing:
            self._ro()
        if flags & P.L_O_TRUNC and acc != P.L_O_RDONLY and i.data:
            i.data.clear()
            i.touch_m()
        self.open_files += 1
        return MemOpenFile(node, flags)

    async def create(
        self, dir: MemNode, name: str, flags: int, mode: int, cred: Cred
    ) -> tuple[MemNode, MemOpenFile]:
        d = self._dir(dir)
        _check_name(name)
        self._ro()
        ent = d.entries.get(name)
        if ent is not None:
            # open(O_CREAT) semantics: an existing regular file is opened unless O_EXCL.
            if flags & P.L_O_EXCL or not stat.S_ISREG(ent[1].mode):
                raise FsError(errno.EEXIST)
            n = self._node(ent[1], d, name)
            return n, await self.open(n, flags & ~(P.L_O_CREAT | P.L_O_EXCL), cred)
        i = self._create_inode(d, name, stat.S_IFREG | (mode & 0o7777), cred)
        n = self._node(i, d, name)
        self.open_files += 1
        return n, MemOpenFile(n, flags & ~(P.L_O_CREAT | P.L_O_EXCL | P.L_O_TRUNC))

    async def close(self, f: MemOpenFile) -> None:
        if f.closed:
            return
        f.closed = True
        self.open_files -= 1
        await self.release_locks(f, None)

    def _file(self, f: MemOpenFile) -> _Inode:
        if f.closed:
            raise FsError(errno.EBADF)
        return f.node.inode

    async def read(self, f: MemOpenFile, offset: int, count: int) -> bytes:
        i = self._file(f)
        if i.is_dir:
            raise FsError(errno.EISDIR)
        if f.flags & P.L_O_ACCMODE == P.L_O_WRONLY:
            raise FsError(errno.EBADF)
        if offset < 0 or count < 0:
            raise FsError(errno.EINVAL)
        return bytes(i.data[offset : offset + count])

    async def write(self, f: MemOpenFile, offset: int, data: bytes | memoryview) -> int:
        i = self._file(f)
        if i.is_dir:
            raise FsError(errno.EISDIR)
        if f.flags & P.L_O_ACCMODE == P.L_O_RDONLY:
            raise FsError(errno.EBADF)
        if offset < 0:
            raise FsError(errno.EINVAL)
        if f.flags & P.L_O_APPEND:
            offset = len(i.data)
        n = len(data)
        if offset + n > self.max_file_size:
            raise FsError(errno.EFBIG)
        if offset > len(i.data):
            i.data.extend(bytes(offset - len(i.data)))
        i.data[offset : offset + n] = data
        i.touch_m()
        f.node.qid = i.qid()
        return n

    async def readdir(self, f: MemOpenFile, offset: int, max_entries: int) -> list[DirEntry]:
        d = self._file(f)
        if not d.is_dir:
            raise FsError(errno.ENOTDIR)
        out: list[DirEntry] = []
        if max_entries <= 0:
            return out
        if offset < _DOT_COOKIE:
            out.append(DirEntry(d.qid(), _DOT_COOKIE, P.DT_DIR, "."))
        if offset < _DOTDOT_COOKIE and len(out) < max_entries:
            parent = d.parent if d.parent is not None else d
            out.append(DirEntry(parent.qid(), _DOTDOT_COOKIE, P.DT_DIR, ".."))
        if len(out) >= max_entries:
            return out
        # Entry ids are allocated in insertion order, so dict order is id order.
        for name, (eid, ino) in list(d.entries.items()):
            if eid <= offset:
                continue
            out.append(DirEntry(ino.qid(), eid, _dtype(ino.mode), name))
            if len(out) >= max_entries:
                break
        d.atime = _now()
        return out

    async def fsync(self, f: MemOpenFile, datasync: bool) -> None:
        self._file(f)

    async def mkdir(self, dir: MemNode, name: str, mode: int, cred: Cred) -> Qid:
        d = self._dir(dir)
        return self._create_inode(d, name, stat.S_IFDIR | (mode & 0o7777), cred).qid()

    async def symlink(self, dir: MemNode, name: str, target: str, cred: Cred) -> Qid:
        d = self._dir(dir)
        if not target:
            raise FsError(errno.ENOENT)
        i = self._create_inode(d, name, stat.S_IFLNK | 0o777, cred)
        i.target = target
        return i.qid()

    async def mknod(
        self, dir: MemNode, name: str, mode: int, major: int, minor: int, cred: Cred
    ) -> Qid:
        d = self._dir(dir)
        fmt = stat.S_IFMT(mode)
        if fmt == 0:
            fmt = stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        rdev = os.makedev(major, minor) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return self._create_inode(d, name, fmt | (mode & 0o7777), cred, rdev).qid()

    async def link(self, dir: MemNode, name: str, target: MemNode) -> None:
        d = self._dir(dir)
        t = self._live(target)
        _check_name(name)
        self._ro()
        if t.is_dir:
            raise FsError(errno.EPERM)
        if t.nlink == 0:
            raise FsError(errno.ENOENT)
        if name in d.entries:
            raise FsError(errno.EEXIST)
        self._link_entry(d, name, t)
        t.touch_c()

    async def readlink(self, node: MemNode) -> str:
        i = self._live(node)
        if not stat.S_ISLNK(i.mode):
            raise FsError(errno.EINVAL)
        return i.target

    def _is_ancestor(self, a: _Inode, b: _Inode) -> bool:
        """Whether directory a is b or one of b's ancestors."""
        cur = b
        while True:
            if cur is a:
                return True
            if cur is self.root or cur.parent is None or cur.parent is cur:
                return False
            cur = cur.parent

    def _do_rename(self, od: _Inode, oname: str, nd: _Inode, nname: str) -> None:
        self._ro()
        _check_name(oname)
        _check_name(nname)
        ent = od.entries.get(oname)
        if ent is None:
            raise FsError(errno.ENOENT)
        src = ent[1]
        dst_ent = nd.entries.get(nname)
        if dst_ent is not None:
            dst = dst_ent[1]
            if dst is src:
                return
            if src.is_dir:
                if not dst.is_dir:
                    raise FsError(errno.ENOTDIR)
                if dst.entries:
                    raise FsError(errno.ENOTEMPTY)
            elif dst.is_dir:
                raise FsError(errno.EISDIR)
        if src.is_dir and self._is_ancestor(src, nd):
            raise FsError(errno.EINVAL)
        if dst_ent is not None:
            self._unlink_entry(nd, nname)
            self._forget_entry(nd, nname)
        self._unlink_entry(od, oname)
        self._link_entry(nd, nname, src)
        src.touch_c()
        for n in self._nodes:
            if n.parent is od and n.name == oname and n.inode is src:
                n.parent, n.name = nd, nname

    def _forget_entry(self, d: _Inode, name: str) -> None:
        """Nodes reached through a removed entry no longer name a place (Tremove must fail)."""
        for n in self._nodes:
            if n.parent is d and n.name == name:
                n.parent, n.name = None, ""

    async def rename(self, node: MemNode, newdir: MemNode | None, newname: str) -> None:
        self._live(node)
        if node.parent is None:
            raise FsError(errno.EBUSY)
        nd = self._dir(newdir) if newdir is not None else node.parent
        if node.parent is None or node.name not in node.parent.entries:
            raise FsError(errno.ENOENT if node.parent is not None else errno.EBUSY)
        if node.parent.entries[node.name][1] is not node.inode:
            raise FsError(errno.ENOENT)
        self._do_rename(node.parent, node.name, nd, newname)

    async def renameat(self, olddir: MemNode, oldname: str, newdir: MemNode, newname: str) -> None:
        self._do_rename(self._dir(olddir), oldname, self._dir(newdir), newname)

    def _do_unlink(self, d: _Inode, name: str, flags: int) -> None:
        _check_name(name)
        self._ro()
        ent = d.entries.get(name)
        if ent is None:
            raise FsError(errno.ENOENT)
        i = ent[1]
        if flags & P.AT_REMOVEDIR:
            if not i.is_dir:
                raise FsError(errno.ENOTDIR)
            if i.entries:
                raise FsError(errno.ENOTEMPTY)
        elif i.is_dir:
            raise FsError(errno.EISDIR)
        self._unlink_entry(d, name)
        self._forget_entry(d, name)

    async def unlinkat(self, dir: MemNode, name: str, flags: int) -> None:
        self._do_unlink(self._dir(dir), name, flags)

    async def remove(self, node: MemNode) -> None:
        i = self._live(node)
        self._ro()
        d = node.parent
        if d is None:
            raise FsError(errno.EBUSY if i is self.root else errno.ENOENT)
        ent = d.entries.get(node.name)
        if ent is None or ent[1] is not i:
            raise FsError(errno.ENOENT)
        self._do_unlink(d, node.name, P.AT_REMOVEDIR if i.is_dir else 0)

    async def statfs(self, node: MemNode) -> StatFs:
        self._live(node)
        return StatFs(
            type=0x01021994,  # TMPFS_MAGIC, as good a claim as any for RAM
            bsize=4096,
            blocks=1 << 20,
            bfree=1 << 19,
            bavail=1 << 19,
            files=1 << 20,
            ffree=1 << 19,
            fsid=0,
            namelen=255,
        )

    # -- xattrs ----------------------------------------------------------------------------

    @staticmethod
    def _xname(name: str) -> None:
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE if name else errno.EINVAL)
        if not name.startswith(("user.", "trusted.", "security.", "system.")):
            raise FsError(errno.EOPNOTSUPP)

    async def xattr_get(self, node: MemNode, name: str) -> bytes:
        i = self._live(node)
        self._xname(name)
        try:
            return i.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    async def xattr_list(self, node: MemNode) -> list[str]:
        return list(self._live(node).xattrs)

    async def xattr_set(self, node: MemNode, name: str, value: bytes, flags: int) -> None:
        i = self._live(node)
        self._ro()
        self._xname(name)
        if len(value) > P.XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        if flags & ~(P.XATTR_CREATE | P.XATTR_REPLACE):
            raise FsError(errno.EINVAL)
        if flags & P.XATTR_CREATE and name in i.xattrs:
            raise FsError(errno.EEXIST)
        if flags & P.XATTR_REPLACE and name not in i.xattrs:
            raise FsError(errno.ENODATA)
        i.xattrs[name] = bytes(value)
        i.touch_c()

    async def xattr_remove(self, node: MemNode, name: str) -> None:
        i = self._live(node)
        self._ro()
        self._xname(name)
        if name not in i.xattrs:
            raise FsError(errno.ENODATA)
        del i.xattrs[name]
        i.touch_c()

    # -- locks -----------------------------------------------------------------------------

    async def lock(self, f: MemOpenFile, lock: Lock, owner: LockOwner) -> int:
        i = self._file(f)
        check_lock_request(lock, f.flags)
        key = owner_key(owner)
        start, end = span(lock.start, lock.length)
        if i.locks.conflict(key, lock.type, start, end) is not None:
            return P.LOCK_BLOCKED
        i.locks.apply(key, lock.type, start, end)
        if lock.type != P.LOCK_TYPE_UNLCK:
            f.lock_owners.add(key)
        return P.LOCK_SUCCESS

    async def getlock(self, f: MemOpenFile, lock: Lock, owner: LockOwner) -> Lock:
        i = self._file(f)
        check_getlock_request(lock)
        start, end = span(lock.start, lock.length)
        r = i.locks.conflict(owner_key(owner), lock.type, start, end)
        if r is None:
            return Lock(P.LOCK_TYPE_UNLCK, lock.start, lock.length, lock.proc_id, lock.client_id)
        assert isinstance(r.owner, tuple)
        _, client_id, proc_id = r.owner
        return Lock(r.type, r.start, 0 if r.end is None else r.end - r.start, proc_id, client_id)

    async def release_locks(self, f: MemOpenFile, owner: LockOwner | None) -> None:
        i = f.node.inode
        keys = {owner_key(owner)} if owner is not None else set(f.lock_owners)
        for k in keys:
            i.locks.drop(k)
        f.lock_owners -= keys

    async def aclose(self) -> None:
        self._nodes.clear()


__all__ = ["MemNode", "MemOpenFile", "MemoryBackend"]
