"""One handler per T-message: validate, call the Backend, build the R-message.

Handlers raise OSError (or FsError) with an errno for anything the client did wrong or the
filesystem refused; the session turns that into Rlerror/Rerror. This module must never touch
sockets, rings or host paths.
"""

from __future__ import annotations

import errno
import logging
import pwd
from collections.abc import Sequence
from functools import partial

import trio

from fs_backends.base import Attr, Cred, Lock, LockOwner, SetAttr
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
    MAXWELEM,
    NOFID,
    NONUNAME,
    QTDIR,
    READ_HEADER,
    SETATTR_MODE,
    V9P2000_L,
    XATTR_CREATE,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    T,
)
from ninep.server.fids import Fid, FidKind
from ninep.server.identity import rule_for
from ninep.server.policy import gate, policy_of
from ninep.server.session import Handler, Sent, Session

log = logging.getLogger("ninep.ops")

_WRITE_FLAGS = L_O_TRUNC | L_O_APPEND | L_O_CREAT


# --- names ---------------------------------------------------------------------------------------


def check_name(name: str, *, creating: bool = True) -> None:
    """A single path component as 9P2000.L allows it in create-like requests."""
    if not name or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"illegal file name {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if name in (".", ".."):
        raise OSError(errno.EEXIST if creating else errno.EINVAL, f"{name!r} cannot be used here")


def same_export(a: Fid, b: Fid) -> None:
    """Two fids of one request must reach the same backend (link, rename across exports)."""
    if a.export is not b.export:
        raise OSError(errno.EXDEV, "the fids belong to different exports")


def check_walk_name(name: str) -> None:
    if not name or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"illegal file name {name!r}")


# --- fid lifetime --------------------------------------------------------------------------------


async def release_fid(s: Session, fid: Fid) -> int:
    """Everything clunk does, never raising; returns an errno to report (0 if none)."""
    s.withdraw_direct(fid)
    err = 0
    backend = fid.export.backend
    try:
        if fid.kind is FidKind.XATTR_WRITE:
            err = await _commit_xattr(s, fid)
        if fid.open is not None:
            try:
                if fid.lock_owners:
                    await backend.release_locks(fid.open, None)
            finally:
                await backend.close(fid.open)
                fid.open = None
        if fid.remove_on_clunk:
            try:
                await backend.remove(fid.node)
            except OSError as e:
                err = err or (e.errno or errno.EIO)
    except Exception:
        log.exception("connection %d: releasing a fid failed", s.conn_id)
    finally:
        try:
            await backend.release(fid.node)
        except Exception:
            log.exception("connection %d: releasing a node failed", s.conn_id)
    return err


async def _commit_xattr(s: Session, fid: Fid) -> int:
    if len(fid.xattr_buf) != fid.xattr_size:
        return errno.EINVAL
    try:
        if fid.xattr_size == 0 and fid.xattr_flags & XATTR_REPLACE:
            # Linux removexattr: a zero-length create with XATTR_REPLACE.
            await fid.export.backend.xattr_remove(fid.node, fid.xattr_name)
        else:
            await fid.export.backend.xattr_set(fid.node, fid.xattr_name, bytes(fid.xattr_buf), fid.xattr_flags)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


# --- session setup -------------------------------------------------------------------------------


def _cred(uname: str, n_uname: int) -> Cred:
    if n_uname != NONUNAME:
        try:
            pw = pwd.getpwuid(n_uname)
            return Cred(n_uname, pw.pw_gid, uname or pw.pw_name)
        except KeyError:
            return Cred(n_uname, n_uname, uname)
    try:
        pw = pwd.getpwnam(uname)
        return Cred(pw.pw_uid, pw.pw_gid, uname)
    except KeyError:
        return Cred(65534, 65534, uname)


async def auth(s: Session, msg: m.Tauth) -> m.Message:
    # ENOENT is what diod answers and what its client (libnpclient) takes as "no authentication
    # required, go on and attach"; other errors make it give up.
    raise OSError(errno.ENOENT, "authentication not required")


