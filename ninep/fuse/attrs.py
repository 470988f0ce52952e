"""Attribute translation between pyfuse3 and the Backend: Attr -> EntryAttributes, the fields
of a setattr -> SetAttr, StatFs -> StatvfsData.

This module must never call the backend or touch the inode table: it converts values only.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyfuse3

from fs_backends.base import Attr, SetAttr, StatFs
from ninep.protocol import numbers as P

_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the kernel may cache what an answer tells it (seconds)."""

    attr: float = 1.0
    entry: float = 1.0


def entry_attributes(ino: int, a: Attr, timeouts: Timeouts) -> pyfuse3.EntryAttributes:
    """The kernel's view of `a`, as inode `ino`."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.generation = 0
    e.entry_timeout = timeouts.entry
    e.attr_timeout = timeouts.attr
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = a.blksize or 4096
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_sec * _NS + a.atime_nsec
    e.st_mtime_ns = a.mtime_sec * _NS + a.mtime_nsec
    e.st_ctime_ns = a.ctime_sec * _NS + a.ctime_nsec
    e.st_birthtime_ns = a.btime_sec * _NS + a.btime_nsec
    return e


def setattr_request(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> SetAttr:
    """The SetAttr asking the backend for what `fields` says the kernel changes."""
    sa = SetAttr(valid=0)
    if fields.update_mode:
        sa.valid |= P.SETATTR_MODE
        sa.mode = attr.st_mode & 0o7777
    if fields.update_uid:
        sa.valid |= P.SETATTR_UID
        sa.uid = attr.st_uid
    if fields.update_gid:
        sa.valid |= P.SETATTR_GID
        sa.gid = attr.st_gid
    if fields.update_size:
        sa.valid |= P.SETATTR_SIZE
        sa.size = attr.st_size
    if fields.update_atime:
        sa.valid |= P.SETATTR_ATIME | P.SETATTR_ATIME_SET
        sa.atime_sec, sa.atime_nsec = divmod(attr.st_atime_ns, _NS)
    if fields.update_mtime:
        sa.valid |= P.SETATTR_MTIME | P.SETATTR_MTIME_SET
        sa.mtime_sec, sa.mtime_nsec = divmod(attr.st_mtime_ns, _NS)
    if fields.update_ctime:
        sa.valid |= P.SETATTR_CTIME
    return sa


def statvfs(s: StatFs) -> pyfuse3.StatvfsData:
    """The kernel's statfs answer for the backend's."""
    out = pyfuse3.StatvfsData()
    out.f_bsize = out.f_frsize = s.bsize
    out.f_blocks, out.f_bfree, out.f_bavail = s.blocks, s.bfree, s.bavail
    out.f_files, out.f_namemax = s.files, s.namelen
    # The backend tells no separate count of inodes free to unprivileged users.
    out.f_ffree = out.f_favail = s.ffree
    return out
