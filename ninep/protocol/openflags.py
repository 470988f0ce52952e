"""Open flags: 9P2000.L's (the Linux x86 numbers) against this host's O_* values, one table read
in both directions (the server opening a client's Tlopen on the host, the FUSE mount turning a
host open into a Tlopen).

Flags that mean nothing to an open on the other side are not in the table and so are dropped, as
QEMU does: O_NOCTTY, O_FASYNC, O_DIRECT (reads would land in unaligned buffers), O_NOFOLLOW,
O_CLOEXEC.
"""

from __future__ import annotations

import errno
import os

from ninep.protocol import numbers as P

#: (9P2000.L bit, host value). A host value of several bits (O_SYNC holds O_DSYNC's bit) only
#: matches whole; a value of 0 (O_LARGEFILE on 64-bit hosts) never matches.
OPEN_FLAGS: tuple[tuple[int, int], ...] = (
    (P.L_O_TRUNC, os.O_TRUNC),
    (P.L_O_APPEND, os.O_APPEND),
    (P.L_O_NONBLOCK, os.O_NONBLOCK),
    (P.L_O_DSYNC, os.O_DSYNC),
    (P.L_O_DIRECTORY, os.O_DIRECTORY),
    (P.L_O_NOATIME, getattr(os, "O_NOATIME", 0)),
    (P.L_O_SYNC, getattr(os, "O_SYNC", 0)),
    (P.L_O_LARGEFILE, getattr(os, "O_LARGEFILE", 0)),
    (P.L_O_CREAT, os.O_CREAT),
    (P.L_O_EXCL, os.O_EXCL),
)
#: The access modes, both ways.
ACCESS: tuple[tuple[int, int], ...] = (
    (P.L_O_RDONLY, os.O_RDONLY),
    (P.L_O_WRONLY, os.O_WRONLY),
    (P.L_O_RDWR, os.O_RDWR),
)
#: Creation is its own request (Tlcreate), so opening an existing file never takes these.
CREATE_FLAGS = P.L_O_CREAT | P.L_O_EXCL

# Lookups for the open path (every Tlopen and FUSE open goes through one of the functions below).
_ACCESS_TO_HOST = dict(ACCESS)
_ACCESS_TO_DOTL = {host: dotl for dotl, host in ACCESS}
_OPEN_ONLY = tuple((dotl, host) for dotl, host in OPEN_FLAGS if not dotl & CREATE_FLAGS)


def dotl_to_host(flags: int) -> int:
    """Host open(2) flags for a Tlopen's; O_CREAT/O_EXCL are dropped. EINVAL for an access mode
    that is none of read, write, read-write."""
    out = _ACCESS_TO_HOST.get(flags & P.L_O_ACCMODE)
    if out is None:
        raise OSError(errno.EINVAL, "bad access mode")
    for dotl, host in _OPEN_ONLY:
        if flags & dotl:
            out |= host
    return out


def host_to_dotl(flags: int, *, create: bool = False) -> int:
    """The 9P2000.L flags for a host open(2)'s; O_CREAT/O_EXCL only when `create`. An unknown
    access mode (O_ACCMODE) reads as read-write."""
    out = _ACCESS_TO_DOTL.get(flags & os.O_ACCMODE, P.L_O_RDWR)
    for dotl, host in OPEN_FLAGS if create else _OPEN_ONLY:
        if host and flags & host == host:
            out |= dotl
    return out
