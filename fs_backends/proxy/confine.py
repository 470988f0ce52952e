"""How the proxy helper shuts itself in: namespaces, a private root, and the fewest privileges.

`confine(export, model)` turns the calling (single-threaded, freshly started) process into the
confined helper and returns in the confined child, whose whole filesystem view is

    /          an empty read-only tmpfs
    /export    the export (bind mount, with whatever is mounted below it)
    /proc      a fresh procfs of the helper's own pid namespace (the local backend reopens
               files through /proc/self/fd; no other process is visible there)

Modes, best first:
- "userns": its own user, mount, pid (and net/ipc/uts) namespaces, running as the export's
  owner with only that one uid/gid mapped and every capability dropped afterwards. No privilege
  on the host at all. Used for `none`, `mapped-xattr`, `mapped-file`.
- "mountns": root's fallback when user namespaces are unavailable, and what `passthrough` uses:
  a private mount + pid namespace built the same way; then it either becomes the export's
  owner (mapped models, `none`: all capabilities gone) or stays uid 0 keeping only
  CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID and CAP_MKNOD (passthrough).

A plain chroot(2) into the export is not offered: the local backend needs /proc/self/fd inside
the root, and a chroot cannot have it without a path to the host's /proc; the private mount
namespace with pivot_root is the chroot done properly.

After confinement the process always has PR_SET_NO_NEW_PRIVS, an emptied capability bounding
set (minus what passthrough keeps) and dies with its parent (PR_SET_PDEATHSIG). The pid namespace
needs a fork: the parent ("outer") drops everything too, reports the child's host pid, and only
waits for the child to exit.

This module must only be called in a process that was started to become a helper.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_pivot_root = 155
SYS_capset = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_MKNOD = 27
PASSTHROUGH_CAPS = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_MKNOD)

ROOT_EXPORT = "/export"


class ConfineError(RuntimeError):
    pass


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)  # noqa: E731
    _check(
        _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new: str, old: str) -> None:
    _check(_libc.syscall(SYS_pivot_root, new.encode(), old.encode()), "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(
        _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                    ctypes.c_ulong(0), ctypes.c_ulong(0)),
        f"prctl {option}",
    )  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset(caps: tuple[int, ...]) -> None:
    """Set effective = permitted = `caps`, inheritable empty."""
    mask = 0
    for c in caps:
        mask |= 1 << c
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = word
        data[i].permitted = word
        data[i].inheritable = 0
    _check(_libc.syscall(SYS_capset, ctypes.byref(hdr), data), "capset")


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_privileges(keep: tuple[int, ...]) -> None:
    """Empty the bounding set but `keep`, clear ambient caps, set caps to `keep`, forbid gaining
    any privilege again (no_new_privs)."""
    last = _cap_last()
    for c in range(last + 1):
        if c in keep:
            continue
        try:
            prctl(PR_CAPBSET_DROP, c)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    with contextlib.suppress(OSError):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    capset(keep)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def status_fields(pid: int | str = "self") -> dict[str, str]:
    """Uid/Gid/Cap*/NoNewPrivs lines of /proc/<pid>/status (for reports and tests)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Groups"):
                out[k] = v.strip()
    return out


@dataclass
class Confinement:
    """What `confine` did, reported to the server in HELLO."""

    mode: str  # "userns" | "mountns"
    uid: int
    gid: int
    keep_caps: tuple[int, ...]
    namespaces: list[str] = field(default_factory=list)

    def facts(self) -> dict[str, str]:
        st = status_fields()
        return {
            "confinement": self.mode,
            "namespaces": ",".join(self.namespaces),
            "uid": str(self.uid),
            "gid": str(self.gid),
            "caps": ",".join(str(c) for c in self.keep_caps),
            "CapEff": st.get("CapEff", ""),
            "CapBnd": st.get("CapBnd", ""),
            "NoNewPrivs": st.get("NoNewPrivs", ""),
            "root": ROOT_EXPORT,
        }


def _userns_works(uid: int, gid: int) -> bool:
    """Probe in a throwaway child: can this process, as uid/gid, make a user namespace?"""
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0 and uid != 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            unshare(CLONE_NEWUSER)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _scratch_dir(export_real: str) -> str:
    for d in ("/mnt", "/tmp", "/run", "/dev", "/var", "/opt", "/srv", "/home"):
        if os.path.isdir(d) and not os.path.islink(d) and not (export_real + "/").startswith(d + "/"):
            return d
    raise ConfineError("no directory to build the helper's root on")


