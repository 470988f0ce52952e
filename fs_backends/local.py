"""A host directory exported as a Backend.

Every Node holds an `O_PATH|O_NOFOLLOW` fd. Every lookup is one component relative to a directory
fd (openat2 with RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS where the kernel has
it, else openat with O_NOFOLLOW); `..` at the export root stays at the root, and any other `..` is
checked to lead to a directory below the root. Files are opened by reopening the node's fd through
/proc/self/fd, so the object opened is exactly the one walked to. Only regular files and
directories are ever opened (never host devices or fifos: CVE-2023-2861).

Nodes remember the directory (as an fd) and name they were reached by, kept current for renames
done through this backend; Tremove/Trename check the entry still names the node's (dev, ino)
before acting and fail rather than touch another file.

Idle fds are reclaimed under pressure (more than `max_path_fds` O_PATH and open-file fds
together, by default half the RLIMIT_NOFILE soft limit), as QEMU does, rather than failing
requests with EMFILE: the least recently used open files are "parked" (their fd closed, reopened
with the same flags less O_CREAT/O_EXCL/O_TRUNC on next use), then the least recently used node
fds are closed and reopened when next needed, checked by (dev, ino), either by file handle (needs
CAP_DAC_READ_SEARCH for open_by_handle_at: root) or, without it, by looking the name up again
below the parent directory's fd (itself reopened the same way). This never happens while a
worker-thread call runs. Files unlinked through this backend are reopened first and never parked
again (an unlinked file cannot be found by name, nor by handle once no fd holds it). How client credentials meet the host (create, chown/chmod, what getattr
shows, which xattr and file names a client may touch) is the credential model's job
(`fs_backends.security`), so QEMU's passthrough, none, mapped-xattr and mapped-file all fit.

This module must never join path strings, follow a symlink, or block the trio loop: each backend
call makes one hop to a worker thread (`fs_backends.offload`) and does all its syscalls there —
except metadata calls (and closes) and data writes on a local filesystem (`inline_metadata`, see
`_inline`): on a cached inode those never wait for a disk (a write only copies into the page
cache), and a worker-thread hop costs more than the call itself (two thread wake-ups: ~110 µs of
CPU on the 2-core VMs here against ~20 µs for a lookup or ~70 µs for a 496 KiB overwrite). Such a
call runs on the loop, and one that slept there for over 2 ms (a cold cache, a busy journal, dirty
page throttling) sends them all back to the workers for a while.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar, cast

import trio

from fs_backends import _linux, offload
from fs_backends._locktable import (
    LockTable,
    check_getlock_request,
    check_lock_request,
    owner_key,
    span,
)
from fs_backends.base import (
    Attr,
    BackendInfo,
    Cred,
    DirEntry,
    FsError,
    Lock,
    LockOwner,
    Qid,
    SetAttr,
    StatFs,
)
from fs_backends.security import Credentials, credentials_for_model, default_credentials
from ninep.protocol import numbers as P
from ninep.protocol.openflags import dotl_to_host

log = logging.getLogger(__name__)

#: statfs f_type of filesystems whose metadata calls on cached inodes never leave the machine
#: (ext2/3/4, xfs, btrfs, tmpfs, f2fs, bcachefs, zfs, overlayfs): their metadata calls run on the
#: event loop by default. Network and FUSE filesystems (nfs, cifs, ceph, 9p, fuse) are not here.
LOCAL_FS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0xCA451A4E,
                            0x2FC12FC1, 0x794C7630})

T = TypeVar("T")

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DEPTH = 4096
_INO_BITS = 48
_FULLMAP_PREFIX = 0xFFFF

def _writes(flags: int) -> bool:
    return flags & P.L_O_ACCMODE in (P.L_O_WRONLY, P.L_O_RDWR) or bool(
        flags & (P.L_O_TRUNC | P.L_O_APPEND)
    )


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _qtype(mode: int) -> int:
    if stat.S_ISDIR(mode):
        return P.QTDIR
    if stat.S_ISLNK(mode):
        return P.QTSYMLINK
    return P.QTFILE


_DT_QT = {P.DT_DIR: P.QTDIR, P.DT_LNK: P.QTSYMLINK}
_QT_FMT = {P.QTDIR: stat.S_IFDIR, P.QTSYMLINK: stat.S_IFLNK}
_FMT_DT = {
    stat.S_IFDIR: P.DT_DIR,
    stat.S_IFREG: P.DT_REG,
    stat.S_IFLNK: P.DT_LNK,
    stat.S_IFCHR: P.DT_CHR,
    stat.S_IFBLK: P.DT_BLK,
    stat.S_IFIFO: P.DT_FIFO,
    stat.S_IFSOCK: P.DT_SOCK,
}


class _RWLock:
    """Many worker-thread calls at once, or one fd reclaim alone (writers go first)."""

    def __init__(self) -> None:
        self._c = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._c:
            while self._writer or self._waiting:
                self._c.wait()
            self._readers += 1

    def try_acquire_shared(self) -> bool:
        """acquire_shared if that needs no waiting (no reclaim running or due), else False."""
        with self._c:
            if self._writer or self._waiting:
                return False
            self._readers += 1
            return True

    def release_shared(self) -> None:
        with self._c:
            self._readers -= 1
            if not self._readers:
                self._c.notify_all()

    def acquire_exclusive(self) -> None:
        with self._c:
            self._waiting += 1
            while self._writer or self._readers:
                self._c.wait()
            self._waiting -= 1
            self._writer = True

    def release_exclusive(self) -> None:
        with self._c:
            self._writer = False
            self._c.notify_all()


class _Fd:
    """A reference-counted O_PATH fd with the (dev, ino) it had when opened.

    Under fd pressure the pool may close an idle one (no call running, no open file on it)
    after taking its file handle; `fd` then reopens it by handle, checked by (dev, ino)."""

    __slots__ = ("_fd", "dev", "ino", "refs", "pins", "handle", "mount_id", "last", "pool", "loc")

    def __init__(self, pool: _FdPool, fd: int, dev: int, ino: int) -> None:
        self._fd = fd
        self.dev = dev
        self.ino = ino
        self.refs = 1
        self.pins = 0  # reasons it may not be reclaimed (open files, the export root)
        self.handle: bytes | None = None  # b"" where the filesystem has no file handles
        self.mount_id = -1
        self.last = 0
        self.pool = pool
        #: Where to look it up again when reopening by name (path mode): the parent directory,
        #: which this holds a reference on, and the name in it.
        self.loc: tuple[_Fd, bytes] | None = None

    @property
    def fd(self) -> int:
        """The O_PATH fd. Only worker-thread code (inside the pool's shared section) reads it."""
        fd = self._fd
        if fd < 0:
            return self.pool.reopen(self)
        self.pool.clock += 1
        self.last = self.pool.clock
        return fd

    @property
    def ident(self) -> tuple[int, int]:
        return self.dev, self.ino


@dataclass(eq=False)
class LocalNode:
    qid: Qid
    h: _Fd
    fmt: int  # S_IFMT of the file
    parent: _Fd | None  # the directory this node was reached through, None if unknown/root
    name: bytes
    released: bool = False
    gen: int | None = None  # FS_IOC_GETVERSION, fetched once; -1 where the fs has none
    cfmt: int = 0  # S_IFMT the client sees (differs from fmt under the mapped models)


@dataclass(eq=False)
class LocalOpenFile:
    node: LocalNode
    fd: int | None
    flags: int
    h: _Fd  # keeps the node's fd alive while open, whatever happens to the fid's node
    is_dir: bool
    dir_mu: threading.Lock = field(default_factory=threading.Lock)
    lock_owners: set[Hashable] = field(default_factory=set)
    closed: bool = False
    busy: int = 0  # calls using fd right now (in worker threads)
    close_pending: bool = False
    parked: bool = False  # fd closed under fd pressure; reopened on next use
    sticky: bool = False  # never parked (unlinked, or cannot be reopened)
    last: int = 0  # pool clock at the last use (least recently used are parked first)


@dataclass
class _FileLocks:
    """Locks on one host file: the mirror table (names owners for Tgetlock) and one OFD lock
    fd per owner (so the kernel arbitrates against other owners and other host processes)."""

    table: LockTable = field(default_factory=LockTable)
    fds: dict[Hashable, int] = field(default_factory=dict)


class _FdPool:
    """Every _Fd of one backend: counts the O_PATH fds held and, over budget, closes the least
    recently used idle ones, to be reopened by file handle (QEMU reclaims fds under pressure
    the same way rather than failing with EMFILE). Reclaim runs with no worker-thread call in
    progress (the exclusive side of `rw`), so no fd number is ever closed under a syscall."""

    def __init__(self, mu: threading.Lock, budget: int) -> None:
        self.mu = mu
        self.budget = max(budget, 4)
        self.rw = _RWLock()
        self.all: set[_Fd] = set()
        self.npath = 0
        self.clock = 0
        self.mount_fds: dict[int, int] = {}
        self.reclaims = 0
        self.nopen = 0  # open-file fds (LocalOpenFile.fd), counted against the budget too
        #: Reopen by name below the parent (no open_by_handle_at without CAP_DAC_READ_SEARCH).
        self.by_path = False

    def new(self, fd: int, dev: int, ino: int) -> _Fd:
        h = _Fd(self, fd, dev, ino)
        with self.mu:
            self.all.add(h)
            self.npath += 1
        return h

    def drop_locked(self, h: _Fd) -> None:
        """The last reference went away (caller holds mu)."""
        self.all.discard(h)
        if h._fd >= 0:
            os.close(h._fd)
            h._fd = -1
            self.npath -= 1
        self.set_loc_locked(h, None)

    def set_loc_locked(self, h: _Fd, loc: tuple[_Fd, bytes] | None) -> None:
        """Record where h can be looked up again (path mode only; caller holds mu)."""
        old = h.loc
        if old == loc or (loc is not None and not self.by_path):
            return
        if loc is not None:
            loc[0].refs += 1
        h.loc = loc
        if old is not None:
            old[0].refs -= 1
            if old[0].refs == 0:
                self.drop_locked(old[0])

    def reopen(self, h: _Fd) -> int:
        with self.mu:
            if h._fd >= 0:
                return h._fd
            if h.refs <= 0:
                raise FsError(errno.EBADF)
            handle = bool(h.handle) and h.mount_id in self.mount_fds
            loc = h.loc
        if handle:
            fd = _linux.open_handle(
                self.mount_fds[h.mount_id], h.handle or b"", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        elif loc is not None:
            # The parent is reopened the same way if it was reclaimed too; the lookup never
            # leaves it nor follows a symlink, and the (dev, ino) check below catches a file
            # renamed or replaced behind our back.
            fd = _linux.lookup(loc[0].fd, loc[1], os.O_PATH)
        else:
            raise FsError(errno.EBADF)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (h.dev, h.ino):
                raise FsError(errno.ESTALE)
        except BaseException:
            os.close(fd)
            raise
        with self.mu:
            if h._fd >= 0:  # another worker thread reopened it meanwhile
                os.close(fd)
                return h._fd
            h._fd = fd
            self.npath += 1
            return fd

    def over_budget(self) -> bool:
        return self.npath + self.nopen > self.budget

    def reopenable(self, h: _Fd) -> bool:
        """Whether h, if closed now, could be reopened later."""
        if self.by_path:
            return h.loc is not None
        fd = h._fd
        if fd < 0:
            return bool(h.handle) and h.mount_id in self.mount_fds
        try:
            return self._handle(h, fd) and self._mount_fd_for(h)
        except OSError:
            return False

    def target(self, force: bool) -> int:
        """How many fds a reclaim leaves: half the budget (a reclaim costs a scan of every fd,
        so it should free many at once), a quarter after an EMFILE."""
        return self.budget // 4 if force else self.budget // 2

    def reclaim(self, force: bool = False) -> int:
        """Close idle fds down to `target`. Caller holds rw exclusively."""
        target = self.target(force)
        with self.mu:
            cands = sorted((h for h in self.all if h._fd >= 0 and not h.pins), key=lambda h: h.last)
        closed = 0
        for h in cands:
            if self.npath + self.nopen <= target:
                break
            fd = h._fd
            if fd < 0 or not self.reopenable(h):
                continue
            with self.mu:
                if h._fd >= 0 and h.refs > 0 and not h.pins:
                    os.close(h._fd)
                    h._fd = -1
                    self.npath -= 1
                    closed += 1
        self.reclaims += 1
        return closed

    def handles_work(self, root: _Fd) -> bool:
        """Whether a file can be reopened by handle here (tried on the export root)."""
        try:
            if not self._handle(root, root._fd) or not self._mount_fd_for(root):
                return False
            fd = _linux.open_handle(
                self.mount_fds[root.mount_id], root.handle or b"", os.O_PATH | os.O_CLOEXEC
            )
        except OSError:
            return False
        os.close(fd)
        return True

    @staticmethod
    def _handle(h: _Fd, fd: int) -> bool:
        if h.handle is None:
            got = _linux.file_handle(fd)
            h.handle, h.mount_id = got if got is not None else (b"", -1)
        return bool(h.handle)

    def _mount_fd_for(self, h: _Fd) -> bool:
        """A readable fd on h's mount (open_by_handle_at refuses O_PATH ones): a directory of
        that mount, h itself or another live one of the same device."""
        if h.mount_id in self.mount_fds:
            return True
        with self.mu:
            dirs = [h] + [x for x in self.all if x.dev == h.dev and x._fd >= 0 and x is not h]
        for d in dirs:
            dfd = d._fd
            try:
                if dfd < 0 or not stat.S_ISDIR(os.fstat(dfd).st_mode):
                    continue
                if not self._handle(d, dfd) or d.mount_id != h.mount_id:
                    continue
                self.mount_fds[h.mount_id] = os.open(
                    _proc(dfd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
                return True
            except OSError:
                continue
        return False

    def close_all(self) -> None:
        with self.mu:
            for h in list(self.all):
                if h._fd >= 0:
                    os.close(h._fd)
                    h._fd = -1
            self.all.clear()
            self.npath = 0
            for fd in self.mount_fds.values():
                os.close(fd)
            self.mount_fds.clear()


class LocalBackend:
    """Exports the host directory `root_path`."""

    def __init__(
        self,
        root_path: str,
        *,
        readonly: bool = False,
        credentials: Credentials | None = None,
        multidevs: Literal["remap", "forbid", "warn"] = "remap",
        max_path_fds: int | None = None,
        inline_metadata: bool | None = None,
    ) -> None:
        """`max_path_fds`: how many O_PATH fds (one per live node) to keep before reclaiming
        idle ones; default half the RLIMIT_NOFILE soft limit. `inline_metadata`: run metadata
        calls and writes on the trio thread while they are quick (see `_inline`) instead of a worker;
        None (the default) does so when the export is on a local filesystem (`LOCAL_FS_TYPES`)."""
        if multidevs not in ("remap", "forbid", "warn"):
            raise ValueError(f"multidevs must be remap, forbid or warn, not {multidevs!r}")
        if not os.path.isdir("/proc/self/fd"):
            raise RuntimeError("LocalBackend needs /proc mounted (fd reopening)")
        self.creds = credentials if credentials is not None else default_credentials()
        self.creds.check_usable()
        soft = _linux.raise_nofile_limit()  # one O_PATH fd per fid: the default limit is low
        self.multidevs = multidevs
        self._mu = threading.Lock()  # refcounts, the location registry, live sets
        # Half the limit, and under a low one room for what is not counted: the server's own
        # fds (sockets, epoll, stdio, ~15) and those worker-thread calls open before they are.
        budget = max(8, min(soft // 2, soft - 40))
        self._pool = _FdPool(self._mu, max_path_fds if max_path_fds is not None else budget)
        self._reclaiming = False
        self._inline_until = 0.0
        self._generations: dict[tuple[int, int, tuple[int, int]], int] = {}
        fd = os.open(root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if inline_metadata is None:
            fstype = _linux.fstatfs(fd)[0]
            inline_metadata = fstype in LOCAL_FS_TYPES
            log.info("export %s: filesystem type %#x, metadata calls and writes %s", root_path, fstype,
                     "on the event loop while quick" if inline_metadata else "on worker threads")
        #: Metadata calls (`_held`) and writes run on the trio thread while they stay quick (`_inline`).
        self.inline_metadata = inline_metadata
        st = os.fstat(fd)
        self._root = self._pool.new(fd, st.st_dev, st.st_ino)
        self._root.pins += 1  # never reclaimed
        if not self._pool.handles_work(self._root):
            # open_by_handle_at needs CAP_DAC_READ_SEARCH (or the fs has no handles): reclaimed
            # fds are reopened by name below their parent instead.
            self._pool.by_path = True
        self.info = BackendInfo(
            name="local",
            readonly=readonly,
            block_size=st.st_blksize or 4096,
            extra={
                "root": root_path,
                "security_model": self.creds.name,
                "multidevs": multidevs,
                "openat2": str(_linux.openat2_supported()),
            },
        )
        self._ns = threading.Lock()  # namespace changes (rename/unlink) and their registry fix-ups
        self._lk = threading.Lock()  # lock tables
        self._qmu = threading.Lock()  # qid path remapping tables
        self._at: dict[tuple[int, int, bytes], set[LocalNode]] = {}
        self._live: set[LocalNode] = set()
        self._open: set[LocalOpenFile] = set()
        self._open_by_ident: dict[tuple[int, int], set[LocalOpenFile]] = {}
        self._locks: dict[tuple[int, int], _FileLocks] = {}
        self._dev_prefix: dict[int, int] = {self._root.dev: 0}
        self._fullmap: dict[tuple[int, int], int] = {}
        self._warned_dev = False
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """One hop to a worker thread; the call runs inside the fd pool's shared section.

        A call that fails with EMFILE/ENFILE (fds were taken faster than reclaim gave them
        back: many requests at once under a low limit) is tried once more after a reclaim. It
        failed opening an fd, before any change, except for a create whose file was made before
        its O_PATH fd failed: the retry then opens the existing file (or answers EEXIST for
        O_EXCL)."""
        try:
            return await offload.run_sync(partial(self._shared, fn, *args))
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            log.info("out of fds (%s): reclaiming idle ones and retrying", e)
        await self._reclaim(force=True)
        return await offload.run_sync(partial(self._shared, fn, *args))

    def _shared(self, fn: Callable[..., T], *args: Any) -> T:
        rw = self._pool.rw
        if self._pool.over_budget():
            # Checked here, in the worker thread right before the call, not when it was queued:
            # calls queued together would otherwise all run before any reclaim.
            self._reclaim_sync()
        rw.acquire_shared()
        try:
            return fn(*args)
        finally:
            rw.release_shared()

    async def _reclaim(self, force: bool = False) -> None:
        if self._reclaiming and not force:
            return
        self._reclaiming = True
        try:
            with trio.CancelScope(shield=True):
                await offload.run_sync(partial(self._reclaim_sync, force))
        finally:
            self._reclaiming = False

    def _reclaim_sync(self, force: bool = False) -> int:
        rw = self._pool.rw
        rw.acquire_exclusive()
        try:
            self._park_idle(force)
            return self._pool.reclaim(force)
        finally:
            rw.release_exclusive()

    def _park_idle(self, force: bool) -> int:
        """Close the fds of the least recently used idle open files (they are reopened on next
        use) until what remains, once their node fds are reclaimed too, fits the pool's target.
        Caller holds the pool's rw exclusively, so no call is using any of them."""
        pool = self._pool
        with self._mu:
            excess = pool.npath + pool.nopen - pool.target(force)
            if excess <= 0:
                return 0
            cands = sorted(
                (f for f in self._open if f.fd is not None and not f.busy and not f.sticky and not f.closed),
                key=lambda f: f.last,
            )
        parked = 0
        for f in cands:
            if parked * 2 >= excess:  # each frees its fd and, once unpinned, its node's
                break
            fd = f.fd
            if fd is None or not self._parkable(f, fd):
                continue
            with self._mu:
                if f.fd != fd or f.busy or f.closed:
                    continue
                f.fd = None
                f.parked = True
                f.h.pins -= 1
                pool.nopen -= 1
            os.close(fd)
            parked += 1
        return parked

    def _parkable(self, f: LocalOpenFile, fd: int) -> bool:
        """Whether f could be reopened as it is: still linked, its node reopenable, and the
        access it was opened with still granted (the mode may have changed since)."""
        try:
            st = os.fstat(fd)
            if st.st_nlink == 0 and not stat.S_ISDIR(st.st_mode):
                f.sticky = True
                return False
            if not self._pool.reopenable(f.h):
                return False
            acc = f.flags & P.L_O_ACCMODE
            want = os.R_OK if acc == P.L_O_RDONLY else os.W_OK if acc == P.L_O_WRONLY else os.R_OK | os.W_OK
            if not os.access(_proc(fd), want, effective_ids=True):
                f.sticky = True
                return False
        except OSError:
            return False
        return True

    def _unpark(self, f: LocalOpenFile) -> int:
        """Reopen a parked file (worker thread); the caller holds f busy."""
        fmt = stat.S_IFDIR if f.is_dir else stat.S_IFREG
        fd = self._reopen(f.h, fmt, fmt, f.flags & ~(P.L_O_CREAT | P.L_O_EXCL | P.L_O_TRUNC))
        with self._mu:
            if f.fd is None and f.parked:
                f.fd = fd
                f.parked = False
                f.h.pins += 1
                self._pool.nopen += 1
                return fd
            cur = f.fd
        os.close(fd)
        if cur is None:
            raise FsError(errno.EBADF)
        return cur

    def _keep_open(self, ident: tuple[int, int]) -> None:
        """The file `ident` is about to lose a name: its open files are reopened now if parked
        and never parked again (an unlinked file can be found neither by name nor by handle).
        Worker thread, under self._ns."""
        with self._mu:
            files = list(self._open_by_ident.get(ident, ()))
            for f in files:
                f.sticky = True
        for f in files:
            if f.parked:
                with contextlib.suppress(OSError):
                    self._unpark(f)

    async def _held(self, nodes: Sequence[LocalNode], fn: Callable[..., T], *args: Any) -> T:
        """Run fn in a worker thread while holding references on the nodes' fds, so a
        concurrent release (a Tclunk racing this request) cannot close an fd under the syscall
        and let its number be reused for another file."""
        held: list[_Fd] = []
        with self._mu:
            for n in nodes:
                if n.released:
                    for h in held:
                        self._decref_locked(h)
                    raise FsError(errno.EBADF)
                n.h.refs += 1
                held.append(n.h)
        try:
            return await self._quick(fn, *args)
        finally:
            with self._mu:
                for h in held:
                    self._decref_locked(h)

    async def _quick(self, fn: Callable[..., T], *args: Any) -> T:
        """A call that does not wait for storage on a cached inode: on the loop (`_inline`)
        while that is allowed, else one hop to a worker thread."""
        if self.inline_metadata and self._inline_until <= time.monotonic():
            ran, result = self._inline(fn, *args)
            if ran:
                return cast(T, result)
        return await self._run(fn, *args)

    #: An inline call that slept and took longer than this turns inline calls off for
    #: INLINE_BACKOFF seconds.
    INLINE_SLOW = 0.002
    INLINE_BACKOFF = 10.0

    def _inline(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """Runs a metadata call or write on the trio thread itself, saving the two thread handoffs (and
        context switches) of a worker-thread hop; (False, None) when it must hop instead: an fd
        reclaim due or running. A call that blocked (cold cache on slow storage, a journal
        commit) sends the next calls to the workers for a while, so a stall of the loop does not
        repeat. Blocked means it slept (a voluntary context switch) and took over INLINE_SLOW:
        a call that was only preempted on a busy machine would be just as slow on a worker."""
        if self._reclaiming or self._pool.over_budget() or not self._pool.rw.try_acquire_shared():
            return False, None
        start = time.monotonic()
        slept = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        try:
            return True, fn(*args)
        finally:
            self._pool.rw.release_shared()
            took = time.monotonic() - start
            if took > self.INLINE_SLOW and resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw != slept:
                self._inline_until = time.monotonic() + self.INLINE_BACKOFF
                log.info("%s blocked the event loop for %.1f ms; worker threads for %.0f s",
                         getattr(fn, "__name__", "a call"), took * 1000, self.INLINE_BACKOFF)

    async def _infile(self, f: LocalOpenFile, fn: Callable[..., T], *args: Any, quick: bool = False) -> T:
        """Run fn(fd, *args) in a worker thread with f's fd kept open meanwhile; a close
        arriving in between is carried out when the last such call finishes. `quick` (writes:
        they only copy into the page cache unless the kernel makes them wait — dirty throttling,
        reclaim) runs it as a metadata call instead (`_quick`): at one request in flight, a
        guest's sequential writes, the worker hop was a third of a 496 KiB overwrite's time."""
        async with self.hold_fd(f) as fd:
            return await (self._quick if quick else self._run)(fn, fd, *args)

    def direct_fd(self, f: LocalOpenFile) -> tuple[int, bool] | None:
        """A new fd on f's open file, for a transport to read and write through directly (it
        owns the fd), and whether writes may run on the event loop's thread as this backend's
        own do (`inline_metadata`); None for a directory, or while f is closed or its fd parked
        (the transport then leaves f's I/O to this backend). Such fds are not counted against
        `max_path_fds`: transports keep few (64 per virtqueue)."""
        with self._mu:  # parking closes f.fd under it
            if f.closed or f.fd is None or f.is_dir:
                return None
            try:
                fd = os.dup(f.fd)
            except OSError:
                return None
        return fd, self.inline_metadata

    @contextlib.asynccontextmanager
    async def hold_fd(self, f: LocalOpenFile) -> AsyncIterator[int]:
        """f's host fd, reopened if it was parked, kept open (never parked, never closed) until
        the block ends: for calls, and for transports that read straight from it."""
        with self._mu:
            if f.closed or (f.fd is None and not f.parked):
                raise FsError(errno.EBADF)
            f.busy += 1
            self._pool.clock += 1
            f.last = self._pool.clock
            fd = f.fd
        try:
            if fd is None:
                fd = await self._run(self._unpark, f)
            yield fd
        finally:
            with self._mu:
                f.busy -= 1
                last = f.busy == 0 and f.close_pending
                f.close_pending = f.close_pending and not last
            if last:
                with trio.CancelScope(shield=True):
                    try:
                        await self._run(self._close_sync, f)
                    except OSError:
                        log.exception("close failed")

    def _ro(self) -> None:
        if self.info.readonly:
            raise FsError(errno.EROFS)

    def _bname(self, name: str, creating: bool = False) -> bytes:
        b = os.fsencode(name)
        if not b or b in (b".", b"..") or b"/" in b or b"\0" in b:
            raise FsError(errno.EINVAL)
        if len(b) > 255:
            raise FsError(errno.ENAMETOOLONG)
        if self.creds.reserved_name(b):
            raise FsError(errno.EINVAL if creating else errno.ENOENT)
        return b

    def _incref(self, h: _Fd) -> _Fd:
        with self._mu:
            h.refs += 1
        return h

    def _decref_locked(self, h: _Fd | None) -> None:
        if h is None:
            return
        h.refs -= 1
        if h.refs == 0:
            self._pool.drop_locked(h)

    def _qpath(self, dev: int, ino: int) -> int:
        """A qid.path unique across all devices under the export."""
        if dev == self._root.dev and ino < (1 << _INO_BITS):
            return ino
        if self.multidevs == "forbid" and dev != self._root.dev:
            raise FsError(errno.ENODEV)
        if self.multidevs == "warn":
            if dev != self._root.dev and not self._warned_dev:
                self._warned_dev = True
                log.warning("export spans several devices; qid paths may collide (multidevs=warn)")
            return ino & 0xFFFFFFFFFFFFFFFF
        with self._qmu:
            prefix = self._dev_prefix.get(dev)
            if prefix is None and len(self._dev_prefix) < _FULLMAP_PREFIX:
                prefix = len(self._dev_prefix)
                self._dev_prefix[dev] = prefix
            if prefix is not None and ino < (1 << _INO_BITS):
                return (prefix << _INO_BITS) | ino
            n = self._fullmap.get((dev, ino))
            if n is None:
                n = len(self._fullmap) + 1
                if n >= (1 << _INO_BITS):
                    raise FsError(errno.ENFILE)
                self._fullmap[(dev, ino)] = n
            return (_FULLMAP_PREFIX << _INO_BITS) | n

    def _qid(self, mode: int, dev: int, ino: int, mtime: tuple[int, int], size: int) -> Qid:
        version = (mtime[0] ^ mtime[1] ^ (size << 8)) & 0xFFFFFFFF
        return Qid(_qtype(mode), version, self._qpath(dev, ino))

    def _qid_st(
        self, st: os.stat_result, fd: int | None = None, loc: tuple[int, bytes] | None = None
    ) -> Qid:
        mode = st.st_mode
        if fd is not None and self.creds.maps_modes:
            mode = self.creds.map_mode(fd, mode, loc)
        return self._qid(
            mode,
            st.st_dev,
            st.st_ino,
            (int(st.st_mtime), st.st_mtime_ns % 1_000_000_000),
            st.st_size,
        )

    def _register(self, n: LocalNode) -> None:
        # Caller holds self._mu.
        self._live.add(n)
        if n.parent is not None:
            self._at.setdefault((n.parent.dev, n.parent.ino, n.name), set()).add(n)
            self._pool.set_loc_locked(n.h, (n.parent, n.name))

    def _unregister(self, n: LocalNode) -> None:
        # Caller holds self._mu.
        if n.parent is not None:
            key = (n.parent.dev, n.parent.ino, n.name)
            s = self._at.get(key)
            if s is not None:
                s.discard(n)
                if not s:
                    del self._at[key]

    def _make_node(self, h: _Fd, st: os.stat_result, parent: _Fd | None, name: bytes) -> LocalNode:
        """A node owning `h` (one reference) and a new reference on `parent`."""
        mode = st.st_mode
        if self.creds.maps_modes:
            if parent is not None:
                loc: tuple[int, bytes] | None = (parent.fd, name)
            elif h.ident == self._root.ident:
                loc = (self._root.fd, b".")
            else:
                loc = None
            mode = self.creds.map_mode(h.fd, mode, loc)
        qid = self._qid(
            mode,
            st.st_dev,
            st.st_ino,
            (int(st.st_mtime), st.st_mtime_ns % 1_000_000_000),
            st.st_size,
        )
        n = LocalNode(qid, h, stat.S_IFMT(st.st_mode), parent, name)
        n.cfmt = stat.S_IFMT(mode)
        with self._mu:
            if parent is not None:
                parent.refs += 1
            self._register(n)
        return n

    def _release_sync(self, n: LocalNode) -> None:
        with self._mu:
            if n.released:
                return
            n.released = True
            self._unregister(n)
            self._live.discard(n)
            self._decref_locked(n.h)
            self._decref_locked(n.parent)
            n.parent = None

    @staticmethod
    def _alive(n: LocalNode) -> _Fd:
        if n.released:
            raise FsError(errno.EBADF)
        return n.h

    def _dir(self, n: LocalNode) -> _Fd:
        h = self._alive(n)
        if n.fmt != stat.S_IFDIR:
            raise FsError(errno.ENOTDIR)
        return h

    def _beneath_root(self, fd: int, st: os.stat_result) -> bool:
        """Whether directory `fd` is the root or below it (climbs with '..' until one or '/')."""
        owned: list[int] = []
        try:
            cur, ident = fd, (st.st_dev, st.st_ino)
            for _ in range(_MAX_DEPTH):
                if ident == self._root.ident:
                    return True
                up = os.open("..", _O_PATH_DIR, dir_fd=cur)
                owned.append(up)
                ust = os.fstat(up)
                if (ust.st_dev, ust.st_ino) == ident:
                    return False  # reached the host's '/'
                cur, ident = up, (ust.st_dev, ust.st_ino)
            return False
        finally:
            for o in owned:
                os.close(o)

    def _dotdot(self, h: _Fd) -> tuple[_Fd, os.stat_result]:
        if h.ident == self._root.ident:
            st = os.fstat(self._root.fd)
            return self._incref(self._root), st
        fd = os.open("..", _O_PATH_DIR, dir_fd=h.fd)
        try:
            st = os.fstat(fd)
            if not self._beneath_root(fd, st):
                # The directory was moved out of the export behind our back.
                raise FsError(errno.ENOENT)
        except BaseException:
            os.close(fd)
            raise
        return self._pool.new(fd, st.st_dev, st.st_ino), st

    def _lookup(self, dh: _Fd, bname: bytes) -> tuple[_Fd, os.stat_result]:
        fd = _linux.lookup(dh.fd, bname, os.O_PATH)
        try:
            st = os.fstat(fd)
            if self.multidevs == "forbid" and st.st_dev != self._root.dev:
                raise FsError(errno.ENODEV)
        except BaseException:
            os.close(fd)
            raise
        return self._pool.new(fd, st.st_dev, st.st_ino), st

    # -- attach / walk / release -----------------------------------------------------------------

    async def attach(self, aname: str, cred: Cred) -> LocalNode:
        return await self._run(self._attach_sync, aname)

    def _attach_sync(self, aname: str) -> LocalNode:
        parts = [p for p in aname.split("/") if p and p != "."]
        root = self._make_node(self._incref(self._root), os.fstat(self._root.fd), None, b"")
        if not parts:
            return root
        try:
            nodes = self._walk_sync(root, parts)
        finally:
            self._release_sync(root)
        for n in nodes[:-1]:
            self._release_sync(n)
        last = nodes[-1]
        if len(nodes) != len(parts):
            self._release_sync(last)
            raise FsError(errno.ENOENT)
        if last.fmt != stat.S_IFDIR:
            self._release_sync(last)
            raise FsError(errno.ENOTDIR)
        return last

    async def walk(self, node: LocalNode, names: Sequence[str]) -> list[LocalNode]:
        self._alive(node)
        return await self._held((node,), self._walk_sync, node, list(names))

    def _walk_sync(self, node: LocalNode, names: list[str]) -> list[LocalNode]:
        cur = self._alive(node)
        if not names:
            clone = LocalNode(node.qid, self._incref(cur), node.fmt, None, node.name)
            clone.cfmt = node.cfmt
            with self._mu:
                if node.parent is not None:
                    node.parent.refs += 1
                    clone.parent = node.parent
                self._register(clone)
            return [clone]
        out: list[LocalNode] = []
        try:
            for comp in names:
                try:
                    if comp == "..":
                        h, st = self._dotdot(cur)
                        parent: _Fd | None = None
                        bname = b""
                    else:
                        bname = self._bname(comp)
                        h, st = self._lookup(cur, bname)
                        parent = cur
                except OSError as e:
                    # A partial walk says "this name does not exist"; running out of fds
                    # says nothing about the name, so it is an error (retried by _run).
                    if not out or e.errno in (errno.EMFILE, errno.ENFILE):
                        raise
                    break
                n = self._make_node(h, st, parent, bname)
                out.append(n)
                cur = h
        except BaseException:
            for n in out:
                self._release_sync(n)
            raise
        return out

    async def release(self, node: LocalNode) -> None:
        # Closing O_PATH fds never blocks; no thread hop needed.
        try:
            self._release_sync(node)
        except OSError:
            log.exception("release failed")

    # -- attributes --------------------------------------------------------------------------------

    async def getattr(self, node: LocalNode, mask: int) -> Attr:
        h = self._alive(node)
        return await self._held((node,), self._getattr_sync, node, h, mask)

    def _location(self, node: LocalNode) -> tuple[_Fd, bytes] | None:
        """Where `node` lives now, for models that keep metadata by name (root: (root, ".")).
        The _Fd carries a reference the caller drops; None when it cannot be found."""
        if node.h.ident == self._root.ident:
            return self._incref(self._root), b"."
        try:
            with self._ns:
                return self._locate(node)
        except OSError:
            return None

    def _with_location(self, node: LocalNode, fn: Callable[[tuple[int, bytes] | None], T]) -> T:
        loc = self._location(node) if self.creds.needs_location else None
        try:
            return fn((loc[0].fd, loc[1]) if loc is not None else None)
        finally:
            if loc is not None:
                with self._mu:
                    self._decref_locked(loc[0])

    def _getattr_sync(self, node: LocalNode, h: _Fd, mask: int) -> Attr:
        raw = _linux.statx(h.fd)
        sx = self._with_location(node, lambda loc: self.creds.map_stat(h.fd, raw, loc))
        qid = self._qid(sx.mode, sx.dev, sx.ino, sx.mtime, sx.size)
        node.qid = qid
        valid = P.GETATTR_BASIC
        if sx.mask & _linux.STATX_BTIME:
            valid |= P.GETATTR_BTIME
        gen = 0
        if mask & P.GETATTR_GEN:
            if node.gen is None:
                node.gen = self._cached_generation(h, node.fmt, raw)
            if node.gen >= 0:
                gen = node.gen
                valid |= P.GETATTR_GEN
        return Attr(
            valid=valid,
            qid=qid,
            mode=sx.mode,
            uid=sx.uid,
            gid=sx.gid,
            nlink=sx.nlink,
            rdev=sx.rdev,
            size=sx.size,
            blksize=sx.blksize,
            blocks=sx.blocks,
            atime_sec=sx.atime[0],
            atime_nsec=sx.atime[1],
            mtime_sec=sx.mtime[0],
            mtime_nsec=sx.mtime[1],
            ctime_sec=sx.ctime[0],
            ctime_nsec=sx.ctime[1],
            btime_sec=sx.btime[0] if valid & P.GETATTR_BTIME else 0,
            btime_nsec=sx.btime[1] if valid & P.GETATTR_BTIME else 0,
            gen=gen,
        )

    def _writable_fd(self, h: _Fd) -> int | None:
        with self._mu:
            for f in self._open_by_ident.get(h.ident, ()):
                if f.fd is not None and f.flags & P.L_O_ACCMODE in (P.L_O_WRONLY, P.L_O_RDWR):
                    return f.fd
        return None

    #: Generations remembered by (dev, ino, btime), at most this many (then forgotten at once).
    GENERATIONS_KEPT = 65536

    def _cached_generation(self, h: _Fd, fmt: int, raw: _linux.Statx) -> int:
        """`_generation`, remembered per inode: Linux asks for it at every lookup, with
        cache=none once per path component per call, and reading it costs an open of
        /proc/self/fd/N, an ioctl and a close. An inode is known by (dev, ino, btime), so a
        reused inode number (a new file, a new generation) misses the cache."""
        if not raw.mask & _linux.STATX_BTIME:
            return self._generation(h, fmt)
        key = (raw.dev, raw.ino, raw.btime)
        gen = self._generations.get(key)
        if gen is None:
            gen = self._generation(h, fmt)
            if len(self._generations) >= self.GENERATIONS_KEPT:
                self._generations.clear()
            self._generations[key] = gen
        return gen

    @staticmethod
    def _generation(h: _Fd, fmt: int) -> int:
        # The ioctl needs a real open file; only regular files and directories are opened.
        if fmt not in (stat.S_IFREG, stat.S_IFDIR):
            return -1
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOATIME
        try:
            try:
                fd = os.open(_proc(h.fd), flags)
            except PermissionError:
                fd = os.open(_proc(h.fd), flags & ~os.O_NOATIME)
            try:
                return _linux.inode_generation(fd)
            finally:
                os.close(fd)
        except OSError:
            return -1

    async def setattr(self, node: LocalNode, attr: SetAttr, cred: Cred) -> None:
        h = self._alive(node)
        if attr.valid:
            self._ro()
        await self._held((node,), self._setattr_sync, node, h, attr)

    def _setattr_sync(self, node: LocalNode, h: _Fd, attr: SetAttr) -> None:
        v = attr.valid
        fmt = node.cfmt
        if v & (P.SETATTR_MODE | P.SETATTR_UID | P.SETATTR_GID):

            def owner(loc: tuple[int, bytes] | None) -> None:
                if v & P.SETATTR_MODE:
                    self.creds.chmod(h.fd, fmt, attr.mode, loc)
                if v & (P.SETATTR_UID | P.SETATTR_GID):
                    self.creds.chown(
                        h.fd,
                        attr.uid if v & P.SETATTR_UID else -1,
                        attr.gid if v & P.SETATTR_GID else -1,
                        loc,
                    )

            self._with_location(node, owner)
        if v & P.SETATTR_SIZE:
            if fmt == stat.S_IFDIR:
                raise FsError(errno.EISDIR)
            if fmt != stat.S_IFREG or attr.size < 0:
                raise FsError(errno.EINVAL)
            wfd = self._writable_fd(h)
            if wfd is not None:
                # The client may hold the only write permission through its open file.
                os.ftruncate(wfd, attr.size)
            else:
                # truncate(2) through the magic link works on unlinked files and O_PATH fds.
                os.truncate(_proc(h.fd), attr.size)
        if v & (P.SETATTR_ATIME | P.SETATTR_MTIME):
            omit = (0, _linux.UTIME_OMIT)
            now = (0, _linux.UTIME_NOW)
            at = omit
            mt = omit
            if v & P.SETATTR_ATIME:
                at = (attr.atime_sec, attr.atime_nsec) if v & P.SETATTR_ATIME_SET else now
            if v & P.SETATTR_MTIME:
                mt = (attr.mtime_sec, attr.mtime_nsec) if v & P.SETATTR_MTIME_SET else now
            _linux.utimens_fd(h.fd, at, mt)
        others = (
            P.SETATTR_MODE | P.SETATTR_UID | P.SETATTR_GID | P.SETATTR_SIZE
            | P.SETATTR_ATIME | P.SETATTR_MTIME
        )  # fmt: skip
        if v & P.SETATTR_CTIME and not v & others:
            # Only ctime asked for: a chown that changes nothing updates ctime alone.
            _linux.fchown_fd(h.fd, -1, -1)
        with contextlib.suppress(OSError):
            # The type cannot change; only version (mtime, size) can.
            node.qid = self._qid_st(os.fstat(h.fd))._replace(type=node.qid.type)

    # -- open / create / close / io ---------------------------------------------------------------

    async def open(self, node: LocalNode, flags: int, cred: Cred) -> LocalOpenFile:
        h = self._alive(node)
        if _writes(flags):
            self._ro()
        return await self._held((node,), self._open_sync, node, h, flags)

    def _check_openable(self, fmt: int, flags: int) -> None:
        if fmt == stat.S_IFDIR:
            if flags & P.L_O_ACCMODE != P.L_O_RDONLY or flags & P.L_O_TRUNC:
                raise FsError(errno.EISDIR)
        elif fmt == stat.S_IFLNK:
            raise FsError(errno.ELOOP)
        elif fmt != stat.S_IFREG:
            # Device nodes, fifos, sockets: never opened on the host.
            raise FsError(errno.ENXIO)
        elif flags & P.L_O_DIRECTORY:
            raise FsError(errno.ENOTDIR)

    def _reopen(self, h: _Fd, fmt: int, cfmt: int, flags: int) -> int:
        """Open the object `h` refers to; `fmt` is its host type, `cfmt` what the client sees
        (a mapped-model device node is a host regular file and is refused all the same)."""
        self._check_openable(fmt, flags)
        if cfmt != fmt:
            self._check_openable(cfmt, flags)
        oflags = dotl_to_host(flags) | os.O_CLOEXEC | os.O_NOCTTY
        if fmt == stat.S_IFDIR:
            oflags |= os.O_DIRECTORY
        try:
            return os.open(_proc(h.fd), oflags)
        except PermissionError:
            if not oflags & os.O_NOATIME:
                raise
            return os.open(_proc(h.fd), oflags & ~os.O_NOATIME)

    def _open_sync(self, node: LocalNode, h: _Fd, flags: int) -> LocalOpenFile:
        fd = self._reopen(h, node.fmt, node.cfmt, flags)
        if flags & P.L_O_TRUNC:
            with contextlib.suppress(OSError):
                node.qid = self._qid_st(os.fstat(fd))._replace(type=node.qid.type)
        f = LocalOpenFile(node, fd, flags, self._incref(h), node.fmt == stat.S_IFDIR)
        self._add_open(f)
        return f

    def _add_open(self, f: LocalOpenFile) -> None:
        with self._mu:
            f.h.pins += 1  # an open file's O_PATH fd stays while its fd is open (not parked)
            self._pool.nopen += 1
            self._open.add(f)
            self._open_by_ident.setdefault(f.h.ident, set()).add(f)

    async def create(
        self, dir: LocalNode, name: str, flags: int, mode: int, cred: Cred
    ) -> tuple[LocalNode, LocalOpenFile]:
        dh = self._dir(dir)
        bname = self._bname(name, creating=True)
        self._ro()
        return await self._held((dir,), self._create_sync, dh, bname, flags, mode, cred)

    def _create_sync(
        self, dh: _Fd, bname: bytes, flags: int, mode: int, cred: Cred
    ) -> tuple[LocalNode, LocalOpenFile]:
        if flags & P.L_O_DIRECTORY:
            raise FsError(errno.EINVAL)
        oflags = dotl_to_host(flags & ~P.L_O_NOATIME)
        try:
            fd = self.creds.create_file(dh.fd, bname, oflags, mode, cred)
        except FileExistsError:
            if flags & P.L_O_EXCL:
                raise
            # open(O_CREAT) of an existing name: open it like Tlopen (regular files only).
            h, st = self._lookup(dh, bname)
            node = self._make_node(h, st, dh, bname)
            try:
                return node, self._open_sync(node, h, flags)
            except BaseException:
                self._release_sync(node)
                raise
        try:
            pfd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(pfd)
        except BaseException:
            os.close(fd)
            raise
        node = self._make_node(self._pool.new(pfd, st.st_dev, st.st_ino), st, dh, bname)
        f = LocalOpenFile(node, fd, flags, self._incref(node.h), False)
        self._add_open(f)
        return node, f

    async def close(self, f: LocalOpenFile) -> None:
        with self._mu:
            if f.closed:
                return
            f.closed = True
            if f.busy:
                f.close_pending = True  # the last call still using f.fd closes it
                return
        try:
            with trio.CancelScope(shield=True):
                await self._quick(self._close_sync, f)
        except OSError:
            log.exception("close failed")

    def _close_sync(self, f: LocalOpenFile) -> None:
        try:
            self._release_locks_sync(f, None)
        finally:
            fd = self._forget_open(f)
            if fd is not None:
                os.close(fd)

    def _forget_open(self, f: LocalOpenFile) -> int | None:
        """Unregister f and hand back its fd to close; None if that was done already (aclose
        racing a deferred close)."""
        with self._mu:
            self._open.discard(f)
            same = self._open_by_ident.get(f.h.ident)
            if same is not None:
                same.discard(f)
                if not same:
                    del self._open_by_ident[f.h.ident]
            if f.parked:  # its fd was closed already, and its pin dropped
                f.parked = False
                self._decref_locked(f.h)
                return None
            if f.fd is None:
                return None
            fd, f.fd = f.fd, None
            f.h.pins -= 1
            self._pool.nopen -= 1
            self._decref_locked(f.h)
            return fd

    @staticmethod
    def _fd(f: LocalOpenFile) -> None:
        if f.closed or (f.fd is None and not f.parked):
            raise FsError(errno.EBADF)

    async def read(self, f: LocalOpenFile, offset: int, count: int) -> bytes:
        self._fd(f)
        if offset < 0 or count < 0:
            raise FsError(errno.EINVAL)
        return await self._infile(f, os.pread, count, offset)

    async def write(self, f: LocalOpenFile, offset: int, data: bytes | memoryview) -> int:
        self._fd(f)
        if offset < 0:
            raise FsError(errno.EINVAL)
        return await self._infile(f, os.pwrite, data, offset, quick=True)

    async def write_from(self, f: LocalOpenFile, offset: int, pwrite: Callable[[int, int], int]) -> int:
        """`write` whose data `pwrite(fd, offset)` writes itself (zero-copy from guest memory)."""
        self._fd(f)
        if offset < 0:
            raise FsError(errno.EINVAL)
        return await self._infile(f, pwrite, offset, quick=True)

    async def fsync(self, f: LocalOpenFile, datasync: bool) -> None:
        await self._infile(f, os.fdatasync if datasync else os.fsync)

    # -- readdir ----------------------------------------------------------------------------------

    async def readdir(self, f: LocalOpenFile, offset: int, max_entries: int) -> list[DirEntry]:
        self._fd(f)
        if not f.is_dir:
            raise FsError(errno.ENOTDIR)
        if max_entries <= 0:
            return []
        return await self._infile(f, self._readdir_sync, f, offset, max_entries)

    def _entry(
        self, dirfd: int, dev: int, ino: int, dtype: int, name: bytes
    ) -> tuple[Qid, int] | None:
        """(qid, d_type) of one directory entry, None if it vanished. Directories may be mount
        points (their d_ino is the covered inode) and are stat'ed; so is everything under a
        model that maps modes; other entries take d_ino on the directory's device."""
        maps = self.creds.maps_modes
        if dtype in (P.DT_DIR, P.DT_UNKNOWN) or self.multidevs == "forbid" or maps:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            mode = st.st_mode
            if maps and stat.S_ISREG(mode):
                mode = self.creds.map_mode_at(dirfd, name, mode)
            dtype = _FMT_DT.get(stat.S_IFMT(mode), P.DT_UNKNOWN)
            try:
                return Qid(_qtype(mode), 0, self._qpath(st.st_dev, st.st_ino)), dtype
            except FsError:
                return Qid(_qtype(mode), 0, ino), dtype
        return Qid(_DT_QT.get(dtype, P.QTFILE), 0, self._qpath(dev, ino)), dtype

    def _readdir_sync(
        self, fd: int, f: LocalOpenFile, offset: int, max_entries: int
    ) -> list[DirEntry]:
        h = f.h
        at_root = h.ident == self._root.ident
        out: list[DirEntry] = []
        real = self.creds.real_dtypes
        with f.dir_mu:
            while len(out) < max_entries:
                ents = _linux.getdents(fd, offset)
                if not ents:
                    break
                for ino, off, dtype, name in ents:
                    offset = off
                    if name == b".":
                        q: Qid | None = Qid(P.QTDIR, 0, self._qpath(h.dev, h.ino))
                        dtype = P.DT_DIR
                    elif name == b"..":
                        if at_root:
                            q = Qid(P.QTDIR, 0, self._qpath(h.dev, h.ino))
                        else:
                            e = self._entry(fd, h.dev, ino, P.DT_DIR, name)
                            q = e[0] if e is not None else None
                        dtype = P.DT_DIR
                    elif self.creds.reserved_name(name):
                        continue
                    else:
                        e = self._entry(fd, h.dev, ino, dtype, name)
                        if e is None:
                            continue  # vanished meanwhile
                        q, dtype = e
                    if q is None:
                        continue
                    out.append(DirEntry(q, off, dtype if real else P.DT_UNKNOWN, os.fsdecode(name)))
                    if len(out) >= max_entries:
                        break
        return out

    # -- creating names ---------------------------------------------------------------------------

    def _new_qid(self, dh: _Fd, bname: bytes) -> Qid:
        fd = _linux.lookup(dh.fd, bname, os.O_PATH)
        try:
            return self._qid_st(os.fstat(fd), fd, (dh.fd, bname))
        finally:
            os.close(fd)

    async def mkdir(self, dir: LocalNode, name: str, mode: int, cred: Cred) -> Qid:
        dh = self._dir(dir)
        bname = self._bname(name, creating=True)
        self._ro()

        def run() -> Qid:
            self.creds.create_dir(dh.fd, bname, mode, cred)
            return self._new_qid(dh, bname)

        return await self._held((dir,), run)

    async def symlink(self, dir: LocalNode, name: str, target: str, cred: Cred) -> Qid:
        dh = self._dir(dir)
        bname = self._bname(name, creating=True)
        self._ro()
        btarget = os.fsencode(target)
        if not btarget or b"\0" in btarget:
            raise FsError(errno.ENOENT if not btarget else errno.EINVAL)

        def run() -> Qid:
            self.creds.create_symlink(dh.fd, bname, btarget, cred)
            return self._new_qid(dh, bname)

        return await self._held((dir,), run)

    async def mknod(
        self, dir: LocalNode, name: str, mode: int, major: int, minor: int, cred: Cred
    ) -> Qid:
        dh = self._dir(dir)
        bname = self._bname(name, creating=True)
        self._ro()
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        rdev = os.makedev(major, minor) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0

        def run() -> Qid:
            self.creds.create_node(dh.fd, bname, fmt, mode & 0o7777, rdev, cred)
            return self._new_qid(dh, bname)

        return await self._held((dir,), run)

    async def link(self, dir: LocalNode, name: str, target: LocalNode) -> None:
        dh = self._dir(dir)
        th = self._alive(target)
        bname = self._bname(name, creating=True)
        self._ro()
        if target.fmt == stat.S_IFDIR:
            raise FsError(errno.EPERM)
        if not self.creds.needs_location:
            await self._held((dir, target), lambda: _linux.link_fd(th.fd, dh.fd, bname))
            return

        def run() -> None:
            # Models keeping metadata by name link the metadata too.
            with self._ns:
                tp, tname = self._locate(target)
                try:
                    _linux.link_fd(th.fd, dh.fd, bname)
                    self.creds.after_link(tp.fd, tname, dh.fd, bname)
                finally:
                    with self._mu:
                        self._decref_locked(tp)

        await self._held((dir, target), run)

    async def readlink(self, node: LocalNode) -> str:
        h = self._alive(node)
        if node.cfmt != stat.S_IFLNK:
            raise FsError(errno.EINVAL)
        return os.fsdecode(await self._held((node,), lambda: self.creds.readlink(h.fd)))

    # -- renames and removals ---------------------------------------------------------------------

    def _locate(self, node: LocalNode) -> tuple[_Fd, bytes]:
        """The (directory, name) entry that currently names `node`, checked by (dev, ino).
        Directories whose recorded entry is stale are found again through '..'. Caller holds
        self._ns; the returned _Fd carries a reference the caller drops."""
        h = self._alive(node)
        if h.ident == self._root.ident:
            raise FsError(errno.EBUSY)
        with self._mu:
            parent = node.parent
            name = node.name
            if parent is not None:
                parent.refs += 1
        if parent is not None:
            try:
                st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == h.ident:
                    return parent, name
            except FileNotFoundError:
                pass
            with self._mu:
                self._decref_locked(parent)
        if node.fmt != stat.S_IFDIR:
            raise FsError(errno.ENOENT)
        ph, _ = self._dotdot(h)
        try:
            if ph.ident == h.ident:
                raise FsError(errno.EBUSY)
            found = self._find_name(ph.fd, h)
        except BaseException:
            with self._mu:
                self._decref_locked(ph)
            raise
        with self._mu:
            # Remember the rediscovered place for next time.
            self._unregister(node)
            self._decref_locked(node.parent)
            ph.refs += 1
            node.parent, node.name = ph, found
            self._register(node)
        return ph, found

    def _find_name(self, pathfd: int, h: _Fd) -> bytes:
        dirfd = os.open(_proc(pathfd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return self._find_name_in(dirfd, h)
        finally:
            os.close(dirfd)

    def _find_name_in(self, dirfd: int, h: _Fd) -> bytes:
        off = 0
        candidates: list[bytes] = []
        while True:
            ents = _linux.getdents(dirfd, off)
            if not ents:
                break
            for ino, o, dtype, name in ents:
                off = o
                if name in (b".", b".."):
                    continue
                if ino == h.ino:
                    candidates.insert(0, name)
                elif dtype in (P.DT_DIR, P.DT_UNKNOWN):
                    candidates.append(name)  # a mount point's d_ino differs
        for name in candidates:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) == h.ident:
                return name
        raise FsError(errno.ENOENT)

    def _moved(
        self, od: tuple[int, int], oname: bytes, nd: _Fd, nname: bytes, ident: tuple[int, int]
    ) -> None:
        """Registry fix-up after a rename: nodes at the old entry follow the file; nodes at the
        replaced destination entry lose their place. Caller holds self._ns."""
        with self._mu:
            dst = self._at.pop((nd.dev, nd.ino, nname), set())
            for n in list(dst):
                if n.h.ident != ident:
                    self._decref_locked(n.parent)
                    n.parent, n.name = None, b""
                    dst.discard(n)
            if dst:
                self._at[(nd.dev, nd.ino, nname)] = dst
            src = self._at.get((od[0], od[1], oname), set())
            for n in list(src):
                if n.h.ident == ident:
                    self._unregister(n)
                    self._decref_locked(n.parent)
                    nd.refs += 1
                    n.parent, n.name = nd, nname
                    self._register(n)

    def _unlinked(self, d: tuple[int, int], name: bytes) -> None:
        with self._mu:
            for n in self._at.pop((d[0], d[1], name), set()):
                self._decref_locked(n.parent)
                n.parent, n.name = None, b""

    async def rename(self, node: LocalNode, newdir: LocalNode | None, newname: str) -> None:
        """Trename; `newdir` None renames within the directory the node is in now."""
        self._alive(node)
        nh0 = self._dir(newdir) if newdir is not None else None
        nname = self._bname(newname, creating=True)
        self._ro()

        def run() -> None:
            with self._ns:
                ph, oname = self._locate(node)
                try:
                    nh = nh0 if nh0 is not None else ph
                    self._keep_open_at(nh.fd, nname)  # the file it replaces, if any
                    os.rename(oname, nname, src_dir_fd=ph.fd, dst_dir_fd=nh.fd)
                    self.creds.after_rename(ph.fd, oname, nh.fd, nname)
                    self._moved(ph.ident, oname, nh, nname, node.h.ident)
                finally:
                    with self._mu:
                        self._decref_locked(ph)

        await self._held((node,) if newdir is None else (node, newdir), run)

    async def renameat(
        self, olddir: LocalNode, oldname: str, newdir: LocalNode, newname: str
    ) -> None:
        oh = self._dir(olddir)
        nh = self._dir(newdir)
        oname = self._bname(oldname)
        nname = self._bname(newname, creating=True)
        self._ro()

        def run() -> None:
            with self._ns:
                st = os.stat(oname, dir_fd=oh.fd, follow_symlinks=False)
                self._keep_open_at(nh.fd, nname)  # the file it replaces, if any
                os.rename(oname, nname, src_dir_fd=oh.fd, dst_dir_fd=nh.fd)
                self.creds.after_rename(oh.fd, oname, nh.fd, nname)
                self._moved(oh.ident, oname, nh, nname, (st.st_dev, st.st_ino))

        await self._held((olddir, newdir), run)

    async def unlinkat(self, dir: LocalNode, name: str, flags: int) -> None:
        dh = self._dir(dir)
        bname = self._bname(name)
        self._ro()
        if flags & ~P.AT_REMOVEDIR:
            raise FsError(errno.EINVAL)

        def run() -> None:
            with self._ns:
                self._unlink_entry(dh.fd, bname, bool(flags & P.AT_REMOVEDIR))
                self._unlinked(dh.ident, bname)

        await self._held((dir,), run)

    def _keep_open_at(self, dirfd: int, name: bytes) -> None:
        """Before the entry (dirfd, name) goes away: see _keep_open."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            return
        self._keep_open((st.st_dev, st.st_ino))

    def _unlink_entry(self, dirfd: int, name: bytes, is_dir: bool) -> None:
        self._keep_open_at(dirfd, name)
        self.creds.before_unlink(dirfd, name, is_dir)
        if is_dir:
            os.rmdir(name, dir_fd=dirfd)
        else:
            os.unlink(name, dir_fd=dirfd)
        self.creds.after_unlink(dirfd, name, is_dir)

    async def remove(self, node: LocalNode) -> None:
        self._alive(node)
        self._ro()

        def run() -> None:
            with self._ns:
                ph, name = self._locate(node)
                try:
                    self._unlink_entry(ph.fd, name, node.fmt == stat.S_IFDIR)
                    self._unlinked(ph.ident, name)
                finally:
                    with self._mu:
                        self._decref_locked(ph)

        await self._held((node,), run)

    async def statfs(self, node: LocalNode) -> StatFs:
        h = self._alive(node)
        t, bsize, blocks, bfree, bavail, files, ffree, fsid, namelen = await self._held(
            (node,), lambda: _linux.fstatfs(h.fd)
        )
        return StatFs(t, bsize, blocks, bfree, bavail, files, ffree, fsid, namelen)

    # -- xattrs -------------------------------------------------------------------------------------

    def _xname(self, name: str, write: bool) -> None:
        if not name or len(name.encode()) > 255:
            raise FsError(errno.ERANGE if name else errno.EINVAL)
        if write:
            self._ro()
        # Which names a client may touch is the credential model's business (its xattr_* hooks).

    async def xattr_get(self, node: LocalNode, name: str) -> bytes:
        h = self._alive(node)
        self._xname(name, False)
        return await self._held((node,), lambda: self.creds.xattr_get(h.fd, name))

    async def xattr_list(self, node: LocalNode) -> list[str]:
        h = self._alive(node)
        return await self._held((node,), lambda: self.creds.xattr_list(h.fd))

    async def xattr_set(self, node: LocalNode, name: str, value: bytes, flags: int) -> None:
        h = self._alive(node)
        self._xname(name, True)
        if flags & ~(P.XATTR_CREATE | P.XATTR_REPLACE):
            raise FsError(errno.EINVAL)
        if len(value) > P.XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        hflags = (os.XATTR_CREATE if flags & P.XATTR_CREATE else 0) | (
            os.XATTR_REPLACE if flags & P.XATTR_REPLACE else 0
        )
        data = bytes(value)
        await self._held((node,), lambda: self.creds.xattr_set(h.fd, name, data, hflags))

    async def xattr_remove(self, node: LocalNode, name: str) -> None:
        h = self._alive(node)
        self._xname(name, True)
        await self._held((node,), lambda: self.creds.xattr_remove(h.fd, name))

    # -- locks ----------------------------------------------------------------------------------------

    def _lock_fd(self, fd: int, f: LocalOpenFile, fl: _FileLocks, key: Hashable) -> int:
        """The OFD-lock fd of owner `key` on this file (one per (file, owner), shared by all
        the owner's fids, so the owner never conflicts with itself)."""
        lfd = fl.fds.get(key)
        if lfd is not None:
            return lfd
        base = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        if f.is_dir:
            lfd = os.open(_proc(fd), os.O_RDONLY | os.O_DIRECTORY | base)
        else:
            try:
                if self.info.readonly:
                    raise PermissionError(errno.EROFS, "readonly")
                lfd = os.open(_proc(fd), os.O_RDWR | base)
            except PermissionError:
                lfd = os.open(_proc(fd), dotl_to_host(f.flags & P.L_O_ACCMODE) | base)
        fl.fds[key] = lfd
        return lfd

    def _drop_owner(self, ident: tuple[int, int], fl: _FileLocks, key: Hashable) -> None:
        fl.table.drop(key)
        lfd = fl.fds.pop(key, None)
        if lfd is not None:
            os.close(lfd)  # drops every OFD lock of this owner on the file
        if not fl.fds:
            self._locks.pop(ident, None)

    async def lock(self, f: LocalOpenFile, lock: Lock, owner: LockOwner) -> int:
        self._fd(f)
        check_lock_request(lock, f.flags)
        return await self._infile(f, self._lock_sync, f, lock, owner)

    def _lock_sync(self, fd: int, f: LocalOpenFile, lock: Lock, owner: LockOwner) -> int:
        key = owner_key(owner)
        ident = f.h.ident
        start, end = span(lock.start, lock.length)
        length = 0 if end is None else end - start
        with self._lk:
            fl = self._locks.get(ident)
            if lock.type == P.LOCK_TYPE_UNLCK:
                if fl is None or key not in fl.fds:
                    return P.LOCK_SUCCESS
                _linux.ofd_setlk(fl.fds[key], lock.type, start, length)
                fl.table.apply(key, lock.type, start, end)
                if key not in fl.table.owners():
                    self._drop_owner(ident, fl, key)
                return P.LOCK_SUCCESS
            if fl is None:
                fl = self._locks[ident] = _FileLocks()
            new = key not in fl.fds
            try:
                lfd = self._lock_fd(fd, f, fl, key)
                ok = _linux.ofd_setlk(lfd, lock.type, start, length)
            except BaseException:
                if new:
                    self._drop_owner(ident, fl, key)
                raise
            if not ok:
                if new:
                    self._drop_owner(ident, fl, key)
                return P.LOCK_BLOCKED
            fl.table.apply(key, lock.type, start, end)
            f.lock_owners.add(key)
            return P.LOCK_SUCCESS

    async def getlock(self, f: LocalOpenFile, lock: Lock, owner: LockOwner) -> Lock:
        self._fd(f)
        check_getlock_request(lock)
        return await self._infile(f, self._getlock_sync, f, lock, owner)

    def _getlock_sync(self, fd: int, f: LocalOpenFile, lock: Lock, owner: LockOwner) -> Lock:
        key = owner_key(owner)
        ident = f.h.ident
        start, end = span(lock.start, lock.length)
        length = 0 if end is None else end - start
        with self._lk:
            fl = self._locks.get(ident)
            temp = fl is None or key not in fl.fds
            if temp:
                fl = _FileLocks()
            assert fl is not None
            try:
                lfd = self._lock_fd(fd, f, fl, key)
                t, s, ln, pid = _linux.ofd_getlk(lfd, lock.type, start, length)
            finally:
                if temp:
                    os.close(fl.fds.pop(key))
            if t == P.LOCK_TYPE_UNLCK:
                return Lock(
                    P.LOCK_TYPE_UNLCK, lock.start, lock.length, lock.proc_id, lock.client_id
                )
            real = self._locks.get(ident)
            r = real.table.conflict(key, lock.type, start, end) if real is not None else None
            if r is not None:
                assert isinstance(r.owner, tuple)
                _, client_id, proc_id = r.owner
                return Lock(
                    r.type, r.start, 0 if r.end is None else r.end - r.start, proc_id, client_id
                )
            # Held by another process on the host.
            return Lock(t, s, ln, max(pid, 0), "")

    async def release_locks(self, f: LocalOpenFile, owner: LockOwner | None) -> None:
        try:
            await self._run(self._release_locks_sync, f, owner)
        except OSError:
            log.exception("release_locks failed")

    def _release_locks_sync(self, f: LocalOpenFile, owner: LockOwner | None) -> None:
        keys = {owner_key(owner)} if owner is not None else set(f.lock_owners)
        ident = f.h.ident
        with self._lk:
            fl = self._locks.get(ident)
            for k in keys:
                if fl is not None and k in fl.fds:
                    self._drop_owner(ident, fl, k)
            f.lock_owners -= keys

    # -- shutdown -------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._aclose_sync)

    def _aclose_sync(self) -> None:
        for f in list(self._open):
            f.closed = True
            with contextlib.suppress(OSError):
                self._close_sync(f)
        for n in list(self._live):
            self._release_sync(n)
        with self._lk:
            for fl in self._locks.values():
                for lfd in fl.fds.values():
                    os.close(lfd)
            self._locks.clear()
        with self._mu:
            self._decref_locked(self._root)
        self._pool.close_all()


def backend_for_model(
    export: str,
    *,
    model: str | None = None,
    readonly: bool = False,
    multidevs: Literal["remap", "forbid", "warn"] = "remap",
    options: Any = None,
) -> LocalBackend:
    """A LocalBackend under the security model named as QEMU names them (the CLI's hook).
    `options` may carry `fmode`/`dmode` (mapped models). Raises ValueError for a model this
    build lacks and PermissionError for passthrough without root."""
    creds = credentials_for_model(
        model,
        fmode=getattr(options, "fmode", None),
        dmode=getattr(options, "dmode", None),
    )
    return LocalBackend(export, readonly=readonly, credentials=creds, multidevs=multidevs,
                        inline_metadata=getattr(options, "inline_metadata", None))


__all__ = [
    "LocalBackend",
    "LocalNode",
    "LocalOpenFile",
    "backend_for_model",
]
