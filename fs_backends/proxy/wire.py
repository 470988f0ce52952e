"""The proxy helper's request format: compact, versioned, every field bounds-checked.

One message per SOCK_SEQPACKET datagram (so framing can never be lost, and fds sent with
SCM_RIGHTS belong to exactly one message):

    header  <HHII  version, op, request id, body length   (12 bytes, little endian)
    body    op-specific fixed fields and length-prefixed strings/blobs

A reply carries the request's id and `op | REPLY`; its body starts with a u32 errno (0 = success)
followed, on success, by the op's result fields. Opened files travel as SCM_RIGHTS fds alongside
a reply, never as data. The helper speaks first: HELLO (id 0) once it is confined.

This module is pure encoding: it must never touch the filesystem, and a decoder must never read
past the body or accept trailing bytes (`Reader.done`).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from fs_backends.base import Attr, Cred, DirEntry, FsError, Qid, SetAttr, StatFs

_Str = str  # the classes below have methods named `str`

VERSION = 1
HEADER = struct.Struct("<HHII")
REPLY = 0x8000

#: Largest request body (an xattr value of XATTR_SIZE_MAX plus a name and a handle).
MAX_REQUEST = 68 * 1024
#: Largest reply body (an xattr list or value of 64 KiB, a readdir batch); stays well under
#: the default unix-socket send buffer, so one SEQPACKET message always fits.
MAX_REPLY = 136 * 1024
MAX_FDS = 4
#: Ancillary buffer for up to MAX_FDS fds.
ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)

# socket.MSG_* are IntFlag members: `flags & socket.MSG_TRUNC` builds enum objects on every
# message, several times the cost of the int operation. Plain ints for the per-message paths.
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
MSG_TRUNC = int(socket.MSG_TRUNC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)

NAME_MAX = 255
PATH_MAX = 4096
XATTR_SIZE_MAX = 65536
MAX_WALK = 16
MAX_READDIR = 256
NO_HANDLE = 0

# Requests (server -> helper).
ATTACH = 1
WALK = 2
RELEASE = 3
GETATTR = 4
SETATTR = 5
OPEN = 6
CREATE = 7
CLOSE = 8
READDIR = 9
MKDIR = 10
SYMLINK = 11
MKNOD = 12
LINK = 13
READLINK = 14
RENAME = 15
RENAMEAT = 16
UNLINKAT = 17
REMOVE = 18
STATFS = 19
XATTR_GET = 20
XATTR_LIST = 21
XATTR_SET = 22
XATTR_REMOVE = 23
LOCKFD = 24

# Announcements (helper -> server, id 0, never answered).
HELLO = 0x4001  # the confined helper is ready: key/value facts about its confinement
CHILD = 0x4002  # from the helper's outer process: the host pid of the confined child

_OPS = ["ATTACH", "WALK", "RELEASE", "GETATTR", "SETATTR", "OPEN", "CREATE", "CLOSE", "READDIR", "MKDIR", "SYMLINK", "MKNOD", "LINK", "READLINK", "RENAME", "RENAMEAT", "UNLINKAT", "REMOVE", "STATFS", "XATTR_GET", "XATTR_LIST", "XATTR_SET", "XATTR_REMOVE", "LOCKFD"]
OP_NAMES: dict[int, str] = {globals()[n]: n for n in _OPS}


class ProtocolError(Exception):
    """A malformed message; `err` is the errno to answer with."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(what)
        self.err = err


