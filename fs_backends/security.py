"""Credential models of the local backend: how files are created, who owns them, what a client
sees of ownership and mode, and which xattr names and file names it may touch.

`fs_backends.local` resolves names (safely, relative to directory fds) and then hands the
directory fd and one checked name to the model, which creates the object and records the
client's credentials its own way:

- `PassthroughCredentials`: create, then chown to the client's uid/gid and set the exact mode
  (needs root, like QEMU's security_model=passthrough).
- `NoneCredentials`: the same, but ownership-change failures at creation are ignored; files end up
  owned by the server's user (QEMU's security_model=none).

The hooks (`create_*`, `map_stat`, `chmod`/`chown`, `check_xattr`/`filter_xattrs`,
`reserved_name`, `readlink`) are shaped so that QEMU's mapped-xattr and mapped-file models fit
without touching the resolver. A model must never resolve a path with more than one component, or
follow a symlink: it only ever gets a directory fd plus one name, or an fd of the object itself.
"""

from __future__ import annotations

import errno
import os
import stat

from fs_backends import _linux
from fs_backends._linux import Statx
from fs_backends.base import Cred, FsError

_PRIVILEGED_XATTR_PREFIXES = ("trusted.", "security.")


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class Credentials:
    """The interface local.py calls; the base class is the passthrough behaviour without the
    root requirement. All methods are blocking (called from worker threads)."""

    name = "base"
    #: whether char/block device nodes may be created on the host
    allow_devices = False
    #: whether trusted.* / security.* xattrs pass through
    privileged_xattrs = False
    #: whether readdir may report d_type (mapped models store special files as regular files)
    real_dtypes = True
    #: whether failures to hand ownership to the client at creation time are ignored
    ignore_create_chown_errors = False

    def check_usable(self) -> None:
        """Raise if this model cannot work in this process (e.g. passthrough without root)."""

    # -- creation: each gets a directory fd and one name, creates the object, records cred ---

    def create_file(self, dirfd: int, name: bytes, oflags: int, mode: int, cred: Cred) -> int:
        """Create a regular file exclusively and return it opened with `oflags`."""
        fd = os.open(
            name,
            oflags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
            mode & 0o7777,
            dir_fd=dirfd,
        )
        try:
            self._own(fd, stat.S_IFREG, mode, cred)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def create_dir(self, dirfd: int, name: bytes, mode: int, cred: Cred) -> None:
        os.mkdir(name, mode & 0o7777, dir_fd=dirfd)
        self._own_name(dirfd, name, stat.S_IFDIR, mode, cred)

    def create_node(
        self, dirfd: int, name: bytes, fmt: int, mode: int, rdev: int, cred: Cred
    ) -> None:
        if fmt in (stat.S_IFCHR, stat.S_IFBLK) and not self.allow_devices:
            raise FsError(errno.EPERM)
        os.mknod(name, fmt | (mode & 0o7777), rdev, dir_fd=dirfd)
        self._own_name(dirfd, name, fmt, mode, cred)

    def create_symlink(self, dirfd: int, name: bytes, target: bytes, cred: Cred) -> None:
        os.symlink(target, name, dir_fd=dirfd)
        self._own_name(dirfd, name, stat.S_IFLNK, 0o777, cred)

    def _own_name(self, dirfd: int, name: bytes, fmt: int, mode: int, cred: Cred) -> None:
        fd = _linux.lookup(dirfd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != fmt:
                # Someone replaced what we just made; leave it alone.
                raise FsError(errno.EAGAIN)
            self._own(fd, fmt, mode, cred)
        finally:
            os.close(fd)

    def _own(self, fd: int, fmt: int, mode: int, cred: Cred) -> None:
        try:
            _linux.fchown_fd(fd, cred.uid, cred.gid)
        except OSError as e:
            if not (self.ignore_create_chown_errors and e.errno == errno.EPERM):
                raise
        if fmt != stat.S_IFLNK:
            # The exact mode, regardless of the server's umask.
            try:
                os.chmod(_proc(fd), mode & 0o7777)
            except OSError as e:
                if not (self.ignore_create_chown_errors and e.errno == errno.EPERM):
                    raise

    # -- reading back ----------------------------------------------------------------------

    def map_stat(self, fd: int, st: Statx) -> Statx:
        """What the client sees of mode/uid/gid/rdev of the object `fd` refers to."""
        return st

    def readlink(self, fd: int) -> bytes:
        return _readlink_fd(fd)

    # -- changes ---------------------------------------------------------------------------

    def chmod(self, fd: int, fmt: int, mode: int) -> None:
        if fmt == stat.S_IFLNK:
            raise FsError(errno.EOPNOTSUPP)
        os.chmod(_proc(fd), mode & 0o7777)

    def chown(self, fd: int, uid: int, gid: int) -> None:
        """Change owner; -1 keeps a field. (-1, -1) still updates ctime."""
        _linux.fchown_fd(fd, uid, gid)

    # -- names -----------------------------------------------------------------------------

    def check_xattr(self, name: str, write: bool) -> None:
        """Raise if the client may not read/write the xattr `name`."""
        if not self.privileged_xattrs and name.startswith(_PRIVILEGED_XATTR_PREFIXES):
            raise FsError(errno.EPERM)

    def filter_xattrs(self, names: list[str]) -> list[str]:
        if self.privileged_xattrs:
            return names
        return [n for n in names if not n.startswith(_PRIVILEGED_XATTR_PREFIXES)]

    def reserved_name(self, name: bytes) -> bool:
        """Names the client may neither see nor touch (mapped-file's metadata directory)."""
        return False


def _readlink_fd(fd: int) -> bytes:
    # readlinkat(fd, "") reads the symlink an O_PATH fd refers to.
    return os.readlink(b"", dir_fd=fd)


class PassthroughCredentials(Credentials):
    """Files get the client's uid/gid and exact mode; needs root (CAP_CHOWN, CAP_MKNOD...)."""

    name = "passthrough"
    allow_devices = True
    privileged_xattrs = True

    def check_usable(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError(errno.EPERM, "security model passthrough needs root")


class NoneCredentials(Credentials):
    """Like passthrough, but files are created as the server's user when chown is refused."""

    name = "none"
    ignore_create_chown_errors = True

    def __init__(self) -> None:
        root = os.geteuid() == 0
        self.allow_devices = root
        self.privileged_xattrs = root


def default_credentials() -> Credentials:
    return PassthroughCredentials() if os.geteuid() == 0 else NoneCredentials()


__all__ = [
    "Credentials",
    "NoneCredentials",
    "PassthroughCredentials",
    "default_credentials",
]
