"""Every 9P message of the three dialects, declared once.

Each message is a dataclass whose fields carry their wire format as a `construct` object in an
`Annotated` hint; `ninep.protocol.codec` derives both the construct parser/builder and the fast generated
codec from these declarations, so there is exactly one description of the wire format. Names of
classes and fields follow py9p (Tversion, Rread, fid, newfid, wname, qid, iounit, …) and, for
9P2000.L messages, Linux's net/9p.

A field annotated with `Only(...)` exists on the wire only in the listed dialects (for instance
n_uname, which 9P2000 lacks); elsewhere it keeps its default.

This module must never contain encode/decode logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, TypeVar

import construct as cs

from ninep.protocol.numbers import NONUNAME, NOTAG, V9P2000_L, V9P2000_U
from ninep.protocol.types import Qid

# Wire types. These objects are compared by identity by the code generator in ninep.protocol.codec.
u8 = cs.Int8ul
u16 = cs.Int16ul
u32 = cs.Int32ul
u64 = cs.Int64ul
string = cs.PascalString(cs.Int16ul, "utf8")
data = cs.Prefixed(cs.Int32ul, cs.GreedyBytes)
strings = cs.PrefixedArray(cs.Int16ul, string)


class _QidAdapter(cs.Adapter):
    def _decode(self, obj: cs.Container, context: object, path: str) -> Qid:
        return Qid(obj.type, obj.version, obj.path)

    def _encode(self, obj: Qid, context: object, path: str) -> dict[str, int]:
        return {"type": obj.type, "version": obj.version, "path": obj.path}


qid = _QidAdapter(cs.Struct("type" / u8, "version" / u32, "path" / u64))
qids = cs.PrefixedArray(cs.Int16ul, qid)


class _StatMarker:
    """Stands for the 9P2000 Dir structure, whose layout depends on the dialect (.u adds fields);
    the codec substitutes the right construct per dialect."""


stat = _StatMarker()


@dataclass(frozen=True, slots=True)
class Only:
    """Field metadata: the field is on the wire only in these dialects."""

    dialects: frozenset[str]


DOTU_L = Only(frozenset({V9P2000_U, V9P2000_L}))
DOTU = Only(frozenset({V9P2000_U}))


@dataclass(slots=True)
class Stat:
    """The 9P2000 directory entry (Dir), with the 9P2000.u extension fields."""

    type: Annotated[int, u16] = 0
    dev: Annotated[int, u32] = 0
    qid: Annotated[Qid, qid] = field(default_factory=Qid)
    mode: Annotated[int, u32] = 0
    atime: Annotated[int, u32] = 0
    mtime: Annotated[int, u32] = 0
    length: Annotated[int, u64] = 0
    name: Annotated[str, string] = ""
    uid: Annotated[str, string] = ""
    gid: Annotated[str, string] = ""
    muid: Annotated[str, string] = ""
    extension: Annotated[str, string, DOTU] = ""
    n_uid: Annotated[int, u32, DOTU] = NONUNAME
    n_gid: Annotated[int, u32, DOTU] = NONUNAME
    n_muid: Annotated[int, u32, DOTU] = NONUNAME


@dataclass(slots=True)
class Message:
    """Base of every message. `msgtype` is the message number (not `type`, which several .L
    messages use as a field name), `tag` pairs requests with replies."""

    msgtype: ClassVar[int]
    tag: int = field(default=NOTAG, kw_only=True)


MESSAGES: dict[int, type[Message]] = {}
M = TypeVar("M", bound=Message)


def message(number: int) -> Callable[[type[M]], type[M]]:
    def register(cls: type[M]) -> type[M]:
        cls.msgtype = number
        MESSAGES[number] = cls
        return cls

    return register


# --- 9P2000 core (shared by all dialects) -----------------------------------------------------


@message(100)
@dataclass(slots=True)
class Tversion(Message):
    msize: Annotated[int, u32]
    version: Annotated[str, string]


@message(101)
@dataclass(slots=True)
class Rversion(Message):
    msize: Annotated[int, u32]
    version: Annotated[str, string]


@message(102)
@dataclass(slots=True)
class Tauth(Message):
    afid: Annotated[int, u32]
    uname: Annotated[str, string]
    aname: Annotated[str, string]
    n_uname: Annotated[int, u32, DOTU_L] = NONUNAME


@message(103)
@dataclass(slots=True)
class Rauth(Message):
    aqid: Annotated[Qid, qid]


@message(104)
@dataclass(slots=True)
class Tattach(Message):
    fid: Annotated[int, u32]
    afid: Annotated[int, u32]
    uname: Annotated[str, string]
    aname: Annotated[str, string]
    n_uname: Annotated[int, u32, DOTU_L] = NONUNAME


@message(105)
@dataclass(slots=True)
class Rattach(Message):
    qid: Annotated[Qid, qid]


@message(107)
@dataclass(slots=True)
class Rerror(Message):
    ename: Annotated[str, string]
    errno: Annotated[int, u32, DOTU] = 0


@message(108)
@dataclass(slots=True)
class Tflush(Message):
    oldtag: Annotated[int, u16]


@message(109)
@dataclass(slots=True)
class Rflush(Message):
    pass


@message(110)
@dataclass(slots=True)
class Twalk(Message):
    fid: Annotated[int, u32]
    newfid: Annotated[int, u32]
    wname: Annotated[list[str], strings]


@message(111)
@dataclass(slots=True)
class Rwalk(Message):
    wqid: Annotated[list[Qid], qids]


@message(112)
@dataclass(slots=True)
class Topen(Message):
    fid: Annotated[int, u32]
    mode: Annotated[int, u8]


@message(113)
@dataclass(slots=True)
class Ropen(Message):
    qid: Annotated[Qid, qid]
    iounit: Annotated[int, u32]


@message(114)
@dataclass(slots=True)
class Tcreate(Message):
    fid: Annotated[int, u32]
    name: Annotated[str, string]
    perm: Annotated[int, u32]
    mode: Annotated[int, u8]
    extension: Annotated[str, string, DOTU] = ""


@message(115)
@dataclass(slots=True)
class Rcreate(Message):
    qid: Annotated[Qid, qid]
    iounit: Annotated[int, u32]


@message(116)
@dataclass(slots=True)
class Tread(Message):
    fid: Annotated[int, u32]
    offset: Annotated[int, u64]
    count: Annotated[int, u32]


@message(117)
@dataclass(slots=True)
class Rread(Message):
    data: Annotated[bytes | memoryview, data]


@message(118)
@dataclass(slots=True)
class Twrite(Message):
    fid: Annotated[int, u32]
    offset: Annotated[int, u64]
    data: Annotated[bytes | memoryview, data]


@message(119)
@dataclass(slots=True)
class Rwrite(Message):
    count: Annotated[int, u32]


@message(120)
@dataclass(slots=True)
class Tclunk(Message):
    fid: Annotated[int, u32]


@message(121)
@dataclass(slots=True)
class Rclunk(Message):
    pass


@message(122)
@dataclass(slots=True)
class Tremove(Message):
    fid: Annotated[int, u32]


@message(123)
@dataclass(slots=True)
class Rremove(Message):
    pass


@message(124)
@dataclass(slots=True)
class Tstat(Message):
    fid: Annotated[int, u32]


@message(125)
@dataclass(slots=True)
class Rstat(Message):
    stat: Annotated[Stat, stat]


@message(126)
@dataclass(slots=True)
class Twstat(Message):
    fid: Annotated[int, u32]
    stat: Annotated[Stat, stat]


@message(127)
@dataclass(slots=True)
class Rwstat(Message):
    pass


# --- 9P2000.L ---------------------------------------------------------------------------------


@message(7)
@dataclass(slots=True)
class Rlerror(Message):
    ecode: Annotated[int, u32]


@message(8)
@dataclass(slots=True)
class Tstatfs(Message):
    fid: Annotated[int, u32]


@message(9)
@dataclass(slots=True)
class Rstatfs(Message):
    type: Annotated[int, u32]
    bsize: Annotated[int, u32]
    blocks: Annotated[int, u64]
    bfree: Annotated[int, u64]
    bavail: Annotated[int, u64]
    files: Annotated[int, u64]
    ffree: Annotated[int, u64]
    fsid: Annotated[int, u64]
    namelen: Annotated[int, u32]


@message(12)
@dataclass(slots=True)
class Tlopen(Message):
    fid: Annotated[int, u32]
    flags: Annotated[int, u32]


@message(13)
@dataclass(slots=True)
class Rlopen(Message):
    qid: Annotated[Qid, qid]
    iounit: Annotated[int, u32]


@message(14)
@dataclass(slots=True)
class Tlcreate(Message):
    fid: Annotated[int, u32]
    name: Annotated[str, string]
    flags: Annotated[int, u32]
    mode: Annotated[int, u32]
    gid: Annotated[int, u32]


@message(15)
@dataclass(slots=True)
class Rlcreate(Message):
    qid: Annotated[Qid, qid]
    iounit: Annotated[int, u32]


@message(16)
@dataclass(slots=True)
class Tsymlink(Message):
    fid: Annotated[int, u32]
    name: Annotated[str, string]
    symtgt: Annotated[str, string]
    gid: Annotated[int, u32]


@message(17)
@dataclass(slots=True)
class Rsymlink(Message):
    qid: Annotated[Qid, qid]


@message(18)
@dataclass(slots=True)
class Tmknod(Message):
    dfid: Annotated[int, u32]
    name: Annotated[str, string]
    mode: Annotated[int, u32]
    major: Annotated[int, u32]
    minor: Annotated[int, u32]
    gid: Annotated[int, u32]


@message(19)
@dataclass(slots=True)
class Rmknod(Message):
    qid: Annotated[Qid, qid]


@message(20)
@dataclass(slots=True)
class Trename(Message):
    fid: Annotated[int, u32]
    dfid: Annotated[int, u32]
    name: Annotated[str, string]


@message(21)
@dataclass(slots=True)
class Rrename(Message):
    pass


@message(22)
@dataclass(slots=True)
class Treadlink(Message):
    fid: Annotated[int, u32]


@message(23)
@dataclass(slots=True)
class Rreadlink(Message):
    target: Annotated[str, string]


@message(24)
@dataclass(slots=True)
class Tgetattr(Message):
    fid: Annotated[int, u32]
    request_mask: Annotated[int, u64]


@message(25)
@dataclass(slots=True)
class Rgetattr(Message):
    valid: Annotated[int, u64]
    qid: Annotated[Qid, qid]
    mode: Annotated[int, u32]
    uid: Annotated[int, u32]
    gid: Annotated[int, u32]
    nlink: Annotated[int, u64]
    rdev: Annotated[int, u64]
    size: Annotated[int, u64]
    blksize: Annotated[int, u64]
    blocks: Annotated[int, u64]
    atime_sec: Annotated[int, u64]
    atime_nsec: Annotated[int, u64]
    mtime_sec: Annotated[int, u64]
    mtime_nsec: Annotated[int, u64]
    ctime_sec: Annotated[int, u64]
    ctime_nsec: Annotated[int, u64]
    btime_sec: Annotated[int, u64]
    btime_nsec: Annotated[int, u64]
    gen: Annotated[int, u64]
    data_version: Annotated[int, u64]


@message(26)
@dataclass(slots=True)
class Tsetattr(Message):
    fid: Annotated[int, u32]
    valid: Annotated[int, u32]
    mode: Annotated[int, u32]
    uid: Annotated[int, u32]
    gid: Annotated[int, u32]
    size: Annotated[int, u64]
    atime_sec: Annotated[int, u64]
    atime_nsec: Annotated[int, u64]
    mtime_sec: Annotated[int, u64]
    mtime_nsec: Annotated[int, u64]


@message(27)
@dataclass(slots=True)
class Rsetattr(Message):
    pass


@message(30)
@dataclass(slots=True)
class Txattrwalk(Message):
    fid: Annotated[int, u32]
    newfid: Annotated[int, u32]
    name: Annotated[str, string]


@message(31)
@dataclass(slots=True)
class Rxattrwalk(Message):
    size: Annotated[int, u64]


@message(32)
@dataclass(slots=True)
class Txattrcreate(Message):
    fid: Annotated[int, u32]
    name: Annotated[str, string]
    attr_size: Annotated[int, u64]
    flags: Annotated[int, u32]


@message(33)
@dataclass(slots=True)
class Rxattrcreate(Message):
    pass


@message(40)
@dataclass(slots=True)
class Treaddir(Message):
    fid: Annotated[int, u32]
    offset: Annotated[int, u64]
    count: Annotated[int, u32]


@message(41)
@dataclass(slots=True)
class Rreaddir(Message):
    data: Annotated[bytes | memoryview, data]


@message(50)
@dataclass(slots=True)
class Tfsync(Message):
    fid: Annotated[int, u32]
    datasync: Annotated[int, u32]


@message(51)
@dataclass(slots=True)
class Rfsync(Message):
    pass


@message(52)
@dataclass(slots=True)
class Tlock(Message):
    fid: Annotated[int, u32]
    type: Annotated[int, u8]
    flags: Annotated[int, u32]
    start: Annotated[int, u64]
    length: Annotated[int, u64]
    proc_id: Annotated[int, u32]
    client_id: Annotated[str, string]


@message(53)
@dataclass(slots=True)
class Rlock(Message):
    status: Annotated[int, u8]


@message(54)
@dataclass(slots=True)
class Tgetlock(Message):
    fid: Annotated[int, u32]
    type: Annotated[int, u8]
    start: Annotated[int, u64]
    length: Annotated[int, u64]
    proc_id: Annotated[int, u32]
    client_id: Annotated[str, string]


@message(55)
@dataclass(slots=True)
class Rgetlock(Message):
    type: Annotated[int, u8]
    start: Annotated[int, u64]
    length: Annotated[int, u64]
    proc_id: Annotated[int, u32]
    client_id: Annotated[str, string]


@message(70)
@dataclass(slots=True)
class Tlink(Message):
    dfid: Annotated[int, u32]
    fid: Annotated[int, u32]
    name: Annotated[str, string]


@message(71)
@dataclass(slots=True)
class Rlink(Message):
    pass


@message(72)
@dataclass(slots=True)
class Tmkdir(Message):
    dfid: Annotated[int, u32]
    name: Annotated[str, string]
    mode: Annotated[int, u32]
    gid: Annotated[int, u32]


@message(73)
@dataclass(slots=True)
class Rmkdir(Message):
    qid: Annotated[Qid, qid]


@message(74)
@dataclass(slots=True)
class Trenameat(Message):
    olddirfid: Annotated[int, u32]
    oldname: Annotated[str, string]
    newdirfid: Annotated[int, u32]
    newname: Annotated[str, string]


@message(75)
@dataclass(slots=True)
class Rrenameat(Message):
    pass


@message(76)
@dataclass(slots=True)
class Tunlinkat(Message):
    dirfd: Annotated[int, u32]
    name: Annotated[str, string]
    flags: Annotated[int, u32]


@message(77)
@dataclass(slots=True)
class Runlinkat(Message):
    pass
