"""The handlers every dialect shares: auth, attach, flush, walk, read, write, clunk, remove.

Handlers raise OSError (or FsError) with an errno for anything the client did wrong or the
filesystem refused; the session turns that into Rlerror/Rerror. This module must never touch
sockets, rings or host paths.
"""

from __future__ import annotations

import errno
import logging
import pwd

from fs_backends.base import Cred
from ninep.protocol import messages as m
from ninep.protocol.numbers import MAXWELEM, NOFID, NONUNAME, QTDIR, T
from ninep.server.fids import Fid, FidKind, gate, policy_of
from ninep.server.handlers.shared import check_walk_name, read_count
from ninep.server.identity import rule_for
from ninep.server.release import release_fid
from ninep.server.request import Sent
from ninep.server.session import Handler, Session

log = logging.getLogger("ninep.ops")


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
    fid = s.take_fid(msg.fid)
    err = await release_fid(fid, s.conn_id)
    if err:
        raise OSError(err, "clunk failed")
    return m.Rclunk()


async def remove(s: Session, msg: m.Tremove) -> m.Message:
    fid = s.take_fid(msg.fid)
    fid.remove_on_clunk = False
    try:
        gate(fid).writable(fid.name)
        await fid.export.backend.remove(fid.node)
    finally:
        await release_fid(fid, s.conn_id)
    return m.Rremove()


# --- read, write ---------------------------------------------------------------------------------


async def read(s: Session, msg: m.Tread) -> m.Message | Sent:
    fid = s.fid(msg.fid)
    count = read_count(s, msg.count)
    if fid.kind is FidKind.XATTR_READ:
        return m.Rread(bytes(fid.xattr_buf[msg.offset:msg.offset + count]))
    if fid.open is None:
        raise OSError(errno.EBADF, "fid not open")
    if fid.node.qid.type & QTDIR:
        # 9P2000.L lists directories with Treaddir; the legacy table reads them before this.
        raise OSError(errno.EISDIR, "use Treaddir on directories")
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
    if policy_of(fid).readonly or backend.info.readonly:  # the hot path builds no Gate
        gate(fid).writable(fid.name)
    if payload is None:
        n = await backend.write(fid.open, msg.offset, msg.data)
    elif (write_from := getattr(backend, "write_from", None)) is not None:
        n = await write_from(fid.open, msg.offset, payload.pwrite)  # pwritev from guest memory
    else:
        n = await backend.write(fid.open, msg.offset, payload.copy())
    return m.Rwrite(n)



# --- table ------------------------------------------------------------------------------------------------

COMMON: dict[int, Handler] = {
    T.Tauth: auth,
    T.Tattach: attach,
    T.Tflush: flush,
    T.Twalk: walk,
    T.Tread: read,
    T.Twrite: write,
    T.Tclunk: clunk,
    T.Tremove: remove,
}

__all__ = ["COMMON"]
