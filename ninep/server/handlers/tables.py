"""The handler table of each dialect, assembled once: what the server gives every session.

This module must never hold state of its own: each call builds fresh tables.
"""

from __future__ import annotations

from ninep.protocol.numbers import V9P2000, V9P2000_L, V9P2000_U
from ninep.server.handlers.common import COMMON
from ninep.server.handlers.dotl import DOTL
from ninep.server.handlers.legacy import LEGACY
from ninep.server.session import Handler, HandlerTables


def dialect_tables() -> HandlerTables:
    """msgtype → handler for 9P2000.L, 9P2000.u and 9P2000."""
    legacy: dict[int, Handler] = {**COMMON, **LEGACY}
    return {V9P2000_L: {**COMMON, **DOTL}, V9P2000_U: legacy, V9P2000: legacy}


__all__ = ["dialect_tables"]