async def attach(s: Session, msg: m.Tattach) -> m.Message:
    if msg.afid != NOFID:
        raise OSError(errno.EINVAL, "no authentication fid is needed")
    if msg.fid in s.fids:
        raise OSError(errno.EBADF, f"fid {msg.fid} already in use")
    uname, n_uname = msg.uname, msg.n_uname
    identity = getattr(s.channel, "identity", None)
    rule = rule_for(s.options.tls_identities, identity)
    if rule is not None:
        uname, n_uname = rule.credentials(uname, n_uname)
    cred = _cred(uname, n_uname)
    try:
        export, inside = s.exports.resolve(msg.aname)
    except OSError:
        log.warning("connection %d from %s: attach %r as %s refused: no such export",
                    s.conn_id, s.identity, msg.aname, msg.uname)
        raise
    if not export.allows(s.listener):
        log.warning("connection %d from %s: attach %r as %s refused: export %s is not offered on %s",
                    s.conn_id, s.identity, msg.aname, msg.uname, export.name, s.listener or "this channel")
        raise OSError(errno.EACCES, f"export {export.name} is not offered here")
    if rule is not None and not rule.allows(export.name):
        log.warning("connection %d from %s: attach %r as %s refused: this client may attach only export %s",
                    s.conn_id, s.identity, msg.aname, msg.uname, rule.export)
        raise OSError(errno.EACCES, f"export {export.name} is not for {identity}")
    backend = export.backend
    node = await backend.attach(inside, cred)
    try:
        s.new_fid(msg.fid, Fid(node, cred, export=export))
    except OSError:
        await backend.release(node)
        raise
    s.stats.attached(export.name)
    log.info("connection %d from %s: attach %r (export %s) as %s (uid %d)", s.conn_id, s.identity, msg.aname,
             export.name, msg.uname, cred.uid)
    return m.Rattach(node.qid)


async def flush(s: Session, msg: m.Tflush) -> m.Message:
    req = s.inflight.get(msg.oldtag)
    if req is not None and msg.oldtag != msg.tag:
        s.interrupt(req)
        # Interruptible itself, so a connection that ends while a flushed request is stuck in
        # its backend call does not wait on this flush too.
        await s.interruptible(msg.tag, req.done.wait)
    return m.Rflush()


async def walk(s: Session, msg: m.Twalk) -> m.Message:
    fid = s.fid(msg.fid)
    if len(msg.wname) > MAXWELEM:
        raise OSError(errno.EINVAL, f"more than {MAXWELEM} names in one walk")
    if fid.kind is not FidKind.FILE:
        raise OSError(errno.EINVAL, "cannot walk from an xattr fid")
    if msg.newfid != msg.fid and msg.newfid in s.fids:
        raise OSError(errno.EBADF, f"fid {msg.newfid} already in use")
    for name in msg.wname:
        check_walk_name(name)
    # "." stays where the walk is (QEMU and diod allow it; diodls walks it). Backends never see it.
    real = [n for n in msg.wname if n != "."]
    backend = fid.export.backend
    try:
        nodes = await backend.walk(fid.node, real)
    except OSError:
        if msg.wname[0] != ".":
            raise
        nodes = []  # the leading "." steps succeeded: a partial walk
    qids, cur, j = [], fid.node.qid, 0
    for name in msg.wname:
        if name != ".":
            if j >= len(nodes):
                break
            cur, j = nodes[j].qid, j + 1
        qids.append(cur)
    if len(qids) < len(msg.wname):
        # A partial walk: report how far it got; newfid is left untouched.
        for n in nodes:
            await backend.release(n)
        return m.Rwalk(qids)
    target = nodes[-1]
    for n in nodes[:-1]:
        await backend.release(n)
    new = Fid(target, fid.cred, real[-1] if real else fid.name, export=fid.export)
    if msg.newfid == msg.fid:
        if fid.open is not None:
            await backend.release(target)
            raise OSError(errno.EBUSY, "cannot walk an open fid onto itself")
        old = fid.node
        fid.node, fid.name = target, new.name
        await backend.release(old)
    else:
        try:
            s.new_fid(msg.newfid, new)
        except OSError:
            await backend.release(target)
            raise
    # One qid per name walked: a clone (no names) answers none.
    return m.Rwalk(qids)


