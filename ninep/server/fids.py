"""Per-connection fid state: what each fid a client holds refers to.

A fid is a Node (a file the backend resolved) plus, once opened, an OpenFile; xattr fids carry a
buffer instead. This module must never call the backend: the session owns all I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fs_backends.base import Cred, LockOwner, Node, OpenFile

if TYPE_CHECKING:
    from ninep.server.exports import Export


class FidKind(enum.Enum):
    FILE = "file"  # a Node, maybe opened
    XATTR_READ = "xattr-read"  # Txattrwalk result: a value (or name list) to read
    XATTR_WRITE = "xattr-write"  # after Txattrcreate: collects a value, set on clunk


@dataclass(slots=True)
class Fid:
    node: Node
    cred: Cred
    #: The last path component that led here ("/" for an attach root); 9P2000 stat needs it.
    name: str = "/"
    kind: FidKind = FidKind.FILE
    open: OpenFile | None = None
    open_flags: int = 0
    #: 9P2000/.u: remove the file when the fid is clunked (ORCLOSE).
    remove_on_clunk: bool = False
    #: xattr fids.
    xattr_name: str = ""
    xattr_buf: bytearray = field(default_factory=bytearray)
    xattr_size: int = 0
    xattr_flags: int = 0
    #: 9P2000/.u directory reads: where the next read must start and the backend cookie there.
    dir_offset: int = 0
    dir_cookie: int = 0
    dir_pending: bytes = b""
    #: Lock owners that took locks through this fid (released on clunk).
    lock_owners: list[LockOwner] = field(default_factory=list)
    #: The fid number this open fid is registered under with the channel's direct I/O
    #: (transports.base.DirectIO), if it is.
    direct: int | None = None
    #: The export the attach chose; every request on this fid (and fids walked from it) uses its
    #: backend and policy, whatever reloads happen meanwhile.
    export: Export = field(kw_only=True)
