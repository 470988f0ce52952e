"""The inode table of a mount: inode number <-> one backend Node, with the kernel's counts.

An entry is freed (its Node handed back for release) when `forget` brings the kernel's lookup
count to zero and no file handle is open on it, so a run that creates and deletes many files does
not grow the table. Inode numbers come from `qid.path` (so hard links share one inode and numbers
are stable while the mount lives); a qid.path that would collide with a number in use (or with
0/1) gets a number from a reserved high range, remembered for the life of the mount so it stays
stable too. Each entry remembers the names it was reached by, so a Node that went stale on a
path-based 9P server (diod: fids are paths) can be walked to again.

This module must never call the backend: methods that make Nodes unneeded return them, and the
caller releases them (asynchronously).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import pyfuse3

from fs_backends.base import Attr, Node, Qid

ROOT_INODE = int(pyfuse3.ROOT_INODE)
#: First number of the range handed to qid.paths that collide with a number already in use.
ALT_INODE_BASE = 1 << 63
#: Names remembered per inode (hard links) for finding a file again on a path-based server.
MAX_NAMES = 4


@dataclass(slots=True)
class Inode:
    """One inode the kernel knows: the backend Node behind it and the kernel's counts."""

    ino: int
    node: Node
    qid_path: int
    qid_type: int
    nlookup: int = 0
    nopen: int = 0
    #: Where the file was last reached, newest first (directory inode, name): lets a Node that
    #: went stale on a path-based server (diod: fids are paths) be walked again.
    names: list[tuple[int, str]] = field(default_factory=list)
    #: Backend calls in progress on `node`; superseded Nodes wait in `retired` until none is.
    busy: int = 0
    retired: list[Node] = field(default_factory=list)
    dropped: bool = False
    #: The newest attributes seen: answered (with nlink 0) for an open file whose Node the
    #: server no longer resolves (an unlinked file on a path-based server such as diod).
    last_attr: Attr | None = None

    def add_name(self, parent: int, name: str) -> None:
        if not parent or name in (".", ".."):
            return
        key = (parent, name)
        if self.names and self.names[0] == key:
            return
        self.names = [key, *(n for n in self.names if n != key)][:MAX_NAMES]

    def drop_name(self, parent: int, name: str) -> None:
        self.names = [n for n in self.names if n != (parent, name)]


class InodeTable:
    """inode number <-> backend Node, with lookup and open counts (see module docstring).

    Methods that make Nodes unneeded return them; the caller releases them (asynchronously)."""

    def __init__(self) -> None:
        self.by_ino: dict[int, Inode] = {}
        self.by_path: dict[int, int] = {}  # qid.path -> ino, for entries in by_ino
        self._alt: dict[int, int] = {}  # qid.path -> reserved high number (never reused)
        self._alt_used: set[int] = set()
        self._next_alt = ALT_INODE_BASE

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, ino: int) -> Inode:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def number_for(self, qid_path: int) -> int:
        """The inode number qid.path has (or would get) right now."""
        ino = self.by_path.get(qid_path)
        if ino is not None:
            return ino
        alt = self._alt.get(qid_path)
        if alt is not None:
            return alt
        if (
            qid_path not in (0, ROOT_INODE)
            and qid_path < (1 << 64)
            and qid_path not in self.by_ino
            and qid_path not in self._alt_used
        ):
            return qid_path
        while self._next_alt in self.by_ino or self._next_alt in self._alt_used:
            self._next_alt += 1
        alt = self._next_alt
        self._next_alt += 1
        self._alt[qid_path] = alt
        self._alt_used.add(alt)
        return alt

    def add_root(self, node: Node) -> Inode:
        ent = Inode(ROOT_INODE, node, node.qid.path, node.qid.type, nlookup=1)
        self.by_ino[ROOT_INODE] = ent
        self.by_path[node.qid.path] = ROOT_INODE
        return ent

    def existing(self, qid: Qid) -> Inode | None:
        ino = self.by_path.get(qid.path)
        if ino is None:
            return None
        ent = self.by_ino[ino]
        if ent.qid_type != qid.type:
            return None  # the host reused the number for a different kind of file
        return ent

    def register(self, node: Node, qid: Qid, parent: int, name: str) -> tuple[Inode, list[Node]]:
        """Count one more kernel reference to the file `node` (fresh from a walk of `name` in
        directory inode `parent`) is a handle on. The fresh Node replaces the entry's older one:
        on a path-based server it is the one that names the file as it is now."""
        ent = self.existing(qid)
        if ent is None:
            old_ino = self.by_path.get(qid.path)
            if old_ino is not None:
                # Same qid.path, different type: the old file is gone. Take the number over so
                # the kernel sees the new type (it drops its old inode on the type change).
                ent = self.by_ino[old_ino]
                ent.qid_type = qid.type
        if ent is None:
            ino = self.number_for(qid.path)
            ent = Inode(ino, node, qid.path, qid.type, nlookup=1)
            ent.add_name(parent, name)
            self.by_ino[ino] = ent
            self.by_path[qid.path] = ino
            return ent, []
        ent.nlookup += 1
        ent.add_name(parent, name)
        return ent, self.replace_node(ent, node)

    def replace_node(self, ent: Inode, node: Node) -> list[Node]:
        if node is ent.node:
            return []
        ent.retired.append(ent.node)
        ent.node = node
        return self.reap(ent)

    def reap(self, ent: Inode) -> list[Node]:
        """Superseded Nodes nobody uses any more (and all of them once the entry is gone)."""
        if ent.busy:
            return []
        out, ent.retired = ent.retired, []
        if ent.dropped:
            out.append(ent.node)
            ent.dropped = False
        return out

    def forget(self, ino: int, n: int) -> list[Node]:
        """Drop `n` lookups; returns the Nodes to release if the entry went away."""
        ent = self.by_ino.get(ino)
        if ent is None:
            return []
        ent.nlookup = max(0, ent.nlookup - n)
        return self._maybe_drop(ent)

    def close_one(self, ent: Inode) -> list[Node]:
        ent.nopen = max(0, ent.nopen - 1)
        return self._maybe_drop(ent)

    def _maybe_drop(self, ent: Inode) -> list[Node]:
        if ent.nlookup > 0 or ent.nopen > 0 or ent.ino == ROOT_INODE:
            return []
        if self.by_ino.get(ent.ino) is not ent:
            return []
        del self.by_ino[ent.ino]
        if self.by_path.get(ent.qid_path) == ent.ino:
            del self.by_path[ent.qid_path]
        ent.dropped = True
        return self.reap(ent)

    def drain(self) -> list[Node]:
        nodes: list[Node] = []
        for e in self.by_ino.values():
            nodes.append(e.node)
            nodes.extend(e.retired)
        self.by_ino.clear()
        self.by_path.clear()
        return nodes
