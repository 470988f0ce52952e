"""TLS client identities: what a client-certificate subject may attach to, and as whom.

The TLS transport (`transports.tls`) verifies the client certificate and gives the Channel an
`identity`, its subject as an RFC 4514 string ("CN=alice,O=ninep", exactly as the server logs it
on connection). `SessionOptions.tls_identities` maps such subjects to an `IdentityRule` (filled
from the exports file's `[[tls.client]]` entries or `ninep serve --tls-map`). At Tattach a rule:
- with `export` set (an export's name), refuses (EACCES) any attach whose aname resolves to
  another export;
- with `uid` set, replaces the uid the client asks for (n_uname/uname) by this one.
A verified identity without a rule attaches like any client (the CA vouched for it).

This module must never read certificates or sockets, or decide who the peer is: it only applies
rules to an identity the transport has already verified.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ninep.protocol.numbers import NONUNAME


@dataclass(frozen=True, slots=True)
class IdentityRule:
    #: The name of the only export this subject may attach to (None: any export).
    export: str | None = None
    #: The uid every attach of this subject is forced to (None: as the client says).
    uid: int | None = None

    def allows(self, export: str) -> bool:
        """May this subject attach to the export named `export` (the one its aname resolved to)?"""
        return self.export is None or self.export == export

    def credentials(self, uname: str, n_uname: int) -> tuple[str, int]:
        """The (uname, n_uname) an attach proceeds with: the forced uid, whatever name the
        client sent (the server then takes the name from the password database)."""
        if self.uid is None:
            return uname, n_uname
        return "", self.uid


def rule_for(rules: Mapping[str, IdentityRule], identity: str | None) -> IdentityRule | None:
    return rules.get(identity) if identity else None


def parse_map(text: str) -> tuple[str, IdentityRule]:
    """`SUBJECT=UID` (`--tls-map`); the subject holds '=' itself, so the uid is after the last."""
    subject, sep, uid = text.rpartition("=")
    if not sep or not subject or "=" not in subject or not uid.isdigit():
        raise ValueError(f"expected SUBJECT=UID (e.g. CN=alice,O=ninep=1000), not {text!r}")
    if int(uid) == NONUNAME:
        raise ValueError(f"uid {uid} is the 'no uid' value")
    return subject, IdentityRule(uid=int(uid))
