"""The backend Nodes behind the inode table: running a backend call on an inode's Node, finding
the file again when the Node went stale, registering fresh Nodes, releasing superseded ones, and
keeping the table inside its limit by asking the kernel to forget.

Every inode the kernel knows holds a backend Node (an fd, a fid). Past `max_inodes` the oldest
unused ones are handed back by telling the kernel to drop their dentries. Nodes of a 9P server
whose fids are paths (diod) go stale after a rename or an unlink of another name; each inode
remembers the names it was reached by and is walked to again when that happens.

This module must never make blocking syscalls on the trio loop (the backend runs its own in
worker threads), never touch paths of the host, and never build kernel answers: it deals in
Nodes and inodes only.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pyfuse3

from fs_backends.base import Attr, Backend, Node, OpenFile
from ninep.fuse.inodes import ROOT_INODE, Inode, InodeTable
from ninep.protocol import numbers as P

log = logging.getLogger("ninep.fuse")

R = TypeVar("R")


class Nodes:
    """The inode table of one mount with the backend its Nodes belong to."""

    def __init__(
        self, backend: Backend, root: Node, *, max_inodes: int | None, stale_nodes: bool
    ) -> None:
        self.backend = backend
        self.table = InodeTable()
        self.root = self.table.add_root(root)
        #: Above this many inodes the oldest unused ones are handed back (see shed): every
        #: inode holds a backend handle (an fd for a local export, a fid for a 9P server).
        self.max_inodes = max_inodes
        #: Whether backend Nodes can stop naming their file: then ENOENT/ESTALE on a Node makes
        #: us walk to the file again.
        self.stale_nodes = stale_nodes
        #: Inodes the kernel was asked to forget and has not yet.
        self.asked: set[int] = set()
        self._last_shed = 0.0

    # ----------------------------------------------------------------- the table's limit

    def maybe_shed(self) -> None:
        # Entries already asked are on their way out: only more than that calls for a scan.
        if self.max_inodes is not None and len(self.table) - len(self.asked) > self.max_inodes:
            self.shed()

    def shed(self, force: bool = False) -> int:
        """Ask the kernel to drop the dentries of the oldest unused inodes, down to 80% of the
        limit; it then forgets them and their backend handles are released. The kernel only
        knows inodes through its dentries, so this is the one way to make it let go early.
        Entries already asked (the kernel forgets asynchronously) are not asked again."""
        by_ino = self.table.by_ino
        self.asked = {i for i in self.asked if i in by_ino}
        limit = self.max_inodes if self.max_inodes is not None else len(by_ino)
        want = len(by_ino) - int(limit * 0.8) - len(self.asked)
        if force:
            want = max(want, 64)
        asked = 0
        for ent in list(by_ino.values()):
            if asked >= want:
                break
            if ent.ino == ROOT_INODE or ent.nopen or ent.busy or not ent.names:
                continue
            if ent.ino in self.asked:
                continue
            for parent, name in ent.names:
                if parent in by_ino:
                    # "deleted": without it the kernel drops the dentry but keeps the inode in
                    # its cache (and sends no forget); with it the unused inode is evicted. A
                    # later lookup brings the same inode number back.
                    pyfuse3.invalidate_entry_async(
                        parent, os.fsencode(name), deleted=ent.ino, ignore_enoent=True
                    )
            self.asked.add(ent.ino)
            asked += 1
        if asked and time.monotonic() - self._last_shed > 5:
            self._last_shed = time.monotonic()
            log.info("inode table at %d: asked the kernel to forget %d", len(by_ino), asked)
        return asked

    # ----------------------------------------------------------------- handles

    async def release(self, nodes: Sequence[Node | None]) -> None:
        for n in nodes:
            if n is None:
                continue
            try:
                await self.backend.release(n)
            except Exception:  # release must not fail a request; the contract says it won't
                log.exception("backend release failed")

    async def close_quietly(self, f: OpenFile) -> None:
        try:
            await self.backend.close(f)
        except Exception:
            log.exception("backend close failed")

    async def reap(self, ent: Inode) -> None:
        """Release the Nodes `ent` no longer needs once no backend call uses them."""
        if not ent.busy and (ent.retired or ent.dropped):
            await self.release(self.table.reap(ent))

    # ----------------------------------------------------------------- backend calls

    async def on(self, ent: Inode, op: Callable[[Node], Awaitable[R]], *, names: bool = False) -> R:
        """Run `op(ent.node)`; if the Node went stale (ENOENT/ESTALE: a path-based server after
        a rename or unlink of another name) walk to the file again and retry once.

        `names`: `op` works on a name inside the directory (walk, unlink, create...), so ENOENT
        usually means the name is missing; a getattr on the directory tells which it is."""
        ent.busy += 1
        try:
            try:
                return await op(ent.node)
            except OSError as e:
                if not self.stale_nodes or e.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
                if not ent.names:
                    raise
                if names and await self._node_ok(ent.node):
                    raise
                if not await self._rewalk(ent):
                    raise
            return await op(ent.node)
        finally:
            ent.busy -= 1
            await self.reap(ent)

    async def getattr(self, ent: Inode) -> Attr:
        """All attributes of the file `ent` is."""
        return await self.on(ent, lambda n: self.backend.getattr(n, P.GETATTR_ALL))

    async def fresh_attr(self, node: Node, opened: OpenFile | None = None) -> Attr:
        """All attributes of a Node just made; if that fails the Node (and `opened`, the file
        open on it) is let go before the error goes on."""
        try:
            return await self.backend.getattr(node, P.GETATTR_ALL)
        except BaseException:
            if opened is not None:
                await self.close_quietly(opened)
            await self.release([node])
            raise

    async def walk_one(self, dir: Node, name: str) -> Node:
        nodes = await self.backend.walk(dir, [name])
        if not nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if len(nodes) > 1:  # a backend should never return more; do not leak them
            await self.release(nodes[1:])
        return nodes[0]

    async def walk_in(self, parent: Inode, name: str) -> Node:
        """A fresh Node of `name` in directory `parent`."""
        return await self.on(parent, lambda d: self.walk_one(d, name), names=True)

    async def lookup(self, parent: Inode, name: str) -> tuple[Inode, Attr]:
        """One more kernel lookup of `name` in `parent`: the inode it is and its attributes."""
        node = await self.walk_in(parent, name)
        attr = await self.fresh_attr(node)
        ent, drop = self.table.register(node, attr.qid, parent.ino, name)
        self.asked.discard(ent.ino)
        await self.release(drop)
        self.maybe_shed()
        return ent, attr

    async def refresh_name(self, ent: Inode | None, parent: Inode, name: str) -> Inode | None:
        """After a link or rename the kernel sends no lookup: walk the new name so the entry's
        Node names the file as it is now (a path-based server's old handle may name nothing)."""
        try:
            node = await self.walk_in(parent, name)
        except OSError:
            return None
        if ent is None:
            ent = self.table.existing(node.qid)
        if ent is None or ent.qid_path != node.qid.path:
            await self.release([node])
            return None
        ent.add_name(parent.ino, name)
        await self.release(self.table.replace_node(ent, node))
        return ent

    # ----------------------------------------------------------------- stale Nodes

    async def _node_ok(self, node: Node) -> bool:
        try:
            await self.backend.getattr(node, P.GETATTR_MODE)
        except OSError:
            return False
        return True

    async def _rewalk(self, ent: Inode, depth: int = 0) -> bool:
        """Find the file `ent` describes again by one of its known (directory, name)s."""
        if depth > 64:
            return False
        for parent_ino, name in list(ent.names):
            parent = self.table.by_ino.get(parent_ino)
            if parent is None or parent is ent:
                ent.drop_name(parent_ino, name)
                continue
            node = await self._walk_again(parent, name, depth)
            if node is None:
                ent.drop_name(parent_ino, name)
                continue
            if node.qid.path != ent.qid_path:
                await self.release([node])  # the name now names another file
                ent.drop_name(parent_ino, name)
                continue
            await self.release(self.table.replace_node(ent, node))
            return True
        return False

    async def _walk_again(self, parent: Inode, name: str, depth: int) -> Node | None:
        parent.busy += 1
        try:
            for attempt in range(2):
                try:
                    return await self.walk_one(parent.node, name)
                except OSError as e:
                    if attempt or e.errno not in (errno.ENOENT, errno.ESTALE):
                        return None
                    if await self._node_ok(parent.node):
                        return None
                    if not await self._rewalk(parent, depth + 1):
                        return None
            return None
        finally:
            parent.busy -= 1
            await self.reap(parent)
