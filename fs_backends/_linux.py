"""Linux syscalls the standard library does not offer, via ctypes: openat2, getdents64, statx,
fchownat/utimensat/linkat with AT_EMPTY_PATH, and OFD byte-range locks.

All functions are blocking and raise OSError with the errno; callers run them in worker threads.
This module must never resolve a path string that leaves a directory fd (no path joining here).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_getdents64 = 217
SYS_openat2 = 437

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

F_OFD_GETLK = 36
F_OFD_SETLK = 37

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on x86-64 / aarch64


def _err(path: str | None = None) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e), path) if path else OSError(e, os.strerror(e))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have_openat2: bool | None = None


def openat2_supported() -> bool:
    global _have_openat2
    if _have_openat2 is None:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_BENEATH)
        fd = _syscall(SYS_openat2, AT_FDCWD, b".", ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            os.close(fd)
            _have_openat2 = True
        else:
            _have_openat2 = ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)
    return _have_openat2


def lookup(dirfd: int, name: bytes, flags: int) -> int:
    """Open one component `name` below `dirfd` without following any symlink (a trailing
    symlink is opened itself when flags has O_PATH|O_NOFOLLOW) and without leaving `dirfd`."""
    if b"/" in name or name in (b"", b".", b".."):
        raise OSError(errno.EINVAL, "bad name")
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if openat2_supported():
        how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
        fd = _syscall(SYS_openat2, dirfd, name, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            raise _err()
        return int(fd)
    return os.open(name, flags, dir_fd=dirfd)


# -- getdents64 -----------------------------------------------------------------------------

_DIRENT = struct.Struct("<QqHB")  # d_ino, d_off, d_reclen, d_type; then d_name


def getdents(fd: int, offset: int, bufsize: int = 32768) -> list[tuple[int, int, int, bytes]]:
    """Entries of directory `fd` after cookie `offset`: (d_ino, d_off, d_type, name)."""
    os.lseek(fd, offset, os.SEEK_SET)
    buf = ctypes.create_string_buffer(bufsize)
    n = _syscall(SYS_getdents64, fd, buf, bufsize)
    if n < 0:
        raise _err()
    raw = ctypes.string_at(buf, n)
    out = []
    pos = 0
    unpack = _DIRENT.unpack_from
    while pos < n:
        ino, off, reclen, dtype = unpack(raw, pos)
        name = raw[pos + 19 : pos + reclen]
        nul = name.find(b"\0")
        if nul >= 0:
            name = name[:nul]
        out.append((ino, off, dtype, name))
        pos += reclen
    return out


# -- statx ------------------------------------------------------------------------------------

_statx = getattr(_libc, "statx", None)
_STATX = struct.Struct("<IIQIIIH2xQQQQ" + "qI4x" * 4 + "IIII")


@dataclass(slots=True)
class Statx:
    mask: int
    blksize: int
    nlink: int
    uid: int
    gid: int
    mode: int
    ino: int
    size: int
    blocks: int
    atime: tuple[int, int]
    btime: tuple[int, int]
    ctime: tuple[int, int]
    mtime: tuple[int, int]
    rdev: int
    dev: int


def statx(fd: int) -> Statx:
    """statx of the file `fd` refers to (an O_PATH fd of a symlink gives the symlink)."""
    if _statx is None:
        return _from_stat(os.fstat(fd))
    buf = ctypes.create_string_buffer(256)
    r = _statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS | STATX_BTIME, buf)
    if r != 0:
        e = ctypes.get_errno()
        if e == errno.ENOSYS:
            return _from_stat(os.fstat(fd))
        raise OSError(e, os.strerror(e))
    f = _STATX.unpack_from(buf.raw)
    (mask, blksize, _attrs, nlink, uid, gid, mode, ino, size, blocks, _amask) = f[:11]
    at, atn, bt, btn, ct, ctn, mt, mtn = f[11:19]
    rmaj, rmin, dmaj, dmin = f[19:23]
    return Statx(
        mask,
        blksize,
        nlink,
        uid,
        gid,
        mode,
        ino,
        size,
        blocks,
        (at, atn),
        (bt, btn),
        (ct, ctn),
        (mt, mtn),
        os.makedev(rmaj, rmin),
        os.makedev(dmaj, dmin),
    )


def _from_stat(st: os.stat_result) -> Statx:
    def ts(ns: int) -> tuple[int, int]:
        return ns // 1_000_000_000, ns % 1_000_000_000

    return Statx(
        STATX_BASIC_STATS,
        st.st_blksize,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_mode,
        st.st_ino,
        st.st_size,
        st.st_blocks,
        ts(st.st_atime_ns),
        (0, 0),
        ts(st.st_ctime_ns),
        ts(st.st_mtime_ns),
        st.st_rdev,
        st.st_dev,
    )


# -- *at with AT_EMPTY_PATH -----------------------------------------------------------------

_libc.fchownat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_int,
]


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the file `fd` refers to (works on O_PATH fds, symlinks included); -1 keeps."""
    r = _libc.fchownat(
        fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW
    )
    if r != 0:
        raise _err()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]