async def clunk(s: Session, msg: m.Tclunk) -> m.Message:
    fid = s.fid(msg.fid)
    del s.fids[msg.fid]
    err = await release_fid(s, fid)
    if err:
        raise OSError(err, "clunk failed")
    return m.Rclunk()


async def remove(s: Session, msg: m.Tremove) -> m.Message:
    fid = s.fid(msg.fid)
    del s.fids[msg.fid]
    s.withdraw_direct(fid)
    fid.remove_on_clunk = False
    try:
        gate(s, fid).writable(fid.name)
        await fid.export.backend.remove(fid.node)
    finally:
        await release_fid(s, fid)
    return m.Rremove()


# --- open, read, write ----------------------------------------------------------------------------


def _file_fid(s: Session, number: int) -> Fid:
    fid = s.fid(number)
    if fid.kind is not FidKind.FILE:
        raise OSError(errno.EINVAL, "not a file fid")
    return fid


async def lopen(s: Session, msg: m.Tlopen) -> m.Message:
    fid = _file_fid(s, msg.fid)
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid already open")
    if (msg.flags & L_O_ACCMODE) != L_O_RDONLY or msg.flags & (L_O_TRUNC | L_O_APPEND):
        gate(s, fid).writable(fid.name)
    fid.open = await fid.export.backend.open(fid.node, msg.flags & ~(L_O_CREAT | L_O_EXCL), fid.cred)
    fid.open_flags = msg.flags
    s.offer_direct(msg.fid, fid)
    return m.Rlopen(fid.node.qid, s.iounit(fid))


async def lcreate(s: Session, msg: m.Tlcreate) -> m.Message:
    fid = _file_fid(s, msg.fid)
    check_name(msg.name)
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid already open")
    g = gate(s, fid)
    g.writable(msg.name)
    g.mode(msg.name, msg.mode, False)
    backend = fid.export.backend
    node, f = await backend.create(fid.node, msg.name, msg.flags, msg.mode, s.cred_for(fid, msg.gid))
    old = fid.node
    fid.node, fid.open, fid.open_flags, fid.name = node, f, msg.flags, msg.name
    s.offer_direct(msg.fid, fid)
    await backend.release(old)
    return m.Rlcreate(node.qid, s.iounit(fid))


def _read_count(s: Session, count: int) -> int:
    return max(0, min(count, s.msize - READ_HEADER))


async def read(s: Session, msg: m.Tread) -> m.Message | Sent:
    fid = s.fid(msg.fid)
    count = _read_count(s, msg.count)
    if fid.kind is FidKind.XATTR_READ:
        return m.Rread(bytes(fid.xattr_buf[msg.offset:msg.offset + count]))
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    if fid.node.qid.type & QTDIR:
        if s.dialect == V9P2000_L:
            raise OSError(errno.EISDIR, "use Treaddir on directories")
        from ninep.server.handlers.legacy import read_dir

        return m.Rread(await read_dir(s, fid, msg.offset, count))
    zc = getattr(s.channel, "send_rread", None)
    if zc is not None and fid.open.fd is not None:
        s.mark_answered(msg.tag)  # the channel replies itself; the tag is free once it has
        hold = getattr(fid.export.backend, "hold_fd", None)
        if hold is None:
            return Sent(await zc(msg.tag, fid.open.fd, msg.offset, count))
        # The backend may close idle fds under pressure: keep this one open meanwhile.
        async with hold(fid.open) as fd:
            return Sent(await zc(msg.tag, fd, msg.offset, count))
    return m.Rread(await fid.export.backend.read(fid.open, msg.offset, count))


