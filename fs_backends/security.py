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

    #: whether map_mode/map_mode_at can differ from the host mode (False skips the calls)
    maps_modes = False

    def map_stat(self, fd: int, st: Statx) -> Statx:
        """What the client sees of mode/uid/gid/rdev of the object `fd` refers to."""
        return st

    def map_mode(self, fd: int, host_mode: int) -> int:
        """The st_mode the client sees for the object `fd` (an O_PATH fd) refers to."""
        return host_mode

    def map_mode_at(self, dirfd: int, name: bytes, host_mode: int) -> int:
        """The same for entry `name` of directory `dirfd` (readdir, without opening it)."""
        return host_mode

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

    # -- xattrs: all access goes through these, so a model can hide, rename or refuse names --

    def xattr_get(self, fd: int, name: str) -> bytes:
        self.check_xattr(name, False)
        # Following the /proc magic link lands on the object itself, symlinks included.
        return os.getxattr(_proc(fd), name)

    def xattr_list(self, fd: int) -> list[str]:
        return self.filter_xattrs(os.listxattr(_proc(fd)))

    def xattr_set(self, fd: int, name: str, value: bytes, flags: int) -> None:
        self.check_xattr(name, True)
        os.setxattr(_proc(fd), name, value, flags)

    def xattr_remove(self, fd: int, name: str) -> None:
        self.check_xattr(name, True)
        os.removexattr(_proc(fd), name)

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


_UID = "user.virtfs.uid"
_GID = "user.virtfs.gid"
_MODE = "user.virtfs.mode"
_RDEV = "user.virtfs.rdev"
_VIRTFS_PREFIX = "user.virtfs."
# POSIX ACLs cannot be stored as system.* on files the client does not really own; QEMU keeps
# them under user.virtfs. and shows them as the system.* names.
_ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
_PATH_MAX = 4096


def _get_u(path: str | bytes, name: str, size: int, follow: bool = True) -> int | None:
    try:
        v = os.getxattr(path, name, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM, errno.ENOTSUP):
            return None
        raise
    if not v:
        return None
    # QEMU reads into a variable of the type's size: shorter values fill its low bytes.
    return int.from_bytes(v[:size].ljust(size, b"\0"), "little")