def utimens_fd(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Set times of the file `fd` refers to; nsec may be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    r = _libc.utimensat(fd, b"", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    if r != 0:
        raise _err()


_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def link_fd(fd: int, newdirfd: int, newname: bytes) -> None:
    """Make `newname` in `newdirfd` a hard link to the file `fd` refers to."""
    r = _libc.linkat(fd, b"", newdirfd, newname, AT_EMPTY_PATH)
    if r == 0:
        return
    e = ctypes.get_errno()
    if e not in (errno.EPERM, errno.ENOENT, errno.EINVAL):
        raise OSError(e, os.strerror(e))
    # Without CAP_DAC_READ_SEARCH, AT_EMPTY_PATH is refused; the /proc magic link works.
    r = _libc.linkat(AT_FDCWD, b"/proc/self/fd/%d" % fd, newdirfd, newname, AT_SYMLINK_FOLLOW)
    if r != 0:
        raise _err()


# -- OFD locks --------------------------------------------------------------------------------


def ofd_setlk(fd: int, type: int, start: int, length: int) -> bool:
    """Try to set an OFD lock; False when another owner holds a conflicting lock."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(type, os.SEEK_SET, start, length, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_getlk(fd: int, type: int, start: int, length: int) -> tuple[int, int, int, int]:
    """The first conflicting lock as (type, start, length, pid); type F_UNLCK if none."""
    r = fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(type, os.SEEK_SET, start, length, 0))
    t, _whence, s, ln, pid = _FLOCK.unpack(r)
    return t, s, ln, pid


# -- fstatfs ----------------------------------------------------------------------------------

_STATFS = struct.Struct("<qqQQQQQiiqqq4q")  # struct statfs on 64-bit Linux


def fstatfs(fd: int) -> tuple[int, int, int, int, int, int, int, int, int]:
    """(type, bsize, blocks, bfree, bavail, files, ffree, fsid, namelen) of `fd`'s filesystem
    (works on O_PATH fds)."""
    buf = ctypes.create_string_buffer(_STATFS.size)
    if _libc.fstatfs(fd, buf) != 0:
        raise _err()
    t, bsize, blocks, bfree, bavail, files, ffree, fs0, fs1, namelen, _frsize, _flags = (
        _STATFS.unpack(buf.raw)[:12]
    )
    fsid = (fs0 & 0xFFFFFFFF) | ((fs1 & 0xFFFFFFFF) << 32)
    return t & 0xFFFFFFFF, bsize, blocks, bfree, bavail, files, ffree, fsid, namelen


FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)


def inode_generation(fd: int) -> int:
    """The inode generation number (FS_IOC_GETVERSION) of an opened file; OSError (ENOTTY)
    where the filesystem has none."""
    r = fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)
    return int(struct.unpack("<q", r)[0]) & 0xFFFFFFFFFFFFFFFF


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed: the soft limit to the hard one, and as root both
    to the kernel's fs.nr_open. Returns the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = max(hard, int(f.read()))
        except (OSError, ValueError):
            pass
    if hard == resource.RLIM_INFINITY:
        target = hard
    if soft != target:
        for limits in ((target, target), (hard, hard)):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
                return limits[0]
            except (ValueError, OSError):
                continue
    return soft


# -- file handles (reclaiming O_PATH fds) -----------------------------------------------------

MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint32),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


_name_to_handle_at = getattr(_libc, "name_to_handle_at", None)
_open_by_handle_at = getattr(_libc, "open_by_handle_at", None)


def file_handle(fd: int) -> tuple[bytes, int] | None:
    """(opaque handle, mount id) of the file `fd` refers to, None where the filesystem has no
    file handles. The handle is the server's own; it never comes from a client."""
    if _name_to_handle_at is None:
        return None
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    r = _name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH)
    if r != 0:
        e = ctypes.get_errno()
        if e in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW, errno.ENOSYS, errno.EPERM):
            return None
        raise OSError(e, os.strerror(e))
    blob = (
        struct.pack("<Ii", fh.handle_bytes, fh.handle_type) + bytes(fh.f_handle)[: fh.handle_bytes]
    )
    return blob, mount_id.value


def open_handle(mount_fd: int, blob: bytes, flags: int) -> int:
    """Open a file by a handle from file_handle() (needs CAP_DAC_READ_SEARCH)."""
    if _open_by_handle_at is None:
        raise OSError(errno.ENOSYS, "open_by_handle_at")
    nbytes, htype = struct.unpack_from("<Ii", blob)
    fh = _FileHandle()
    fh.handle_bytes = nbytes
    fh.handle_type = htype
    ctypes.memmove(fh.f_handle, blob[8:], nbytes)
    fd = _open_by_handle_at(mount_fd, ctypes.byref(fh), flags)
    if fd < 0:
        raise _err()
    return int(fd)