async def write(s: Session, msg: m.Twrite) -> m.Message:
    payload = s.write_payload(msg)  # data the transport left in guest memory, if any
    fid = s.fid(msg.fid)
    if fid.kind is FidKind.XATTR_WRITE:
        data = msg.data if payload is None else payload.copy()
        end = msg.offset + len(data)
        if msg.offset != len(fid.xattr_buf) or end > fid.xattr_size:
            raise OSError(errno.EINVAL, "xattr writes must be sequential and within the announced size")
        fid.xattr_buf += data
        return m.Rwrite(len(data))
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    backend = fid.export.backend
    if policy_of(s, fid).readonly or backend.info.readonly:  # the hot path builds no Gate
        gate(s, fid).writable(fid.name)
    if payload is None:
        n = await backend.write(fid.open, msg.offset, msg.data)
    elif (write_from := getattr(backend, "write_from", None)) is not None:
        n = await write_from(fid.open, msg.offset, payload.pwrite)  # pwritev from guest memory
    else:
        n = await backend.write(fid.open, msg.offset, payload.copy())
    return m.Rwrite(n)


async def readdir(s: Session, msg: m.Treaddir) -> m.Message:
    fid = _file_fid(s, msg.fid)
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    if not fid.node.qid.type & QTDIR:
        raise OSError(errno.ENOTDIR, "not a directory")
    count = _read_count(s, msg.count)
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
    fid = _file_fid(s, msg.fid)
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
    fid = _file_fid(s, msg.fid)
    attr = await fid.export.backend.getattr(fid.node, msg.request_mask & GETATTR_ALL or GETATTR_ALL)
    return rgetattr(attr)


async def setattr_(s: Session, msg: m.Tsetattr) -> m.Message:
    fid = _file_fid(s, msg.fid)
    g = gate(s, fid)
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
    fid = _file_fid(s, msg.fid)
    return m.Rreadlink(await fid.export.backend.readlink(fid.node))


# --- namespace changes --------------------------------------------------------------------------------


async def mkdir(s: Session, msg: m.Tmkdir) -> m.Message:
    fid = _file_fid(s, msg.dfid)
    check_name(msg.name)
    gate(s, fid).writable(msg.name)  # setgid on a directory is no privilege: no mode check
    return m.Rmkdir(await fid.export.backend.mkdir(fid.node, msg.name, msg.mode, s.cred_for(fid, msg.gid)))


async def symlink(s: Session, msg: m.Tsymlink) -> m.Message:
    fid = _file_fid(s, msg.fid)
    check_name(msg.name)
    if not msg.symtgt or "\0" in msg.symtgt:
        raise OSError(errno.EINVAL, "empty or NUL-containing symlink target")
    gate(s, fid).writable(msg.name)
    return m.Rsymlink(await fid.export.backend.symlink(fid.node, msg.name, msg.symtgt, s.cred_for(fid, msg.gid)))


async def mknod(s: Session, msg: m.Tmknod) -> m.Message:
    fid = _file_fid(s, msg.dfid)
    check_name(msg.name)
    g = gate(s, fid)
    g.writable(msg.name)
    g.mknod(msg.name, msg.mode)
    qid = await fid.export.backend.mknod(fid.node, msg.name, msg.mode, msg.major, msg.minor, s.cred_for(fid, msg.gid))
    return m.Rmknod(qid)


async def link(s: Session, msg: m.Tlink) -> m.Message:
    d = _file_fid(s, msg.dfid)
    target = _file_fid(s, msg.fid)
    check_name(msg.name)
    same_export(d, target)
    gate(s, d).writable(msg.name)
    await d.export.backend.link(d.node, msg.name, target.node)
    return m.Rlink()


