"""Error mapping of the FUSE handlers: what the kernel is answered when a request fails.

An `OSError` from the backend becomes `FUSEError(errno)`; a policy refusal its errno (EPERM by
default); anything else is logged and answered EIO. Handlers that change nothing are run once
more after EMFILE/ENFILE, once the kernel was asked to give some inodes back. With debugging on,
each call and its answer is logged.

This module must never decide what a request does: it wraps handlers and checks names only.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import pyfuse3
import trio

from ninep.server.policy import Refused

log = logging.getLogger("ninep.fuse")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Handlers that change nothing, so running them again after EMFILE is safe.
RETRY_ON_EMFILE = frozenset(
    {
        "lookup",
        "getattr",
        "open",
        "opendir",
        "readdir",
        "readlink",
        "getxattr",
        "listxattr",
        "statfs",
    }
)


class Handled(Protocol):
    """What `handler` needs of the operations object it wraps the methods of."""

    @property
    def debug(self) -> bool: ...

    def shed(self, force: bool = False) -> int:
        """Ask the kernel to give inodes back; how many were asked."""
        ...


def fsname(name: bytes) -> str:
    """A name inside a directory, as the backend takes it; EINVAL for '', '/' or NUL in it."""
    s = os.fsdecode(name)
    if not s or "/" in s or "\0" in s:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return s


def handler(fn: F) -> F:
    """Map backend errors to FUSEError and log each call when debugging."""
    name = fn.__name__

    retry = name in RETRY_ON_EMFILE

    @functools.wraps(fn)
    async def wrapper(self: Handled, *args: Any) -> Any:
        try:
            try:
                result = await fn(self, *args)
            except OSError as e:
                # Out of fds (or fids): make the kernel give some inodes back, then try again.
                if not retry or e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if not self.shed(force=True):
                    raise
                await trio.sleep(0.2)
                result = await fn(self, *args)
        except Refused as e:
            e.log("fuse", name)
            raise pyfuse3.FUSEError(e.errno or errno.EPERM) from None
        except pyfuse3.FUSEError as e:
            if self.debug:
                log.debug("%s%s -> %s", name, _short(args), errno.errorcode.get(e.errno, e.errno))
            raise
        except OSError as e:
            err = e.errno or errno.EIO
            if self.debug:
                log.debug("%s%s -> %s", name, _short(args), errno.errorcode.get(err, err))
            raise pyfuse3.FUSEError(err) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s%s failed", name, _short(args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.debug:
            log.debug("%s%s -> %s", name, _short(args), _short_result(result))
        return result

    return cast(F, wrapper)


def _short(args: Sequence[Any]) -> str:
    parts = []
    for a in args:
        if isinstance(a, pyfuse3.RequestContext):
            parts.append(f"ctx(uid={a.uid},gid={a.gid},pid={a.pid})")
        elif isinstance(a, bytes | bytearray | memoryview) and len(a) > 64:
            parts.append(f"<{len(a)} bytes>")
        elif isinstance(a, pyfuse3.EntryAttributes | pyfuse3.SetattrFields):
            parts.append(type(a).__name__)
        else:
            parts.append(repr(a))
    return "(" + ", ".join(parts) + ")"


def _short_result(r: object) -> str:
    if isinstance(r, pyfuse3.EntryAttributes):
        return f"ino={r.st_ino} mode={r.st_mode:o} size={r.st_size}"
    if isinstance(r, bytes) and len(r) > 64:
        return f"<{len(r)} bytes>"
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], pyfuse3.FileInfo):
        return f"fh={r[0].fh} {_short_result(r[1])}"
    if isinstance(r, pyfuse3.FileInfo):
        return f"fh={r.fh}"
    return repr(r)