class MappedXattrCredentials(Credentials):
    """QEMU's security_model=mapped-xattr: host files belong to the server's user, the client's
    uid/gid/mode/rdev live in user.virtfs.{uid,gid,mode,rdev} (little-endian u32/u32/u32/u64,
    byte-compatible with hw/9pfs/9p-local.c), device nodes, fifos, sockets and symlinks are
    stored as regular files (a symlink's target is the file's content), user.virtfs.* is hidden
    from the client. Needs no privilege."""

    name = "mapped-xattr"
    maps_modes = True  # readdir stats and maps every entry, so its d_type is the client's

    def __init__(self, fmode: int = 0o600, dmode: int = 0o700) -> None:
        self.fmode = fmode & 0o7777
        self.dmode = dmode & 0o7777

    # -- recording -------------------------------------------------------------------------

    @staticmethod
    def _set(
        fd: int,
        uid: int = -1,
        gid: int = -1,
        mode: int = -1,
        rdev: int = -1,
    ) -> None:
        p = _proc(fd)
        if uid != -1:
            os.setxattr(p, _UID, (uid & 0xFFFFFFFF).to_bytes(4, "little"))
        if gid != -1:
            os.setxattr(p, _GID, (gid & 0xFFFFFFFF).to_bytes(4, "little"))
        if mode != -1:
            os.setxattr(p, _MODE, (mode & 0xFFFFFFFF).to_bytes(4, "little"))
        if rdev != -1:
            os.setxattr(p, _RDEV, (rdev & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def _record_name(
        self, dirfd: int, name: bytes, host_fmt: int, rmdir: bool, **attrs: int
    ) -> None:
        try:
            fd = _linux.lookup(dirfd, name, os.O_PATH)
            try:
                if stat.S_IFMT(os.fstat(fd).st_mode) != host_fmt:
                    raise FsError(errno.EAGAIN)
                os.chmod(_proc(fd), self.dmode if rmdir else self.fmode)
                self._set(fd, **attrs)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(dirfd, name, rmdir)
            raise

    def create_file(self, dirfd: int, name: bytes, oflags: int, mode: int, cred: Cred) -> int:
        fd = os.open(
            name,
            oflags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
            self.fmode,
            dir_fd=dirfd,
        )
        try:
            os.fchmod(fd, self.fmode)
            self._set(fd, cred.uid, cred.gid, stat.S_IFREG | (mode & 0o7777))
        except BaseException:
            os.close(fd)
            _unlink_quietly(dirfd, name, False)
            raise
        return fd

    def create_dir(self, dirfd: int, name: bytes, mode: int, cred: Cred) -> None:
        os.mkdir(name, self.dmode, dir_fd=dirfd)
        self._record_name(
            dirfd, name, stat.S_IFDIR, True,
            uid=cred.uid, gid=cred.gid, mode=stat.S_IFDIR | (mode & 0o7777),
        )  # fmt: skip

    def create_node(
        self, dirfd: int, name: bytes, fmt: int, mode: int, rdev: int, cred: Cred
    ) -> None:
        os.mknod(name, stat.S_IFREG | self.fmode, 0, dir_fd=dirfd)
        self._record_name(
            dirfd, name, stat.S_IFREG, False,
            uid=cred.uid, gid=cred.gid, mode=fmt | (mode & 0o7777), rdev=rdev,
        )  # fmt: skip

    def create_symlink(self, dirfd: int, name: bytes, target: bytes, cred: Cred) -> None:
        fd = os.open(
            name,
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            self.fmode,
            dir_fd=dirfd,
        )
        try:
            view = memoryview(target)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, self.fmode)
            self._set(fd, cred.uid, cred.gid, stat.S_IFLNK | 0o777)
        except BaseException:
            _unlink_quietly(dirfd, name, False)
            raise
        finally:
            os.close(fd)

    # -- reading back ----------------------------------------------------------------------

    def map_stat(self, fd: int, st: Statx) -> Statx:
        p = _proc(fd)
        uid = _get_u(p, _UID, 4)
        gid = _get_u(p, _GID, 4)
        mode = _get_u(p, _MODE, 4)
        rdev = _get_u(p, _RDEV, 8)
        if uid is not None:
            st.uid = uid
        if gid is not None:
            st.gid = gid
        if mode is not None:
            st.mode = mode
        if rdev is not None:
            st.rdev = rdev
        return st

    def map_mode(self, fd: int, host_mode: int) -> int:
        mode = _get_u(_proc(fd), _MODE, 4)
        return host_mode if mode is None else mode

    def map_mode_at(self, dirfd: int, name: bytes, host_mode: int) -> int:
        # One component below our own directory fd, not following it: QEMU's *at emulation.
        mode = _get_u(b"/proc/self/fd/%d/" % dirfd + name, _MODE, 4, follow=False)
        return host_mode if mode is None else mode

    def readlink(self, fd: int) -> bytes:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return _readlink_fd(fd)  # a real symlink made on the host
        rfd = os.open(_proc(fd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            return os.pread(rfd, _PATH_MAX, 0)
        finally:
            os.close(rfd)

    # -- changes ---------------------------------------------------------------------------

    def chmod(self, fd: int, fmt: int, mode: int) -> None:
        cur = self.map_mode(fd, os.fstat(fd).st_mode)
        self._set(fd, mode=stat.S_IFMT(cur) | (mode & 0o7777))

    def chown(self, fd: int, uid: int, gid: int) -> None:
        if uid == -1 and gid == -1:
            _linux.fchown_fd(fd, -1, -1)  # only touches ctime, as QEMU does
        else:
            self._set(fd, uid=uid, gid=gid)

    # -- xattrs ----------------------------------------------------------------------------

    @staticmethod
    def _host_name(name: str) -> str:
        if name in _ACL_NAMES:
            return _VIRTFS_PREFIX + name
        if name.startswith("user."):
            if name.startswith(_VIRTFS_PREFIX):
                raise FsError(errno.EACCES)
            return name
        raise FsError(errno.EOPNOTSUPP)

    def xattr_get(self, fd: int, name: str) -> bytes:
        try:
            host = self._host_name(name)
        except FsError as e:
            if e.errno == errno.EACCES:
                raise FsError(errno.ENODATA) from None
            raise
        return os.getxattr(_proc(fd), host)

    def xattr_list(self, fd: int) -> list[str]:
        out = []
        for n in os.listxattr(_proc(fd)):
            if n.startswith(_VIRTFS_PREFIX):
                rest = n[len(_VIRTFS_PREFIX) :]
                if rest in _ACL_NAMES:
                    out.append(rest)
            elif n.startswith("user."):
                out.append(n)
        return out

    def xattr_set(self, fd: int, name: str, value: bytes, flags: int) -> None:
        os.setxattr(_proc(fd), self._host_name(name), value, flags)

    def xattr_remove(self, fd: int, name: str) -> None:
        host = self._host_name(name)
        try:
            os.removexattr(_proc(fd), host)
        except OSError as e:
            # Removing an ACL that was never set succeeds, as on a real filesystem.
            if not (e.errno == errno.ENODATA and name in _ACL_NAMES):
                raise

    def check_xattr(self, name: str, write: bool) -> None:
        self._host_name(name)

    def filter_xattrs(self, names: list[str]) -> list[str]:
        return [n for n in names if not n.startswith(_VIRTFS_PREFIX)]


def _unlink_quietly(dirfd: int, name: bytes, rmdir: bool) -> None:
    try:
        if rmdir:
            os.rmdir(name, dir_fd=dirfd)
        else:
            os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def credentials_for_model(
    model: str | None, *, fmode: int | None = None, dmode: int | None = None
) -> Credentials:
    """The credential model named as QEMU names them (None = the default for this process)."""
    if model in ("mapped", "mapped-xattr"):
        return MappedXattrCredentials(
            fmode if fmode is not None else 0o600, dmode if dmode is not None else 0o700
        )
    if fmode is not None or dmode is not None:
        raise ValueError("fmode/dmode only apply to the mapped security models")
    if model is None:
        return default_credentials()
    if model == "passthrough":
        return PassthroughCredentials()
    if model == "none":
        return NoneCredentials()
    raise ValueError(f"security model {model!r} is not available")


def default_credentials() -> Credentials:
    return PassthroughCredentials() if os.geteuid() == 0 else NoneCredentials()


__all__ = [
    "Credentials",
    "MappedXattrCredentials",
    "NoneCredentials",
    "PassthroughCredentials",
    "credentials_for_model",
    "default_credentials",
]
