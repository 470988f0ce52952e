"""Ending a fid on its backend: what Tclunk does, and what every other end of a fid (Tremove,
Tversion, a Txattrwalk onto itself, the connection going away) does too.

The fid has already left the connection's FidTable (which withdrew its direct I/O). This module
must never raise: a failure is logged and, where the client should hear of it, returned as an errno.
"""

from __future__ import annotations

import errno
import logging

from ninep.protocol.numbers import XATTR_REPLACE
from ninep.server.fids import Fid, FidKind

log = logging.getLogger("ninep.ops")


async def release_fid(fid: Fid, conn_id: int) -> int:
    """Everything clunk does, never raising; returns an errno to report (0 if none)."""
    err = 0
    backend = fid.export.backend
    try:
        if fid.kind is FidKind.XATTR_WRITE:
            err = await _commit_xattr(fid)
        if fid.open is not None:
            try:
                if fid.lock_owners:
                    await backend.release_locks(fid.open, None)
            finally:
                await backend.close(fid.open)
                fid.open = None
        if fid.remove_on_clunk:
            try:
                await backend.remove(fid.node)
            except OSError as e:
                err = err or (e.errno or errno.EIO)
    except Exception:
        log.exception("connection %d: releasing a fid failed", conn_id)
    finally:
        try:
            await backend.release(fid.node)
        except Exception:
            log.exception("connection %d: releasing a node failed", conn_id)
    return err


async def _commit_xattr(fid: Fid) -> int:
    if len(fid.xattr_buf) != fid.xattr_size:
        return errno.EINVAL
    try:
        if fid.xattr_size == 0 and fid.xattr_flags & XATTR_REPLACE:
            # Linux removexattr: a zero-length create with XATTR_REPLACE.
            await fid.export.backend.xattr_remove(fid.node, fid.xattr_name)
        else:
            await fid.export.backend.xattr_set(fid.node, fid.xattr_name, bytes(fid.xattr_buf), fid.xattr_flags)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


__all__ = ["release_fid"]
