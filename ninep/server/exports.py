"""The exports one server offers, and how a Tattach picks one by its aname (as diod does).

An `Export` is a Backend plus what governs it: the aname that selects it, its operation policy
and the listeners allowed to reach it. The server owns one `ExportTable`; every session holds the
same table, so a reload (`ExportTable.replace`) is seen by the next attach on every connection.
The fid an attach creates carries its Export, and every later request on that fid (or on fids
walked from it) uses that Export's backend: a reload never moves a live fid to another backend.

Aname matching: the aname's path components are matched against the export anames, longest
prefix first; what is left over names a directory inside that export (`home/alice` with an export
`home` attaches to `alice` inside it). An export whose aname is empty catches every aname no
other export matches, which is the single-export `ninep serve DIR` behaviour.

This module must never create backends (the CLI does) or touch sockets.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fs_backends.base import Backend
from ninep.server.policy import OperationPolicy


def normalize_aname(aname: str) -> str:
    """The aname as matched: no empty or '.' components, no leading or trailing '/'."""
    return "/".join(p for p in aname.split("/") if p and p != ".")


@dataclass(eq=False, slots=True)
class Export:
    name: str
    #: Normalized (see normalize_aname); "" is the root export that catches unmatched anames.
    aname: str
    backend: Backend
    policy: OperationPolicy = field(default_factory=OperationPolicy)
    #: Names of the listeners that may reach it; None: every listener.
    listeners: frozenset[str] | None = None
    #: What it was built from (the CLI's exports-file entry, opaque here); a reload keeps an
    #: Export whose config is equal.
    config: object = None

    def allows(self, listener: str) -> bool:
        return self.listeners is None or listener in self.listeners


class ExportTable:
    """The exports by aname; replaced as a whole on reload."""

    def __init__(self, exports: Iterable[Export] = ()) -> None:
        self._by_aname: dict[str, Export] = {}
        self.replace(exports)

    @classmethod
    def single(cls, backend: Backend, policy: OperationPolicy | None = None, name: str = "export") -> ExportTable:
        """One export reached by any aname (a path inside it): `ninep serve DIR`."""
        return cls([Export(name, "", backend, policy or OperationPolicy())])

    def replace(self, exports: Iterable[Export]) -> None:
        table: dict[str, Export] = {}
        names: set[str] = set()
        for e in exports:
            if e.aname != normalize_aname(e.aname):
                raise ValueError(f"export {e.name!r}: aname {e.aname!r} is not normalized")
            if e.aname in table:
                raise ValueError(f"exports {table[e.aname].name!r} and {e.name!r} share the aname {e.aname!r}")
            if e.name in names:
                raise ValueError(f"two exports are named {e.name!r}")
            table[e.aname] = e
            names.add(e.name)
        self._by_aname = table

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._by_aname.values()))

    def __len__(self) -> int:
        return len(self._by_aname)

    def by_name(self, name: str) -> Export | None:
        for e in self._by_aname.values():
            if e.name == name:
                return e
        return None

    def resolve(self, aname: str) -> tuple[Export, str]:
        """The export `aname` selects and the path inside it; ENOENT if none does."""
        parts = [p for p in aname.split("/") if p and p != "."]
        if ".." in parts:
            # Prefix matching on a path that climbs would be ambiguous; no client needs it.
            raise OSError(errno.ENOENT, f"no export for aname {aname!r}")
        table = self._by_aname
        for i in range(len(parts), -1, -1):
            e = table.get("/".join(parts[:i]))
            if e is not None:
                return e, "/".join(parts[i:])
        raise OSError(errno.ENOENT, f"no export for aname {aname!r}")


__all__ = ["Export", "ExportTable", "normalize_aname"]
