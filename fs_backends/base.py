"""The Backend protocol and its plain data types.

A Backend serves one file tree. Frontends (the 9P session, the FUSE mount) hold opaque `Node`
handles (one per 9P fid) and `OpenFile` handles (one per opened fid) and call the async methods
below. Errors are `FsError` (an `OSError` carrying an errno); any `OSError` a backend lets escape is
answered with its errno, anything else is a bug and answered EIO.

Contract every backend keeps:
- Names given to it are single path components, already checked by the frontend to be non-empty,
  free of '/' and NUL, and not '.' (`..` is passed through from walk and must never climb above
  the export root).
- A Node stays valid while the file exists anywhere (rename does not invalidate it) and, for an
  opened file, after it is unlinked.
- `release`/`close` are called exactly once per Node/OpenFile handed out and must not raise.
- No method may block the trio event loop: blocking syscalls run in worker threads.

This module must never import frontend code (session, fuse, transports).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from ninep.protocol.types import Qid


class FsError(OSError):
    """A filesystem error with an errno, answered to the client as Rlerror/Rerror."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(err, message or _errno.errorcode.get(err, "error"))


@dataclass(frozen=True, slots=True)
class Cred:
    """Who a request acts for: the attaching user (n_uname) and, for creates, the group asked for."""

    uid: int
    gid: int
    uname: str = ""


@dataclass(slots=True)
class Attr:
    """Everything Rgetattr carries. `valid` says which fields are meaningful (GETATTR_* bits)."""

    valid: int
    qid: Qid
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    rdev: int = 0
    size: int = 0
    blksize: int = 0
    blocks: int = 0
    atime_sec: int = 0
    atime_nsec: int = 0
    mtime_sec: int = 0
    mtime_nsec: int = 0
    ctime_sec: int = 0
    ctime_nsec: int = 0
    btime_sec: int = 0
    btime_nsec: int = 0
    gen: int = 0
    data_version: int = 0


@dataclass(slots=True)
class SetAttr:
    """What Tsetattr asks to change; `valid` holds SETATTR_* bits."""

    valid: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_sec: int = 0
    atime_nsec: int = 0
    mtime_sec: int = 0
    mtime_nsec: int = 0


@dataclass(slots=True)
class StatFs:
    type: int = 0
    bsize: int = 0
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    fsid: int = 0
    namelen: int = 255


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One readdir entry. `offset` is the cookie that resumes the listing *after* this entry; it
    must stay usable across calls and after other entries are removed."""

    qid: Qid
    offset: int
    type: int  # DT_* value
    name: str


@dataclass(slots=True)
class Lock:
    """A POSIX byte-range lock as Tlock/Tgetlock carry it. length 0 means "to end of file"."""

    type: int  # LOCK_TYPE_*
    start: int = 0
    length: int = 0
    proc_id: int = 0
    client_id: str = ""
    flags: int = 0  # LOCK_FLAGS_*


@dataclass(slots=True)
class LockOwner:
    """Who holds a lock: one Linux process on one client connection."""

    connection: int
    client_id: str
    proc_id: int


@runtime_checkable
class Node(Protocol):
    """A backend's handle on one file (held by one fid). `qid` is kept current by the backend."""

    qid: Qid


@runtime_checkable
class OpenFile(Protocol):
    """An opened file or directory. `fd` is the host fd when there is one (transports may do
    zero-copy I/O on it with preadv/pwritev), else None."""

    node: Node
    fd: int | None


@dataclass(slots=True)
class BackendInfo:
    """Static facts a frontend may want (shown in logs and used for iounit)."""

    name: str
    readonly: bool = False
    block_size: int = 4096
    extra: dict[str, str] = field(default_factory=dict)


NodeT = TypeVar("NodeT", bound=Node)
FileT = TypeVar("FileT", bound=OpenFile)


