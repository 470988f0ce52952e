"""Operation policy of an export: which otherwise legal operations the server refuses.

STAND-IN (h-config branch): the policy helper owns this module; this copy holds only what the
exports file needs (the dataclass whose field names are the keys of an export's `policy` table,
and `policy_of`). The lead reconciles it at merge.

This module must never call a backend or touch a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ninep.fids import Fid
    from ninep.session import Session


@dataclass(frozen=True, slots=True)
class OperationPolicy:
    readonly: bool = False
    allow_devices: bool = False
    allow_setid: bool = False
    allow_privileged_xattrs: bool = False


def policy_of(session: Session, fid: Fid) -> OperationPolicy:
    """The policy that governs a request on `fid`: its export's (an attach fixed the export)."""
    return fid.export.policy