class Writer:
    """Builds one message body."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self.parts.append(struct.pack("<B", v))
        return self

    def u16(self, v: int) -> Writer:
        self.parts.append(struct.pack("<H", v))
        return self

    def u32(self, v: int) -> Writer:
        self.parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> Writer:
        self.parts.append(struct.pack("<Q", v))
        return self

    def i64(self, v: int) -> Writer:
        self.parts.append(struct.pack("<q", v))
        return self

    def str(self, v: str | bytes) -> Writer:
        b = v if isinstance(v, bytes) else v.encode("utf-8", "surrogateescape")
        if len(b) > 0xFFFF:
            raise FsError(errno.ENAMETOOLONG)
        self.parts.append(struct.pack("<H", len(b)))
        self.parts.append(b)
        return self

    def blob(self, v: bytes | memoryview) -> Writer:
        self.parts.append(struct.pack("<I", len(v)))
        self.parts.append(bytes(v))
        return self

    def qid(self, q: Qid) -> Writer:
        self.parts.append(struct.pack("<BIQ", q.type, q.version, q.path))
        return self

    def cred(self, c: Cred) -> Writer:
        return self.u32(c.uid & 0xFFFFFFFF).u32(c.gid & 0xFFFFFFFF).str(c.uname[:256])

    def body(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Reads one message body; every read checks the remaining length."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ProtocolError(errno.EBADMSG, "truncated message")
        v = self.buf[self.pos : end]
        self.pos = end
        return v

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack("<H", self._take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self._take(8))[0])

    def i64(self) -> int:
        return int(struct.unpack("<q", self._take(8))[0])

    def raw(self, limit: int) -> bytes:
        n = self.u16()
        if n > limit:
            raise ProtocolError(errno.ENAMETOOLONG, "string too long")
        return bytes(self._take(n))

    def str(self, limit: int = PATH_MAX) -> str:
        return self.raw(limit).decode("utf-8", "surrogateescape")

    def name(self) -> _Str:
        """One path component: non-empty, no '/', no NUL, not '.' (and '..' only where the
        caller allows it: walks)."""
        b = self.raw(NAME_MAX)
        if not b or b"/" in b or b"\0" in b or b == b".":
            raise ProtocolError(errno.EINVAL, "bad name")
        return b.decode("utf-8", "surrogateescape")

    def blob(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise ProtocolError(errno.E2BIG, "blob too long")
        return bytes(self._take(n))

    def qid(self) -> Qid:
        t, v, p = struct.unpack("<BIQ", self._take(13))
        return Qid(t, v, p)

    def cred(self) -> Cred:
        return Cred(self.u32(), self.u32(), self.str(256))

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(errno.EBADMSG, "trailing bytes")


def header(op: int, rid: int, body_len: int) -> bytes:
    return HEADER.pack(VERSION, op, rid, body_len)


def message(op: int, rid: int, body: bytes) -> bytes:
    return HEADER.pack(VERSION, op, rid, len(body)) + body


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    op: int
    rid: int
    length: int


def parse(msg: bytes | memoryview) -> tuple[Header, memoryview]:
    """Split a datagram into header and body, checking version and length."""
    mv = memoryview(msg)
    if len(mv) < HEADER.size:
        raise ProtocolError(errno.EBADMSG, "short header")
    h = Header(*HEADER.unpack_from(mv))
    if h.version != VERSION:
        raise ProtocolError(errno.EPROTO, f"version {h.version}")
    if h.length != len(mv) - HEADER.size:
        raise ProtocolError(errno.EBADMSG, "length does not match")
    return h, mv[HEADER.size :]


def split(msg: bytes | memoryview) -> tuple[int, int, memoryview]:
    """`parse` for the per-message paths: (op, request id, body) without building a Header."""
    mv = memoryview(msg)
    if len(mv) < HEADER.size:
        raise ProtocolError(errno.EBADMSG, "short header")
    version, op, rid, length = HEADER.unpack_from(mv)
    if version != VERSION:
        raise ProtocolError(errno.EPROTO, f"version {version}")
    if length != len(mv) - HEADER.size:
        raise ProtocolError(errno.EBADMSG, "length does not match")
    return op, rid, mv[HEADER.size :]


# -- composite values ---------------------------------------------------------------------------

_ATTR = struct.Struct("<Q" + "BIQ" + "IIIQQQQQ" + "qQ" * 4 + "QQ")
_SETATTR = struct.Struct("<IIIIQqQqQ")
_STATFS = struct.Struct("<IIQQQQQQI")


def put_attr(w: Writer, a: Attr) -> None:
    w.parts.append(
        _ATTR.pack(
            a.valid, a.qid.type, a.qid.version, a.qid.path, a.mode, a.uid, a.gid, a.nlink,
            a.rdev, a.size, a.blksize, a.blocks, a.atime_sec, a.atime_nsec, a.mtime_sec,
            a.mtime_nsec, a.ctime_sec, a.ctime_nsec, a.btime_sec, a.btime_nsec, a.gen,
            a.data_version,
        )  # fmt: skip
    )


def get_attr(r: Reader) -> Attr:
    v = _ATTR.unpack(r._take(_ATTR.size))
    return Attr(v[0], Qid(v[1], v[2], v[3]), *v[4:])


def put_setattr(w: Writer, s: SetAttr) -> None:
    try:
        w.parts.append(
            _SETATTR.pack(
                s.valid, s.mode, s.uid & 0xFFFFFFFF, s.gid & 0xFFFFFFFF, s.size, s.atime_sec,
                s.atime_nsec, s.mtime_sec, s.mtime_nsec,
            )  # fmt: skip
        )
    except struct.error:
        raise FsError(errno.EINVAL) from None


def get_setattr(r: Reader) -> SetAttr:
    return SetAttr(*_SETATTR.unpack(r._take(_SETATTR.size)))


def put_statfs(w: Writer, s: StatFs) -> None:
    w.parts.append(
        _STATFS.pack(
            s.type & 0xFFFFFFFF, s.bsize & 0xFFFFFFFF, s.blocks, s.bfree, s.bavail, s.files,
            s.ffree, s.fsid & 0xFFFFFFFFFFFFFFFF, s.namelen & 0xFFFFFFFF,
        )  # fmt: skip
    )


def get_statfs(r: Reader) -> StatFs:
    return StatFs(*_STATFS.unpack(r._take(_STATFS.size)))


# qid, offset, type, name length: one pack/unpack per entry (readdir batches are the largest
# replies by count of fields); the bytes are the same as qid().u64().u8().str().
_DIRENT = struct.Struct("<BIQQBH")


def put_dirent(w: Writer, e: DirEntry) -> None:
    b = e.name.encode("utf-8", "surrogateescape")
    if len(b) > 0xFFFF:
        raise FsError(errno.ENAMETOOLONG)
    q = e.qid
    w.parts.append(_DIRENT.pack(q.type, q.version, q.path, e.offset, e.type, len(b)))
    w.parts.append(b)


def get_dirent(r: Reader) -> DirEntry:
    qt, qv, qp, off, t, n = _DIRENT.unpack(r._take(_DIRENT.size))
    if n > NAME_MAX:
        raise ProtocolError(errno.ENAMETOOLONG, "string too long")
    return DirEntry(Qid(qt, qv, qp), off, t, bytes(r._take(n)).decode("utf-8", "surrogateescape"))


def put_kv(w: Writer, kv: dict[str, str]) -> None:
    w.u16(len(kv))
    for k, v in kv.items():
        w.str(k).str(v)


def get_kv(r: Reader) -> dict[str, str]:
    return {r.str(256): r.str(4096) for _ in range(r.u16())}


__all__ = [
    "HEADER",
    "MAX_REPLY",
    "MAX_REQUEST",
    "REPLY",
    "VERSION",
    "Header",
    "ProtocolError",
    "Reader",
    "Writer",
    "message",
    "parse",
]
