"""Handlers of the 9P2000 and 9P2000.u messages that 9P2000.L replaced: open, create, stat,
wstat, and directory reads as sequences of Dir entries.

They translate to the same Backend calls the .L handlers use. This module must never touch
sockets or host paths.
"""

from __future__ import annotations

import errno
import grp
import pwd
import stat as st

from fs_backends.base import Attr, SetAttr
from ninep.protocol import messages as m
from ninep.protocol.numbers import (
    DMDEVICE,
    DMDIR,
    DMLINK,
    DMNAMEDPIPE,
    DMSETGID,
    DMSETUID,
    DMSOCKET,
    DMSYMLINK,
    GETATTR_ALL,
    L_O_APPEND,
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_EXCL,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_TRUNC,
    L_O_WRONLY,
    NONUNAME,
    OAPPEND,
    OEXEC,
    ORCLOSE,
    ORDWR,
    OTRUNC,
    OWRITE,
    QTDIR,
    SETATTR_ATIME,
    SETATTR_ATIME_SET,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_SET,
    SETATTR_SIZE,
    V9P2000_U,
    T,
)
from ninep.server.fids import Fid, FidKind, gate
from ninep.server.handlers import common
from ninep.server.handlers.shared import check_name, file_fid, read_count, same_export
from ninep.server.request import Sent
from ninep.server.session import Handler, Session

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def open_flags(mode: int) -> int:
    """9P2000 Topen/Tcreate mode byte → Linux O_* flags."""
    acc = mode & 3
    flags = {0: L_O_RDONLY, OWRITE: L_O_WRONLY, ORDWR: L_O_RDWR, OEXEC: L_O_RDONLY}[acc]
    if mode & OTRUNC:
        flags |= L_O_TRUNC
    if mode & OAPPEND:
        flags |= L_O_APPEND
    return flags


def _name_of(uid: int, lookup: str) -> str:
    try:
        return pwd.getpwuid(uid).pw_name if lookup == "u" else grp.getgrgid(uid).gr_name
    except KeyError:
        return str(uid)


async def _dir_of(s: Session, fid: Fid, fid_node: object, name: str, attr: Attr) -> m.Stat:
    mode = attr.mode & 0o777
    fmt = st.S_IFMT(attr.mode)
    ext = ""
    if fmt == st.S_IFDIR:
        mode |= DMDIR
    if s.dialect == V9P2000_U:
        if fmt == st.S_IFLNK:
            mode |= DMSYMLINK
            ext = await fid.export.backend.readlink(fid_node)
        elif fmt in (st.S_IFCHR, st.S_IFBLK):
            mode |= DMDEVICE
            ext = f"{'c' if fmt == st.S_IFCHR else 'b'} {attr.rdev >> 8 & 0xFFF} {attr.rdev & 0xFF | (attr.rdev >> 12) & 0xFFF00}"
        elif fmt == st.S_IFIFO:
            mode |= DMNAMEDPIPE
        elif fmt == st.S_IFSOCK:
            mode |= DMSOCKET
        if attr.mode & st.S_ISUID:
            mode |= DMSETUID
        if attr.mode & st.S_ISGID:
            mode |= DMSETGID
    uname, gname = _name_of(attr.uid, "u"), _name_of(attr.gid, "g")
    return m.Stat(
        type=0, dev=0, qid=attr.qid, mode=mode, atime=attr.atime_sec & _U32,
        mtime=attr.mtime_sec & _U32, length=0 if fmt == st.S_IFDIR else attr.size,
        name=name, uid=uname, gid=gname, muid=uname, extension=ext,
        n_uid=attr.uid, n_gid=attr.gid, n_muid=attr.uid,
    )


async def open_(s: Session, msg: m.Topen) -> m.Message:
    fid = file_fid(s, msg.fid)
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid already open")
    flags = open_flags(msg.mode)
    if flags & (L_O_WRONLY | L_O_RDWR | L_O_TRUNC) or msg.mode & ORCLOSE:
        gate(fid).writable(fid.name)
    if fid.node.qid.type & QTDIR:
        flags = L_O_RDONLY | L_O_DIRECTORY
    fid.open = await fid.export.backend.open(fid.node, flags, fid.cred)
    fid.open_flags = flags
    fid.remove_on_clunk = bool(msg.mode & ORCLOSE)
    fid.dir_offset = fid.dir_cookie = 0
    return m.Ropen(fid.node.qid, s.iounit(fid))


