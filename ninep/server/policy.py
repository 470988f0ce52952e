"""Operation policy: what the clients of one export may do beyond reading and writing its files.

A security model (`fs_backends.security`) decides how a client's credentials meet the host; the
policy decides which operations are allowed at all, per export, default-deny where the host is
at stake:

- `readonly`: every change is refused (EROFS).
- `allow_devices`: mknod of block/char devices. Refused (EPERM) by default where the host would
  get a real device node (passthrough, none, and any backend that is not known to keep special
  files as metadata). Under mapped-xattr/mapped-file a "device" is a 0600 regular file owned by
  the server with its type in metadata, and the memory backend never reaches the host: there it
  is always allowed (as QEMU does; a guest's own root filesystem needs its /dev entries).
- `allow_setid`: setuid/setgid bits on non-directories (create, mknod, mkdir is exempt,
  setattr/wstat chmod). Refused (EPERM) by default where the host file would carry them; under
  the mapped models the bits live only in metadata, the host file never gets them (its mode is
  --fmode), so they are allowed. setgid on a directory only steers group inheritance: allowed.
- `allow_privileged_xattrs`: `trusted.*` and `security.*` xattrs. Only ever possible under
  passthrough (which runs as root) and then only with this flag; otherwise a write or removal
  answers EPERM (what Linux answers a caller lacking CAP_SYS_ADMIN for trusted.*), a read answers
  ENODATA (the same: the attribute looks absent), and listings leave the names out.

A refusal is a `Refused` (an OSError carrying the errno); the frontend that caught it (the 9P
session, the FUSE mount) answers the errno and logs it with `Refused.describe`, so every refusal
gives exactly one log line in one format. `ninep.server.fids.policy_of` is the single place the
9P server asks for the policy that governs a fid.

This module must never touch the host, a socket or a backend: it only decides.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from fs_backends.base import BackendInfo, Cred

log = logging.getLogger("ninep.policy")

#: Models that keep special files and mode bits as metadata (the host object is a plain file).
MAPPED_MODELS = frozenset({"mapped", "mapped-xattr", "mapped-file"})
PRIVILEGED_XATTR_PREFIXES = ("trusted.", "security.")
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class OperationPolicy:
    """Per-export switches; the field names are also the keys of an exports file's policy table."""

    readonly: bool = False
    allow_devices: bool = False
    allow_setid: bool = False
    allow_privileged_xattrs: bool = False


DEFAULT_POLICY = OperationPolicy()


class Refused(OSError):
    """An operation the export's policy does not allow. `quiet` refusals (reads of hidden
    xattrs, which Linux guests issue on every write) are logged at debug level only."""

    def __init__(self, err: int, name: str, reason: str, who: Cred | None = None, *, quiet: bool = False) -> None:
        super().__init__(err, reason)
        self.name = name
        self.reason = reason
        self.who = who
        self.quiet = quiet

    def describe(self, op: str) -> str:
        """The one log line: '<op> <name> by <identity>: refused (<errno>): <reason>'."""
        who = f"uid {self.who.uid} ({self.who.uname or '?'})" if self.who is not None else "?"
        code = errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"refused {op} {self.name!r} by {who}: {code}: {self.reason}"

    def log(self, prefix: str, op: str) -> None:
        log.log(logging.DEBUG if self.quiet else logging.WARNING, "%s: %s", prefix, self.describe(op))


def _model(info: BackendInfo) -> str | None:
    return info.extra.get("security_model")


def host_keeps_real_objects(info: BackendInfo) -> bool:
    """Whether device nodes and mode bits a client asks for land on the host as such. Unknown
    backends (a remote 9P server, say) count as real: default-deny."""
    return info.name != "memory" and _model(info) not in MAPPED_MODELS


def privileged_xattrs_possible(info: BackendInfo) -> bool:
    """trusted.*/security.* are for passthrough only (it runs as root: ids on the host are the
    client's own, so the client's privilege is what the host sees)."""
    return _model(info) == "passthrough"


@dataclass(frozen=True, slots=True)
class Gate:
    """The checks of one request: the policy, the backend it goes to, and who asks."""

    policy: OperationPolicy
    info: BackendInfo
    who: Cred | None = None

    def _refuse(self, err: int, name: str, reason: str, quiet: bool = False) -> Refused:
        return Refused(err, name, reason, self.who, quiet=quiet)

    def writable(self, name: str = "") -> None:
        if self.policy.readonly or self.info.readonly:
            raise self._refuse(errno.EROFS, name, "read-only export")

    def mode(self, name: str, mode: int, is_dir: bool) -> None:
        """Mode bits of a create/mknod/chmod on a file (a directory when `is_dir`)."""
        if (
            mode & _SETID
            and not is_dir
            and not self.policy.allow_setid
            and host_keeps_real_objects(self.info)
        ):
            raise self._refuse(errno.EPERM, name, f"setuid/setgid mode {mode & 0o7777:o} not allowed (--allow-setid)")

    def mknod(self, name: str, mode: int) -> None:
        fmt = stat.S_IFMT(mode)
        if (
            fmt in (stat.S_IFCHR, stat.S_IFBLK)
            and not self.policy.allow_devices
            and host_keeps_real_objects(self.info)
        ):
            kind = "char" if fmt == stat.S_IFCHR else "block"
            raise self._refuse(errno.EPERM, name, f"{kind} device nodes not allowed (--allow-devices)")
        self.mode(name, mode, False)

    def _xattr_allowed(self, name: str) -> bool:
        return not name.startswith(PRIVILEGED_XATTR_PREFIXES) or (
            self.policy.allow_privileged_xattrs and privileged_xattrs_possible(self.info)
        )

    def xattr(self, name: str, write: bool) -> None:
        if write:
            self.writable(name)
        if not self._xattr_allowed(name):
            why = "trusted.*/security.* xattrs need passthrough and --allow-privileged-xattrs"
            if write:
                raise self._refuse(errno.EPERM, name, why)
            raise self._refuse(errno.ENODATA, name, why, quiet=True)

    def xattr_names(self, names: Iterable[str]) -> list[str]:
        """A listing without the names the client may not see."""
        return [n for n in names if self._xattr_allowed(n)]


__all__ = [
    "DEFAULT_POLICY",
    "Gate",
    "OperationPolicy",
    "Refused",
    "host_keeps_real_objects",
]
