"""Checks both dialects' handlers make: names, fids of the right kind, fids of one export.

This module must never call the backend or send anything: it only validates, raising OSError
with the errno the client gets.
"""

from __future__ import annotations

import errno

from ninep.protocol.numbers import READ_HEADER
from ninep.server.fids import Fid, FidKind
from ninep.server.session import Session


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


def file_fid(s: Session, number: int) -> Fid:
    """Fid `number` of this connection, which must be a file fid (not an xattr fid)."""
    fid = s.fid(number)
    if fid.kind is not FidKind.FILE:
        raise OSError(errno.EINVAL, "not a file fid")
    return fid


def read_count(s: Session, count: int) -> int:
    """The bytes a Tread may return: what was asked, within the negotiated msize."""
    return max(0, min(count, s.msize - READ_HEADER))


__all__ = ["check_name", "check_walk_name", "file_fid", "read_count", "same_export"]
