"""POSIX byte-range lock bookkeeping for one file, keyed by lock owner.

Used by the memory backend as the lock implementation and by the local backend as a mirror of
the OFD locks it holds on the host (to name the owner of a conflicting lock in Tgetlock).
Ranges are half-open [start, end) with end None meaning "to end of file" (9P length 0).
This module must never block or do I/O.
"""

from __future__ import annotations

import errno
from collections.abc import Hashable
from dataclasses import dataclass

from fs_backends.base import FsError, Lock, LockOwner
from ninep.protocol.numbers import (
    L_O_ACCMODE,
    L_O_RDONLY,
    L_O_WRONLY,
    LOCK_TYPE_RDLCK,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
)

MAX_OFFSET = 2**63 - 1


def owner_key(owner: LockOwner) -> Hashable:
    """The table key of a lock owner: one process on one client connection."""
    return (owner.connection, owner.client_id, owner.proc_id)


def check_lock_range(lock: Lock) -> None:
    """Refuses a range fcntl would (EINVAL): negative, or starting past the largest file offset
    (9P carries u64 offsets; struct flock has signed 64-bit ones)."""
    if lock.start < 0 or lock.length < 0 or lock.start > MAX_OFFSET:
        raise FsError(errno.EINVAL)


def check_getlock_request(lock: Lock) -> None:
    """Refuses what F_OFD_GETLK would: a type other than read or write, a bad range (EINVAL)."""
    if lock.type not in (LOCK_TYPE_RDLCK, LOCK_TYPE_WRLCK):
        raise FsError(errno.EINVAL)
    check_lock_range(lock)


def check_lock_request(lock: Lock, open_flags: int) -> None:
    """Refuses what fcntl would: an unknown type or a bad range (EINVAL), a read lock on a
    file open write-only or a write lock on one open read-only (EBADF)."""
    if lock.type not in (LOCK_TYPE_RDLCK, LOCK_TYPE_WRLCK, LOCK_TYPE_UNLCK):
        raise FsError(errno.EINVAL)
    check_lock_range(lock)
    acc = open_flags & L_O_ACCMODE
    if (lock.type == LOCK_TYPE_RDLCK and acc == L_O_WRONLY) or (
        lock.type == LOCK_TYPE_WRLCK and acc == L_O_RDONLY
    ):
        raise FsError(errno.EBADF)


@dataclass(slots=True)
class Range:
    owner: Hashable
    type: int  # LOCK_TYPE_RDLCK or LOCK_TYPE_WRLCK
    start: int
    end: int | None  # exclusive; None = to end of file


def span(start: int, length: int) -> tuple[int, int | None]:
    """9P (start, length) to a half-open range; length 0 means to end of file."""
    if length == 0:
        return start, None
    end = start + length
    return start, (end if end <= MAX_OFFSET else None)


def _overlaps(a_start: int, a_end: int | None, b_start: int, b_end: int | None) -> bool:
    if a_end is not None and a_end <= b_start:
        return False
    return not (b_end is not None and b_end <= a_start)


def _conflicts(a: int, b: int) -> bool:
    return a == LOCK_TYPE_WRLCK or b == LOCK_TYPE_WRLCK


class LockTable:
    """All locks on one file."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[Range] = []

    def conflict(self, owner: Hashable, type: int, start: int, end: int | None) -> Range | None:
        """The first lock of another owner that a `type` lock on [start, end) would conflict with."""
        if type == LOCK_TYPE_UNLCK:
            return None
        for r in self.ranges:
            if (
                r.owner != owner
                and _conflicts(r.type, type)
                and _overlaps(r.start, r.end, start, end)
            ):
                return r
        return None

    def apply(self, owner: Hashable, type: int, start: int, end: int | None) -> None:
        """Set (or with UNLCK clear) `owner`'s lock on [start, end), splitting and merging the
        owner's existing ranges as POSIX fcntl does. The caller checked for conflicts."""
        kept: list[Range] = []
        mine: list[Range] = []
        for r in self.ranges:
            if r.owner != owner:
                kept.append(r)
                continue
            if not _overlaps(r.start, r.end, start, end):
                mine.append(r)
                continue
            # Keep the parts of r outside [start, end).
            if r.start < start:
                mine.append(Range(owner, r.type, r.start, start))
            if end is not None and (r.end is None or r.end > end):
                mine.append(Range(owner, r.type, end, r.end))
        if type != LOCK_TYPE_UNLCK:
            mine.append(Range(owner, type, start, end))
        # Merge touching ranges of the same type.
        mine.sort(key=lambda r: r.start)
        merged: list[Range] = []
        for r in mine:
            if merged:
                last = merged[-1]
                if last.type == r.type and last.end is not None and last.end >= r.start:
                    if r.end is None or r.end > last.end:
                        last.end = r.end
                    continue
                if last.type == r.type and last.end is None:
                    continue
            merged.append(r)
        self.ranges = kept + merged

    def drop(self, owner: Hashable) -> None:
        self.ranges = [r for r in self.ranges if r.owner != owner]

    def owners(self) -> set[Hashable]:
        return {r.owner for r in self.ranges}

    def __bool__(self) -> bool:
        return bool(self.ranges)


__all__ = ["LOCK_TYPE_RDLCK", "LockTable", "Range", "span"]
