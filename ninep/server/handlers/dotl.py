"""The 9P2000.L handlers (beyond the ones every dialect shares, in `common`): one per T-message:
validate, call the Backend, build the R-message.

Handlers raise OSError (or FsError) with an errno for anything the client did wrong or the
filesystem refused; the session turns that into Rlerror/Rerror. This module must never touch
sockets, rings or host paths.
"""

from __future__ import annotations

import errno
import logging
from functools import partial

import trio

from fs_backends.base import Attr, Lock, LockOwner, SetAttr
from ninep.protocol import messages as m
from ninep.protocol.codec import pack_dirent
from ninep.protocol.numbers import (
    AT_REMOVEDIR,
    GETATTR_ALL,
    L_O_ACCMODE,
    L_O_APPEND,
    L_O_CREAT,
    L_O_EXCL,
    L_O_RDONLY,
    L_O_TRUNC,
    LOCK_BLOCKED,
    LOCK_FLAGS_BLOCK,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
    QTDIR,
    SETATTR_MODE,
    XATTR_CREATE,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    T,
)
from ninep.server.fids import Fid, FidKind, gate
from ninep.server.handlers.shared import check_name, file_fid, read_count, same_export
from ninep.server.release import release_fid
from ninep.server.session import Handler, Session

log = logging.getLogger("ninep.ops")


# --- open, create ---------------------------------------------------------------------------------


async def lopen(s: Session, msg: m.Tlopen) -> m.Message:
    fid = file_fid(s, msg.fid)
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid already open")
    if (msg.flags & L_O_ACCMODE) != L_O_RDONLY or msg.flags & (L_O_TRUNC | L_O_APPEND):
        gate(fid).writable(fid.name)
    fid.open = await fid.export.backend.open(fid.node, msg.flags & ~(L_O_CREAT | L_O_EXCL), fid.cred)
    fid.open_flags = msg.flags
    s.offer_direct(msg.fid, fid)
    return m.Rlopen(fid.node.qid, s.iounit(fid))


async def lcreate(s: Session, msg: m.Tlcreate) -> m.Message:
    fid = file_fid(s, msg.fid)
    check_name(msg.name)
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid already open")
    g = gate(fid)
    g.writable(msg.name)
    g.mode(msg.name, msg.mode, False)
    backend = fid.export.backend
    node, f = await backend.create(fid.node, msg.name, msg.flags, msg.mode, s.cred_for(fid, msg.gid))
    old = fid.node
    fid.node, fid.open, fid.open_flags, fid.name = node, f, msg.flags, msg.name
    s.offer_direct(msg.fid, fid)
    await backend.release(old)
    return m.Rlcreate(node.qid, s.iounit(fid))


