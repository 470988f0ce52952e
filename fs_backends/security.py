"""Credential models of the local backend: how files are created, who owns them, what a client
sees of ownership and mode, and which xattr names and file names it may touch.

`fs_backends.local` resolves names (safely, relative to directory fds) and then hands the
directory fd and one checked name (or the object's own fd, plus where it lives) to the model,
which creates the object and records the client's credentials its own way. The four models are
QEMU's, and an export written by QEMU under a model reads the same here and the other way round:

- `PassthroughCredentials`: create, then chown to the client's uid/gid and set the exact mode
  (needs root).
- `NoneCredentials`: the same, but ownership-change failures at creation are ignored; files end up
  owned by the server's user.
- `MappedXattrCredentials`: files owned by the server; the client's uid/gid/mode/rdev in
  user.virtfs.* xattrs; device nodes, fifos, sockets and symlinks stored as regular files.
- `MappedFileCredentials`: the same kept in `.virtfs_metadata/<name>` files, hidden and refused.

A model must never resolve a path with more than one component or follow a symlink: it only ever
gets a directory fd plus one name, or an fd of the object itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
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
    #: whether map_stat/chmod/chown need the object's (directory fd, name) location and the
    #: namespace hooks below must run (metadata kept by name, as mapped-file does)
    needs_location = False

    # `loc` is (directory fd, name) of the object, (root fd, b".") for the export root, or None
    # when the backend cannot tell (then only what the object itself carries is used).

    def map_stat(self, fd: int, st: Statx, loc: tuple[int, bytes] | None = None) -> Statx:
        """What the client sees of mode/uid/gid/rdev of the object `fd` refers to."""
        return st

    def map_mode(self, fd: int, host_mode: int, loc: tuple[int, bytes] | None = None) -> int:
        """The st_mode the client sees for the object `fd` (an O_PATH fd) refers to."""
        return host_mode

    def map_mode_at(self, dirfd: int, name: bytes, host_mode: int) -> int:
        """The same for entry `name` of directory `dirfd` (readdir, without opening it)."""
        return host_mode

    def readlink(self, fd: int) -> bytes:
        return _readlink_fd(fd)

    # -- changes ---------------------------------------------------------------------------

    def chmod(self, fd: int, fmt: int, mode: int, loc: tuple[int, bytes] | None = None) -> None:
        if fmt == stat.S_IFLNK:
            raise FsError(errno.EOPNOTSUPP)
        os.chmod(_proc(fd), mode & 0o7777)

    def chown(self, fd: int, uid: int, gid: int, loc: tuple[int, bytes] | None = None) -> None:
        """Change owner; -1 keeps a field. (-1, -1) still updates ctime."""
        _linux.fchown_fd(fd, uid, gid)

    # -- namespace changes (after the backend checked and did them on the host) ---------------

    def after_rename(self, odirfd: int, oname: bytes, ndirfd: int, nname: bytes) -> None:
        pass

    def before_unlink(self, dirfd: int, name: bytes, is_dir: bool) -> None:
        pass

    def after_unlink(self, dirfd: int, name: bytes, is_dir: bool) -> None:
        pass

    def after_link(self, odirfd: int, oname: bytes, ndirfd: int, nname: bytes) -> None:
        pass

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


def _host_modes(fmode: int, dmode: int) -> tuple[int, int]:
    """--fmode/--dmode of the mapped models: the host file must never carry setuid/setgid bits
    (the server owns it: a client could then make the host run its program as the server)."""
    if fmode & ~0o777:
        raise ValueError(f"fmode {fmode:o}: only permission bits (0..777) are allowed for host files")
    if dmode & ~0o1777:
        raise ValueError(f"dmode {dmode:o}: only permission and sticky bits are allowed for host directories")
    return fmode, dmode


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
        self.fmode, self.dmode = _host_modes(fmode, dmode)

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

    def map_stat(self, fd: int, st: Statx, loc: tuple[int, bytes] | None = None) -> Statx:
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

    def map_mode(self, fd: int, host_mode: int, loc: tuple[int, bytes] | None = None) -> int:
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

    def chmod(self, fd: int, fmt: int, mode: int, loc: tuple[int, bytes] | None = None) -> None:
        cur = self.map_mode(fd, os.fstat(fd).st_mode)
        self._set(fd, mode=stat.S_IFMT(cur) | (mode & 0o7777))

    def chown(self, fd: int, uid: int, gid: int, loc: tuple[int, bytes] | None = None) -> None:
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


_META_DIR = b".virtfs_metadata"
_META_ROOT = b".virtfs_metadata_root"
_META_KEYS = (("uid", b"virtfs.uid", 11), ("gid", b"virtfs.gid", 11),
              ("mode", b"virtfs.mode", 12), ("rdev", b"virtfs.rdev", 12))  # fmt: skip
_DIGITS = re.compile(rb"\s*([+-]?\d+)")


def _atoi(b: bytes) -> int:
    """C atoi: leading blanks, a sign, digits; 0 when there are none; wraps like an int."""
    m = _DIGITS.match(b)
    return ctypes.c_int(int(m.group(1))).value if m else 0


def _c_int(v: int) -> int:
    return ctypes.c_int(v).value


class MappedFileCredentials(Credentials):
    """QEMU's security_model=mapped-file: like mapped-xattr, but the client's uid/gid/mode/rdev
    are kept as "virtfs.uid=N" lines in `<dir>/.virtfs_metadata/<name>` (the export root's in
    `.virtfs_metadata_root`), byte-compatible with hw/9pfs/9p-local.c. Those names are hidden
    from listings and refused by every operation (CVE-2017-7493). xattrs pass through. Needs no
    privilege. The metadata files are only ever opened below a directory fd with O_NOFOLLOW."""

    name = "mapped-file"
    maps_modes = True
    needs_location = True

    def __init__(self, fmode: int = 0o600, dmode: int = 0o700) -> None:
        self.fmode, self.dmode = _host_modes(fmode, dmode)
        root = os.geteuid() == 0
        self.privileged_xattrs = root

    def reserved_name(self, name: bytes) -> bool:
        return name in (_META_DIR, _META_ROOT)

    # user.virtfs.* means nothing to this model, but it is mapped-xattr's metadata: a client
    # that planted it here would own its files (or make them setuid root, in the guest's eyes)
    # the day the export is served under mapped-xattr. Hidden and refused as mapped-xattr does.
    def check_xattr(self, name: str, write: bool) -> None:
        if name.startswith(_VIRTFS_PREFIX):
            raise FsError(errno.EACCES if write else errno.ENODATA)
        super().check_xattr(name, write)

    def filter_xattrs(self, names: list[str]) -> list[str]:
        return [n for n in super().filter_xattrs(names) if not n.startswith(_VIRTFS_PREFIX)]

    # -- the metadata files --------------------------------------------------------------------

    @staticmethod
    def _meta_dir(dirfd: int, create: bool) -> int | None:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(_META_DIR, 0o700, dir_fd=dirfd)
        try:
            return os.open(
                _META_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
            )
        except FileNotFoundError:
            return None

    def _read(self, dirfd: int, name: bytes) -> dict[str, int]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            if name == b".":
                fd = os.open(_META_ROOT, flags, dir_fd=dirfd)
            else:
                md = self._meta_dir(dirfd, False)
                if md is None:
                    return {}
                try:
                    fd = os.open(name, flags, dir_fd=md)
                finally:
                    os.close(md)
        except OSError as e:
            # Missing, or something planted there that is not a plain file/dir: no metadata.
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return {}
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        out: dict[str, int] = {}
        for line in data.split(b"\n"):
            for key, prefix, skip in _META_KEYS:
                if line.startswith(prefix):
                    out[key] = _atoi(line[skip:])
                    break
        return out

    def _write(self, dirfd: int, name: bytes, **new: int) -> None:
        vals = self._read(dirfd, name)
        for k, v in new.items():
            if v != -1:
                vals[k] = v
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        if name == b".":
            fd = os.open(_META_ROOT, flags, 0o600, dir_fd=dirfd)
        else:
            md = self._meta_dir(dirfd, True)
            if md is None:
                raise FsError(errno.ENOENT)
            try:
                fd = os.open(name, flags, 0o600, dir_fd=md)
            finally:
                os.close(md)
        try:
            os.fchmod(fd, 0o600)
            text = b"".join(
                b"virtfs.%s=%d\n" % (k.encode(), _c_int(vals[k]))
                for k, _, _ in _META_KEYS
                if k in vals and _c_int(vals[k]) != -1
            )
            os.write(fd, text)
        finally:
            os.close(fd)

    def _record(self, dirfd: int, name: bytes, rmdir: bool, **attrs: int) -> None:
        try:
            self._write(dirfd, name, **attrs)
        except BaseException:
            _unlink_quietly(dirfd, name, rmdir)
            raise

    # -- creation ------------------------------------------------------------------------------

    def create_file(self, dirfd: int, name: bytes, oflags: int, mode: int, cred: Cred) -> int:
        fd = os.open(
            name,
            oflags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
            self.fmode,
            dir_fd=dirfd,
        )
        try:
            os.fchmod(fd, self.fmode)
            self._record(
                dirfd, name, False, uid=cred.uid, gid=cred.gid, mode=stat.S_IFREG | (mode & 0o7777)
            )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def create_dir(self, dirfd: int, name: bytes, mode: int, cred: Cred) -> None:
        os.mkdir(name, self.dmode, dir_fd=dirfd)
        self._fix_mode(dirfd, name, stat.S_IFDIR, self.dmode)
        self._record(
            dirfd, name, True, uid=cred.uid, gid=cred.gid, mode=stat.S_IFDIR | (mode & 0o7777)
        )

    def create_node(
        self, dirfd: int, name: bytes, fmt: int, mode: int, rdev: int, cred: Cred
    ) -> None:
        os.mknod(name, stat.S_IFREG | self.fmode, 0, dir_fd=dirfd)
        self._fix_mode(dirfd, name, stat.S_IFREG, self.fmode)
        self._record(
            dirfd, name, False,
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
        except BaseException:
            _unlink_quietly(dirfd, name, False)
            raise
        finally:
            os.close(fd)
        self._record(dirfd, name, False, uid=cred.uid, gid=cred.gid, mode=stat.S_IFLNK | 0o777)

    @staticmethod
    def _fix_mode(dirfd: int, name: bytes, fmt: int, mode: int) -> None:
        # The exact host mode regardless of umask, on the object just made (never a symlink).
        fd = _linux.lookup(dirfd, name, os.O_PATH)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != fmt:
                raise FsError(errno.EAGAIN)
            os.chmod(_proc(fd), mode)
        finally:
            os.close(fd)

    # -- reading back --------------------------------------------------------------------------

    def map_stat(self, fd: int, st: Statx, loc: tuple[int, bytes] | None = None) -> Statx:
        if loc is not None:
            m = self._read(*loc)
            st.uid = m.get("uid", st.uid) & 0xFFFFFFFF
            st.gid = m.get("gid", st.gid) & 0xFFFFFFFF
            st.mode = m.get("mode", st.mode) & 0xFFFFFFFF
            if "rdev" in m:
                st.rdev = m["rdev"] & 0xFFFFFFFF
        return st

    def map_mode(self, fd: int, host_mode: int, loc: tuple[int, bytes] | None = None) -> int:
        if loc is None:
            return host_mode
        return self._read(*loc).get("mode", host_mode) & 0xFFFFFFFF

    def map_mode_at(self, dirfd: int, name: bytes, host_mode: int) -> int:
        return self._read(dirfd, name).get("mode", host_mode) & 0xFFFFFFFF

    readlink = MappedXattrCredentials.readlink

    # -- changes -------------------------------------------------------------------------------

    def chmod(self, fd: int, fmt: int, mode: int, loc: tuple[int, bytes] | None = None) -> None:
        if loc is None:
            raise FsError(errno.ENOENT)
        cur = self.map_mode(fd, os.fstat(fd).st_mode, loc)
        self._write(*loc, mode=stat.S_IFMT(cur) | (mode & 0o7777))

    def chown(self, fd: int, uid: int, gid: int, loc: tuple[int, bytes] | None = None) -> None:
        if uid == -1 and gid == -1:
            _linux.fchown_fd(fd, -1, -1)
            return
        if loc is None:
            raise FsError(errno.ENOENT)
        self._write(*loc, uid=uid, gid=gid)

    # -- the metadata follows the names ----------------------------------------------------------

    def after_rename(self, odirfd: int, oname: bytes, ndirfd: int, nname: bytes) -> None:
        nmd = self._meta_dir(ndirfd, True)
        if nmd is None:
            raise FsError(errno.ENOENT)
        try:
            omd = self._meta_dir(odirfd, False)
            try:
                if omd is None:
                    raise FileNotFoundError
                os.rename(oname, nname, src_dir_fd=omd, dst_dir_fd=nmd)
            except FileNotFoundError:
                # No metadata moved: do not let the replaced file's metadata linger.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(nname, dir_fd=nmd)
            finally:
                if omd is not None:
                    os.close(omd)
        finally:
            os.close(nmd)

    def before_unlink(self, dirfd: int, name: bytes, is_dir: bool) -> None:
        if not is_dir:
            return
        # A directory's own metadata directory would keep it from being removed.
        try:
            vfd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
            )
        except OSError:
            return  # let the real rmdir report it
        try:
            md = self._meta_dir(vfd, False)
            if md is None:
                return
            try:
                if any(os.fsencode(n) != _META_DIR for n in os.listdir(vfd)):
                    raise FsError(errno.ENOTEMPTY)
                for n in os.listdir(md):  # metadata of names that no longer exist
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(n, dir_fd=md)
            finally:
                os.close(md)
            os.rmdir(_META_DIR, dir_fd=vfd)
        finally:
            os.close(vfd)

    def after_unlink(self, dirfd: int, name: bytes, is_dir: bool) -> None:
        md = self._meta_dir(dirfd, False)
        if md is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=md)
        finally:
            os.close(md)

    def after_link(self, odirfd: int, oname: bytes, ndirfd: int, nname: bytes) -> None:
        omd = self._meta_dir(odirfd, False)
        if omd is None:
            return
        try:
            nmd = self._meta_dir(ndirfd, True)
            if nmd is None:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.link(oname, nname, src_dir_fd=omd, dst_dir_fd=nmd, follow_symlinks=False)
            finally:
                os.close(nmd)
        finally:
            os.close(omd)


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
    if model == "mapped-file":
        return MappedFileCredentials(
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
    "MappedFileCredentials",
    "MappedXattrCredentials",
    "NoneCredentials",
    "PassthroughCredentials",
    "credentials_for_model",
    "default_credentials",
]