def _build_root(export_fd: int) -> None:
    """In a private mount namespace: a tmpfs root holding the export and a fresh /proc, then
    pivot_root into it and detach the host's tree."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A mount of the old namespace cannot be bind-mounted by fd, and the helper's user may not
    # be able to walk the path to the export: the cwd was set to the export before unshare (so
    # it now names this namespace's copy of it); bind "." and check it is the same directory.
    want = os.fstat(export_fd)
    here = os.stat(".")
    if (here.st_dev, here.st_ino) != (want.st_dev, want.st_ino):
        raise ConfineError("lost the export while entering the namespace")
    export_real = os.readlink(f"/proc/self/fd/{export_fd}")
    base = _scratch_dir(export_real)
    mount("ninep-helper", base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
    os.mkdir(base + "/export", 0o755)
    os.mkdir(base + "/proc", 0o555)
    mount(".", base + "/export", None, MS_BIND | MS_REC)
    got = os.stat(base + "/export")
    if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
        raise ConfineError("the export changed while the helper was confining itself")
    # In the helper's view only: device nodes under the export can never be opened (even by
    # a compromised passthrough helper holding CAP_MKNOD), nothing there can be executed.
    mount(None, base + "/export", None, MS_REMOUNT | MS_BIND | MS_NODEV | MS_NOSUID | MS_NOEXEC)
    mount("proc", base + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(base)
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)  # the old root, stacked under the new one
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _fork_into_pidns(sock_fd: int, report_child: Callable[[int, int], None]) -> None:
    """Fork; the parent becomes the outer waiter and never returns, the child (pid 1 of the new
    pid namespace) returns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # If the outer already died before PDEATHSIG was armed, the pipe tells us.
        os.set_blocking(r, False)
        try:
            if os.read(r, 1) == b"":
                os._exit(1)
        except BlockingIOError:
            pass
        os.close(r)
        return
    os.close(r)
    with contextlib.suppress(OSError):
        report_child(sock_fd, pid)
    os.close(sock_fd)
    _outer_wait(pid, w)


def _outer_wait(pid: int, keep_fd: int) -> None:
    """The outer process: no privilege, no socket; waits for the child and exits like it."""
    try:
        drop_privileges(())
        if os.getuid() == 0:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
    except OSError:
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: os.kill(pid, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 1 << 8
            break
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def confine(
    export: str,
    model: str,
    sock_fd: int,
    report_child: Callable[[int, int], None],
    *,
    allow_userns: bool = True,
    export_fd: int | None = None,
) -> Confinement:
    """Confine this process (see the module docstring). Returns in the confined child, where the
    export is at ROOT_EXPORT. Raises ConfineError when no confinement is possible."""
    if export_fd is None:
        export_fd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(export_fd)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfineError(f"{export} is not a directory")
    root = os.geteuid() == 0
    extra = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    keep: tuple[int, ...]

    if model == "passthrough":
        if not root:
            raise ConfineError("the passthrough model needs the helper to start as root")
        mode, uid, gid, keep = "mountns", 0, 0, PASSTHROUGH_CAPS
    else:
        uid, gid, keep = st.st_uid, st.st_gid, ()
        mode = "userns" if allow_userns and _userns_works(uid, gid) else "mountns"
        if mode == "mountns" and not root:
            raise ConfineError(
                "user namespaces are unavailable and the helper is not root: cannot confine"
            )

    names: list[str] = []
    os.fchdir(export_fd)
    if mode == "userns":
        if root:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # Changing ids (here or in a launcher) made us non-dumpable, which leaves
        # /proc/self/*_map owned by root; we set it back to 0 once confined.
        prctl(PR_SET_DUMPABLE, 1)
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID
        try:
            unshare(flags | extra)
            names += ["user", "mnt", "pid", "net", "ipc", "uts"]
        except OSError:
            unshare(flags)
            names += ["user", "mnt", "pid"]
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    else:
        flags = CLONE_NEWNS | CLONE_NEWPID
        try:
            unshare(flags | extra)
            names += ["mnt", "pid", "net", "ipc", "uts"]
        except OSError:
            unshare(flags)
            names += ["mnt", "pid"]

    _fork_into_pidns(sock_fd, report_child)
    # -- the confined child from here on --
    _build_root(export_fd)
    os.close(export_fd)
    if mode == "mountns" and model != "passthrough" and uid != 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # drops every capability
    drop_privileges(keep)
    prctl(PR_SET_DUMPABLE, 0)
    sys.path[:] = [p for p in sys.path if p]  # host paths are gone; imports must be done
    return Confinement(mode, os.getuid(), os.getgid(), keep, names)


__all__ = ["ROOT_EXPORT", "ConfineError", "Confinement", "confine", "drop_privileges", "status_fields"]
