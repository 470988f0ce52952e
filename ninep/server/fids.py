"""Per-connection fid state: what each fid a client holds refers to, and the table that holds them.

A fid is a Node (a file the backend resolved) plus, once opened, an OpenFile; xattr fids carry a
buffer instead. The `FidTable` is the one way a fid leaves a connection, and taking it out first
withdraws the fid from the channel's direct I/O (transports.base.DirectIO), synchronously, with no
checkpoint in between: from then on no request on that fid number can reach the old file.

This module must never call the backend: ending a fid on the backend is `ninep.server.release`.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fs_backends.base import Cred, LockOwner, Node, OpenFile
from ninep.server.exports import Export
from ninep.server.policy import Gate, OperationPolicy


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
    #: Set when the channel serves this open fid's reads and writes itself (direct I/O): what
    #: withdraws that registration. Only the FidTable (and drain) calls it.
    direct: Callable[[], object] | None = None
    #: The export the attach chose; every request on this fid (and fids walked from it) uses its
    #: backend and policy, whatever reloads happen meanwhile.
    export: Export = field(kw_only=True)

    def withdraw_direct(self) -> None:
        """The channel stops answering requests on this fid itself (once; no checkpoint)."""
        withdraw, self.direct = self.direct, None
        if withdraw is not None:
            withdraw()


def policy_of(fid: Fid) -> OperationPolicy:
    """The policy that governs requests on `fid`: its export's (an attach fixed the export)."""
    return fid.export.policy


def gate(fid: Fid) -> Gate:
    """The policy checks of a request on `fid`."""
    return Gate(policy_of(fid), fid.export.backend.info, fid.cred)


class FidTable:
    """One connection's fids by number. `remove` and `clear` are the only ways out, and both
    withdraw direct I/O before they return the fid (its backend state is the caller's to end)."""

    __slots__ = ("_fids",)

    def __init__(self) -> None:
        self._fids: dict[int, Fid] = {}

    def __len__(self) -> int:
        return len(self._fids)

    def __contains__(self, number: object) -> bool:
        return number in self._fids

    def __iter__(self) -> Iterator[Fid]:
        return iter(list(self._fids.values()))

    def get(self, number: int) -> Fid | None:
        return self._fids.get(number)

    def add(self, number: int, fid: Fid) -> None:
        if number in self._fids:
            raise OSError(errno.EBADF, f"fid {number} already in use")
        self._fids[number] = fid

    def remove(self, number: int) -> Fid:
        """Takes the fid out (KeyError if absent), its direct I/O withdrawn first."""
        fid = self._fids.pop(number)
        fid.withdraw_direct()
        return fid

    def clear(self) -> list[Fid]:
        """Takes every fid out (Tversion, the connection ending), direct I/O withdrawn first."""
        fids, self._fids = list(self._fids.values()), {}
        for fid in fids:
            fid.withdraw_direct()
        return fids

    def withdraw_direct(self) -> None:
        """Every fid stays but the channel serves none itself any more (a draining server)."""
        for fid in self._fids.values():
            fid.withdraw_direct()


__all__ = ["Fid", "FidKind", "FidTable", "gate", "policy_of"]