async def rename(s: Session, msg: m.Trename) -> m.Message:
    fid = _file_fid(s, msg.fid)
    d = _file_fid(s, msg.dfid)
    check_name(msg.name)
    same_export(fid, d)
    gate(s, fid).writable(msg.name)
    await fid.export.backend.rename(fid.node, d.node, msg.name)
    fid.name = msg.name
    return m.Rrename()


async def renameat(s: Session, msg: m.Trenameat) -> m.Message:
    old = _file_fid(s, msg.olddirfid)
    new = _file_fid(s, msg.newdirfid)
    check_name(msg.oldname, creating=False)
    check_name(msg.newname, creating=False)
    same_export(old, new)
    gate(s, new).writable(msg.newname)
    await old.export.backend.renameat(old.node, msg.oldname, new.node, msg.newname)
    return m.Rrenameat()


async def unlinkat(s: Session, msg: m.Tunlinkat) -> m.Message:
    d = _file_fid(s, msg.dirfd)
    if msg.name == "..":
        raise OSError(errno.ENOTEMPTY, "cannot remove '..'")
    check_name(msg.name, creating=False)
    if msg.flags & ~AT_REMOVEDIR:
        raise OSError(errno.EINVAL, "unknown unlinkat flags")
    gate(s, d).writable(msg.name)
    await d.export.backend.unlinkat(d.node, msg.name, msg.flags)
    return m.Runlinkat()


# --- xattrs ---------------------------------------------------------------------------------------------


async def xattrwalk(s: Session, msg: m.Txattrwalk) -> m.Message:
    fid = _file_fid(s, msg.fid)
    if msg.newfid != msg.fid and msg.newfid in s.fids:
        raise OSError(errno.EBADF, f"fid {msg.newfid} already in use")
    g = gate(s, fid)
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
        old = s.fids.pop(msg.fid)
        await release_fid(s, old)
    s.new_fid(msg.newfid, new)
    return m.Rxattrwalk(len(value))


async def xattrcreate(s: Session, msg: m.Txattrcreate) -> m.Message:
    fid = _file_fid(s, msg.fid)
    if not msg.name or "\0" in msg.name:
        raise OSError(errno.EINVAL, "empty xattr name")
    if msg.attr_size > XATTR_SIZE_MAX:
        raise OSError(errno.E2BIG, "xattr too large")
    if msg.flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise OSError(errno.EINVAL, "unknown xattr flags")
    if fid.open is not None:
        raise OSError(errno.EBUSY, "fid is open")
    gate(s, fid).xattr(msg.name, True)
    fid.kind = FidKind.XATTR_WRITE
    fid.xattr_name, fid.xattr_size, fid.xattr_flags = msg.name, msg.attr_size, msg.flags
    fid.xattr_buf = bytearray()
    return m.Rxattrcreate()


# --- locks ----------------------------------------------------------------------------------------------


def _owner(s: Session, client_id: str, proc_id: int) -> LockOwner:
    return LockOwner(s.conn_id, client_id, proc_id)


async def lock(s: Session, msg: m.Tlock) -> m.Message:
    fid = _file_fid(s, msg.fid)
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
    fid = _file_fid(s, msg.fid)
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


# --- tables -----------------------------------------------------------------------------------------------

_COMMON: dict[int, Handler] = {
    T.Tauth: auth,
    T.Tattach: attach,
    T.Tflush: flush,
    T.Twalk: walk,
    T.Tread: read,
    T.Twrite: write,
    T.Tclunk: clunk,
    T.Tremove: remove,
}

_DOTL: dict[int, Handler] = {
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


def handlers_for(dialect: str) -> dict[int, Handler]:
    if dialect == V9P2000_L:
        return {**_COMMON, **_DOTL}
    from ninep.server.handlers.legacy import LEGACY

    return {**_COMMON, **LEGACY}


__all__: Sequence[str] = ["handlers_for", "release_fid", "check_name", "rgetattr", "Sent"]