async def create(s: Session, msg: m.Tcreate) -> m.Message:
    fid = file_fid(s, msg.fid)
    check_name(msg.name)
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid already open")
    g = gate(fid)
    g.writable(msg.name)
    backend = fid.export.backend
    cred = fid.cred
    perm = msg.perm & 0o777
    if msg.perm & DMSETUID:
        perm |= st.S_ISUID
    if msg.perm & DMSETGID:
        perm |= st.S_ISGID
    special = msg.perm & (DMDIR | DMSYMLINK | DMLINK | DMDEVICE | DMNAMEDPIPE | DMSOCKET)
    if not msg.perm & DMDIR:  # devices are checked below, once their kind is known
        g.mode(msg.name, perm, False)
    if special:
        if msg.perm & DMDIR:
            await backend.mkdir(fid.node, msg.name, perm, cred)
        elif msg.perm & DMSYMLINK:
            await backend.symlink(fid.node, msg.name, msg.extension, cred)
        elif msg.perm & DMLINK:
            target = s.fid(int(msg.extension))
            same_export(fid, target)
            await backend.link(fid.node, msg.name, target.node)
        elif msg.perm & DMNAMEDPIPE:
            await backend.mknod(fid.node, msg.name, st.S_IFIFO | perm, 0, 0, cred)
        elif msg.perm & DMSOCKET:
            await backend.mknod(fid.node, msg.name, st.S_IFSOCK | perm, 0, 0, cred)
        else:
            kind, major, minor = msg.extension.split()
            fmt = st.S_IFCHR if kind == "c" else st.S_IFBLK
            g.mknod(msg.name, fmt | perm)
            await backend.mknod(fid.node, msg.name, fmt | perm, int(major), int(minor), cred)
        nodes = await backend.walk(fid.node, [msg.name])
        node = nodes[0]
        f = None
        if msg.perm & DMDIR:
            f = await backend.open(node, L_O_RDONLY | L_O_DIRECTORY, cred)
        elif not msg.perm & (DMSYMLINK | DMLINK | DMDEVICE | DMNAMEDPIPE | DMSOCKET):
            f = await backend.open(node, open_flags(msg.mode), cred)
    else:
        flags = open_flags(msg.mode) | L_O_CREAT | L_O_EXCL
        node, f = await backend.create(fid.node, msg.name, flags, perm, cred)
    old = fid.node
    fid.node, fid.open, fid.name = node, f, msg.name
    fid.remove_on_clunk = bool(msg.mode & ORCLOSE)
    await backend.release(old)
    return m.Rcreate(node.qid, s.iounit(fid))


async def stat_(s: Session, msg: m.Tstat) -> m.Message:
    fid = file_fid(s, msg.fid)
    attr = await fid.export.backend.getattr(fid.node, GETATTR_ALL)
    return m.Rstat(await _dir_of(s, fid, fid.node, fid.name, attr))


async def wstat(s: Session, msg: m.Twstat) -> m.Message:
    fid = file_fid(s, msg.fid)
    d = msg.stat
    g = gate(fid)
    g.writable(fid.name)
    backend = fid.export.backend
    valid = 0
    sa = SetAttr(0)
    if d.mode != _U32:
        if (d.mode & DMDIR) != (st.S_ISDIR((await backend.getattr(fid.node, GETATTR_ALL)).mode) and DMDIR or 0):
            raise OSError(errno.EINVAL, "cannot change a file's directory bit")
        valid |= SETATTR_MODE
        sa.mode = d.mode & 0o777 | (st.S_ISUID if d.mode & DMSETUID else 0) | (st.S_ISGID if d.mode & DMSETGID else 0)
        g.mode(fid.name, sa.mode, bool(d.mode & DMDIR))
    if d.length != _U64:
        valid |= SETATTR_SIZE
        sa.size = d.length
    if d.mtime != _U32:
        valid |= SETATTR_MTIME | SETATTR_MTIME_SET
        sa.mtime_sec = d.mtime
    if d.atime != _U32:
        valid |= SETATTR_ATIME | SETATTR_ATIME_SET
        sa.atime_sec = d.atime
    gid = d.n_gid if s.dialect == V9P2000_U and d.n_gid != NONUNAME else None
    if gid is None and d.gid:
        try:
            gid = grp.getgrnam(d.gid).gr_gid
        except KeyError:
            raise OSError(errno.EINVAL, f"unknown group {d.gid!r}") from None
    if gid is not None:
        valid |= SETATTR_GID
        sa.gid = gid
    if valid:
        sa.valid = valid
        await backend.setattr(fid.node, sa, fid.cred)
    if d.name and d.name != fid.name:
        check_name(d.name)
        # 9P2000 renames only within the file's own directory.
        await backend.rename(fid.node, None, d.name)
        fid.name = d.name
    return m.Rwstat()


async def read_dir(s: Session, fid: Fid, offset: int, count: int) -> bytes:
    """9P2000 directory read: whole Dir entries, continuing where the previous read stopped."""
    if offset == 0:
        fid.dir_offset, fid.dir_cookie, fid.dir_pending = 0, 0, b""
    elif offset != fid.dir_offset:
        raise OSError(errno.EINVAL, "directory reads must continue at the previous offset")
    assert fid.open is not None
    backend = fid.export.backend
    out = bytearray(fid.dir_pending)
    fid.dir_pending = b""
    while len(out) < count:
        entries = await backend.readdir(fid.open, fid.dir_cookie, 64)
        if not entries:
            break
        for e in entries:
            fid.dir_cookie = e.offset
            if e.name in (".", ".."):
                continue
            nodes = await backend.walk(fid.node, [e.name])
            if not nodes:
                continue
            try:
                attr = await backend.getattr(nodes[0], GETATTR_ALL)
                entry = s.codec.encode_stat(await _dir_of(s, fid, nodes[0], e.name, attr))
            except OSError:
                continue
            finally:
                await backend.release(nodes[0])
            if len(out) + len(entry) > count:
                fid.dir_pending = entry
                break
            out += entry
        if fid.dir_pending:
            break
    if not out and fid.dir_pending:
        raise OSError(errno.EINVAL, "read count too small for one directory entry")
    fid.dir_offset += len(out)
    return bytes(out)


async def read(s: Session, msg: m.Tread) -> m.Message | Sent:
    """Tread, where a directory reads as a sequence of Dir entries (`read_dir`)."""
    fid = s.fid(msg.fid)
    if fid.kind is not FidKind.XATTR_READ and fid.open is not None and fid.node.qid.type & QTDIR:
        return m.Rread(await read_dir(s, fid, msg.offset, read_count(s, msg.count)))
    return await common.read(s, msg)


LEGACY: dict[int, Handler] = {
    T.Tread: read,
    T.Topen: open_,
    T.Tcreate: create,
    T.Tstat: stat_,
    T.Twstat: wstat,
}

__all__ = ["LEGACY", "open_flags", "read_dir"]