class Backend(Protocol, Generic[NodeT, FileT]):
    """One exported file tree. See the module docstring for the contract.

    Generic in the backend's own Node and OpenFile types, so an implementation can take the
    concrete types it hands out; frontends hold a plain `Backend` (= Backend[Any, Any])."""

    info: BackendInfo

    async def attach(self, aname: str, cred: Cred) -> NodeT:
        """The root of the tree `aname` selects ('' or '/' = the export root; otherwise a
        subdirectory of the export, resolved like a walk). ENOENT if it does not exist."""
        ...

    async def walk(self, node: NodeT, names: Sequence[str]) -> list[NodeT]:
        """Walk `names` from `node`, one component at a time, never following symlinks and never
        climbing above the root. Returns the nodes reached; a shorter list than `names` means the
        walk stopped there. Raises the error of the first component when none is reached. An
        empty `names` returns [a new handle on the same file]."""
        ...

    async def release(self, node: NodeT) -> None: ...

    async def getattr(self, node: NodeT, mask: int) -> Attr: ...

    async def setattr(self, node: NodeT, attr: SetAttr, cred: Cred) -> None: ...

    async def open(self, node: NodeT, flags: int, cred: Cred) -> FileT:
        """Open with Linux O_* flags (L_O_* in ninep.protocol.numbers). Only regular files and
        directories may be opened; anything else answers an error, never blocks."""
        ...

    async def create(
        self, dir: NodeT, name: str, flags: int, mode: int, cred: Cred
    ) -> tuple[NodeT, FileT]:
        """Create and open a regular file (Tlcreate). The new NodeT is what the fid now refers to."""
        ...

    async def close(self, f: FileT) -> None: ...

    async def read(self, f: FileT, offset: int, count: int) -> bytes:
        """Up to `count` bytes at `offset` (fewer only at end of file)."""
        ...

    async def write(self, f: FileT, offset: int, data: bytes | memoryview) -> int:
        """Optional companion (duck-typed, like `OpenFile.fd`):
        `async write_from(f, offset, pwrite: Callable[[int, int], int]) -> int` does the same write
        by calling `pwrite(fd, offset)` in a worker thread on f's host fd, for data that is still
        in a VM's memory (zero-copy Twrite). Backends without host fds leave it out."""
        ...

    async def readdir(self, f: FileT, offset: int, max_entries: int) -> list[DirEntry]:
        """Entries after cookie `offset` (0 = from the start, including '.' and '..'), at most
        `max_entries`; an empty list means the end."""
        ...

    async def fsync(self, f: FileT, datasync: bool) -> None: ...

    async def mkdir(self, dir: NodeT, name: str, mode: int, cred: Cred) -> Qid: ...

    async def symlink(self, dir: NodeT, name: str, target: str, cred: Cred) -> Qid: ...

    async def mknod(
        self, dir: NodeT, name: str, mode: int, major: int, minor: int, cred: Cred
    ) -> Qid: ...

    async def link(self, dir: NodeT, name: str, target: NodeT) -> None: ...

    async def readlink(self, node: NodeT) -> str: ...

    async def rename(self, node: NodeT, newdir: NodeT | None, newname: str) -> None:
        """Move the file `node` refers to (Trename). The backend knows where `node` lives;
        `newdir` None means "in the directory it is in now" (9P2000 wstat renames)."""
        ...

    async def renameat(self, olddir: NodeT, oldname: str, newdir: NodeT, newname: str) -> None: ...

    async def unlinkat(self, dir: NodeT, name: str, flags: int) -> None:
        """Remove a name; flags may hold AT_REMOVEDIR."""
        ...

    async def remove(self, node: NodeT) -> None:
        """Remove the file `node` refers to (Tremove). The caller releases the node afterwards."""
        ...

    async def statfs(self, node: NodeT) -> StatFs: ...

    async def xattr_get(self, node: NodeT, name: str) -> bytes: ...

    async def xattr_list(self, node: NodeT) -> list[str]: ...

    async def xattr_set(self, node: NodeT, name: str, value: bytes, flags: int) -> None: ...

    async def xattr_remove(self, node: NodeT, name: str) -> None: ...

    async def lock(self, f: FileT, lock: Lock, owner: LockOwner) -> int:
        """Try once to take/release a byte-range lock for `owner`, never blocking: returns
        LOCK_SUCCESS or LOCK_BLOCKED (the frontend retries for blocking requests)."""
        ...

    async def getlock(self, f: FileT, lock: Lock, owner: LockOwner) -> Lock:
        """The first lock that would conflict with `lock`, or `lock` with type UNLCK."""
        ...

    async def release_locks(self, f: FileT, owner: LockOwner | None) -> None:
        """Drop the locks `owner` (all owners if None) holds through `f` (clunk, disconnect)."""
        ...

    async def aclose(self) -> None:
        """Release everything the backend holds (server shutdown)."""
        ...