async def readdir(s: Session, msg: m.Treaddir) -> m.Message:
    fid = file_fid(s, msg.fid)
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    if not fid.node.qid.type & QTDIR:
        raise OSError(errno.ENOTDIR, "not a directory")
    count = read_count(s, msg.count)
    # Each entry is 24 bytes + its name; ask for what could fit, the rest comes next call.
    entries = await fid.export.backend.readdir(fid.open, msg.offset, max(1, count // 32))
    out = bytearray()
    for e in entries:
        d = pack_dirent(e.qid, e.offset, e.type, e.name.encode("utf-8", "surrogateescape"))
        if len(out) + len(d) > count:
            break
        out += d
    if entries and not out and count:
        raise OSError(errno.EINVAL, "readdir count too small for one entry")
    return m.Rreaddir(bytes(out))


async def fsync(s: Session, msg: m.Tfsync) -> m.Message:
    fid = file_fid(s, msg.fid)
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    await fid.export.backend.fsync(fid.open, bool(msg.datasync))
    return m.Rfsync()


# --- metadata ---------------------------------------------------------------------------------------


def rgetattr(a: Attr) -> m.Rgetattr:
    return m.Rgetattr(a.valid, a.qid, a.mode, a.uid, a.gid, a.nlink, a.rdev, a.size, a.blksize,
                      a.blocks, a.atime_sec, a.atime_nsec, a.mtime_sec, a.mtime_nsec, a.ctime_sec,
                      a.ctime_nsec, a.btime_sec, a.btime_nsec, a.gen, a.data_version)


async def getattr_(s: Session, msg: m.Tgetattr) -> m.Message:
    fid = file_fid(s, msg.fid)
    attr = await fid.export.backend.getattr(fid.node, msg.request_mask & GETATTR_ALL or GETATTR_ALL)
    return rgetattr(attr)


async def setattr_(s: Session, msg: m.Tsetattr) -> m.Message:
    fid = file_fid(s, msg.fid)
    g = gate(fid)
    g.writable(fid.name)
    if msg.valid & SETATTR_MODE:
        g.mode(fid.name, msg.mode, bool(fid.node.qid.type & QTDIR))
    attr = SetAttr(msg.valid, msg.mode, msg.uid, msg.gid, msg.size, msg.atime_sec, msg.atime_nsec,
                   msg.mtime_sec, msg.mtime_nsec)
    await fid.export.backend.setattr(fid.node, attr, fid.cred)
    return m.Rsetattr()


async def statfs(s: Session, msg: m.Tstatfs) -> m.Message:
    fid = s.fid(msg.fid)
    st = await fid.export.backend.statfs(fid.node)
    return m.Rstatfs(st.type, st.bsize, st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.fsid, st.namelen)


async def readlink(s: Session, msg: m.Treadlink) -> m.Message:
    fid = file_fid(s, msg.fid)
    return m.Rreadlink(await fid.export.backend.readlink(fid.node))


# --- namespace changes --------------------------------------------------------------------------------


async def mkdir(s: Session, msg: m.Tmkdir) -> m.Message:
    fid = file_fid(s, msg.dfid)
    check_name(msg.name)
    gate(fid).writable(msg.name)  # setgid on a directory is no privilege: no mode check
    return m.Rmkdir(await fid.export.backend.mkdir(fid.node, msg.name, msg.mode, s.cred_for(fid, msg.gid)))


async def symlink(s: Session, msg: m.Tsymlink) -> m.Message:
    fid = file_fid(s, msg.fid)
    check_name(msg.name)
    if not msg.symtgt or "\0" in msg.symtgt:
        raise OSError(errno.EINVAL, "empty or NUL-containing symlink target")
    gate(fid).writable(msg.name)
    return m.Rsymlink(await fid.export.backend.symlink(fid.node, msg.name, msg.symtgt, s.cred_for(fid, msg.gid)))


async def mknod(s: Session, msg: m.Tmknod) -> m.Message:
    fid = file_fid(s, msg.dfid)
    check_name(msg.name)
    g = gate(fid)
    g.writable(msg.name)
    g.mknod(msg.name, msg.mode)
    qid = await fid.export.backend.mknod(fid.node, msg.name, msg.mode, msg.major, msg.minor, s.cred_for(fid, msg.gid))
    return m.Rmknod(qid)


async def link(s: Session, msg: m.Tlink) -> m.Message:
    d = file_fid(s, msg.dfid)
    target = file_fid(s, msg.fid)
    check_name(msg.name)
    same_export(d, target)
    gate(d).writable(msg.name)
    await d.export.backend.link(d.node, msg.name, target.node)
    return m.Rlink()


async def rename(s: Session, msg: m.Trename) -> m.Message:
    fid = file_fid(s, msg.fid)
    d = file_fid(s, msg.dfid)
    check_name(msg.name)
    same_export(fid, d)
    gate(fid).writable(msg.name)
    await fid.export.backend.rename(fid.node, d.node, msg.name)
    fid.name = msg.name
    return m.Rrename()


async def renameat(s: Session, msg: m.Trenameat) -> m.Message:
    old = file_fid(s, msg.olddirfid)
    new = file_fid(s, msg.newdirfid)
    check_name(msg.oldname, creating=False)
    check_name(msg.newname, creating=False)
    same_export(old, new)
    gate(new).writable(msg.newname)
    await old.export.backend.renameat(old.node, msg.oldname, new.node, msg.newname)
    return m.Rrenameat()


async def unlinkat(s: Session, msg: m.Tunlinkat) -> m.Message:
    d = file_fid(s, msg.dirfd)
    if msg.name == "..":
        raise OSError(errno.ENOTEMPTY, "cannot remove '..'")
    check_name(msg.name, creating=False)
    if msg.flags & ~AT_REMOVEDIR:
        raise OSError(errno.EINVAL, "unknown unlinkat flags")
    gate(d).writable(msg.name)
    await d.export.backend.unlinkat(d.node, msg.name, msg.flags)
    return m.Runlinkat()


# --- xattrs ---------------------------------------------------------------------------------------------


async def xattrwalk(s: Session, msg: m.Txattrwalk) -> m.Message:
    fid = file_fid(s, msg.fid)
    if msg.newfid != msg.fid and msg.newfid in s.fids:
        raise OSError(errno.EBADF, f"fid {msg.newfid} already in use")
    g = gate(fid)
    backend = fid.export.backend
    if msg.name:
        g.xattr(msg.name, False)
        value = await backend.xattr_get(fid.node, msg.name)
    else:
        names = g.xattr_names(await backend.xattr_list(fid.node))
        value = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names)
    if len(value) > XATTR_SIZE_MAX:
        raise OSError(errno.E2BIG, "xattr too large")
    nodes = await backend.walk(fid.node, [])
    new = Fid(nodes[0], fid.cred, fid.name, FidKind.XATTR_READ, xattr_name=msg.name, xattr_buf=bytearray(value),
              export=fid.export)
    if msg.newfid == msg.fid:
        await release_fid(s.take_fid(msg.fid), s.conn_id)
    s.new_fid(msg.newfid, new)
    return m.Rxattrwalk(len(value))


async def xattrcreate(s: Session, msg: m.Txattrcreate) -> m.Message:
    fid = file_fid(s, msg.fid)
    if not msg.name or "\0" in msg.name:
        raise OSError(errno.EINVAL, "empty xattr name")
    if msg.attr_size > XATTR_SIZE_MAX:
        raise OSError(errno.E2BIG, "xattr too large")
    if msg.flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise OSError(errno.EINVAL, "unknown xattr flags")
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid is open")
    gate(fid).xattr(msg.name, True)
    fid.kind = FidKind.XATTR_WRITE
    fid.xattr_name, fid.xattr_size, fid.xattr_flags = msg.name, msg.attr_size, msg.flags
    fid.xattr_buf = bytearray()
    return m.Rxattrcreate()


# --- locks ----------------------------------------------------------------------------------------------


def _owner(s: Session, client_id: str, proc_id: int) -> LockOwner:
    return LockOwner(s.conn_id, client_id, proc_id)


async def lock(s: Session, msg: m.Tlock) -> m.Message:
    fid = file_fid(s, msg.fid)
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    owner = _owner(s, msg.client_id, msg.proc_id)
    lk = Lock(msg.type, msg.start, msg.length, msg.proc_id, msg.client_id, msg.flags)
    if msg.type != LOCK_TYPE_UNLCK and owner not in fid.lock_owners:
        fid.lock_owners.append(owner)
    delay = 0.002
    while True:
        status = await fid.export.backend.lock(fid.open, lk, owner)
        if status != LOCK_BLOCKED or not msg.flags & LOCK_FLAGS_BLOCK:
            return m.Rlock(status)
        # A blocking request waits here, interruptible by Tflush, instead of making the client
        # poll; the backend call itself never blocks.
        await s.interruptible(msg.tag, partial(trio.sleep, delay))
        delay = min(delay * 2, 0.1)


async def getlock(s: Session, msg: m.Tgetlock) -> m.Message:
    fid = file_fid(s, msg.fid)
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    owner = _owner(s, msg.client_id, msg.proc_id)
    # Linux's client (fs/9p/vfs_file.c v9fs_file_getlock) always sends type UNLCK, meaning "is
    # there any conflicting lock on this range": that is a write-lock test (it reports read and
    # write locks of other owners), whatever type the guest's F_GETLK asked about. Other types
    # reach the backend as sent, so it still refuses the invalid ones.
    type_ = LOCK_TYPE_WRLCK if msg.type == LOCK_TYPE_UNLCK else msg.type
    got = await fid.export.backend.getlock(fid.open, Lock(type_, msg.start, msg.length, msg.proc_id, msg.client_id), owner)
    if got.type == LOCK_TYPE_UNLCK:
        return m.Rgetlock(LOCK_TYPE_UNLCK, msg.start, msg.length, msg.proc_id, msg.client_id)
    return m.Rgetlock(got.type, got.start, got.length, got.proc_id, got.client_id)


# --- table ------------------------------------------------------------------------------------------------

DOTL: dict[int, Handler] = {
    T.Tstatfs: statfs,
    T.Tlopen: lopen,
    T.Tlcreate: lcreate,
    T.Tsymlink: symlink,
    T.Tmknod: mknod,
    T.Trename: rename,
    T.Treadlink: readlink,
    T.Tgetattr: getattr_,
    T.Tsetattr: setattr_,
    T.Txattrwalk: xattrwalk,
    T.Txattrcreate: xattrcreate,
    T.Treaddir: readdir,
    T.Tfsync: fsync,
    T.Tlock: lock,
    T.Tgetlock: getlock,
    T.Tlink: link,
    T.Tmkdir: mkdir,
    T.Trenameat: renameat,
    T.Tunlinkat: unlinkat,
}


__all__ = ["DOTL", "rgetattr"]
