"""TLS client identities: what a client-certificate subject may attach to, and as whom.

STAND-IN (h-config branch): the TLS helper owns this module and enforces the rules at attach;
this copy holds only the data type the exports file's `[[tls.client]]` entries parse into. The lead
reconciles it at merge.

This module must never read certificates or sockets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IdentityRule:
    #: The only export this subject may attach to (None: any export).
    export: str | None = None
    #: The uid every attach of this subject is forced to (None: as the client says).
    uid: int | None = None
