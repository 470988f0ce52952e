"""Directory listings: a directory of any size handed to the kernel in bounded batches.

A directory handle keeps the current batch of backend entries, so a listing resumes at the
backend's cookies without asking again. The first FULL_ENTRIES entries of a listing go to the
kernel with attributes (readdirplus: one walk and getattr each, resolved a few at a time, and a
table entry until the kernel forgets it); the rest with name, type and inode number only, and the
kernel looks up the ones it needs.

This module must never keep a Node the kernel was not handed: resolved entries that did not fit
in the kernel's buffer wait in the handle for the next call, and are released with it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

from fs_backends.base import Attr, DirEntry, Node, OpenFile
from ninep.fuse.attrs import Timeouts, entry_attributes
from ninep.fuse.compat import NODEID_OFFSET, unlinked_entry
from ninep.fuse.inodes import Inode
from ninep.fuse.nodes import Nodes
from ninep.protocol import numbers as P

#: Entries asked from the backend per readdir call, and how many are resolved (walk+getattr) at
#: once while filling one kernel buffer.
READDIR_BATCH = 512
RESOLVE_CHUNK = 32
#: Concurrent walk/getattr calls while resolving directory entries.
RESOLVE_PARALLEL = 16
#: Entries of one listing handed to the kernel with attributes (readdirplus: each costs a walk,
#: a getattr and a table entry until the kernel forgets it). Past this many, entries carry only
#: name, type and inode number, and the kernel looks up the ones it needs; a directory of any
#: size is then listed without holding a handle per entry.
FULL_ENTRIES = 1024

_DT_TO_IFMT = {
    P.DT_DIR: stat.S_IFDIR,
    P.DT_REG: stat.S_IFREG,
    P.DT_LNK: stat.S_IFLNK,
    P.DT_FIFO: stat.S_IFIFO,
    P.DT_SOCK: stat.S_IFSOCK,
    P.DT_CHR: stat.S_IFCHR,
    P.DT_BLK: stat.S_IFBLK,
}


@dataclass(slots=True)
class Resolved:
    """A directory entry made ready for readdirplus: the Node to register and its attributes."""

    entry: DirEntry
    node: Node | None  # None: '.'/'..', a light entry, or the resolution failed
    attr: Attr | None
    gone: bool = False  # the name vanished since it was listed: leave it out


@dataclass(slots=True)
class DirHandle:
    """An open directory: the backend's open file and where the listing stands."""

    inode: Inode
    f: OpenFile
    # The batch of backend entries last read and the cookie it was read from.
    batch: list[DirEntry] = field(default_factory=list)
    batch_cookie: int = -1
    index: dict[int, int] = field(default_factory=dict)  # entry.offset -> position in batch
    # Entries resolved for a kernel buffer that had no room left: reused by the next call.
    ready: dict[int, Resolved] = field(default_factory=dict)  # entry.offset -> resolved
    # Entries handed to the kernel with attributes since the listing started (FULL_ENTRIES).
    full_sent: int = 0


async def drop_ready(nodes: Nodes, dh: DirHandle) -> None:
    """Release the entries resolved ahead for `dh` (rewind, close)."""
    ready: list[Node | None] = [r.node for r in dh.ready.values()]
    dh.ready.clear()
    await nodes.release(ready)


async def _entries_after(nodes: Nodes, dh: DirHandle, cookie: int) -> list[DirEntry]:
    """Backend entries following `cookie`: from the cached batch when a sequential listing
    continues in it, else one more backend readdir (always for cookie 0, so rewinddir sees
    the directory as it is now)."""
    if cookie != 0:
        if cookie == dh.batch_cookie and dh.batch:
            return dh.batch
        pos = dh.index.get(cookie)
        if pos is not None and pos + 1 < len(dh.batch):
            return dh.batch[pos + 1 :]
    else:
        await drop_ready(nodes, dh)
    batch = await nodes.backend.readdir(dh.f, cookie, READDIR_BATCH)
    dh.batch, dh.batch_cookie = batch, cookie
    dh.index = {e.offset: i for i, e in enumerate(batch)}
    return batch


async def _resolve(nodes: Nodes, dh: DirHandle, entries: Sequence[DirEntry]) -> list[Resolved]:
    out: list[Resolved | None] = [None] * len(entries)
    limiter = trio.CapacityLimiter(RESOLVE_PARALLEL)

    async def one(i: int, e: DirEntry) -> None:
        async with limiter:
            node: Node | None = None
            try:
                node = await nodes.walk_in(dh.inode, e.name)
                attr = await nodes.backend.getattr(node, P.GETATTR_ALL)
            except OSError as err:
                if node is not None:
                    await nodes.release([node])
                if err.errno != errno.ENOENT and NODEID_OFFSET is None:
                    raise
                # Removed since the listing: left out. Unreachable for another reason
                # (EMFILE, EACCES...): listed without attributes.
                out[i] = Resolved(e, None, None, gone=err.errno == errno.ENOENT)
                return
            out[i] = Resolved(e, node, attr)

    async with trio.open_nursery() as nursery:
        for i, e in enumerate(entries):
            if e.name in (".", ".."):
                out[i] = Resolved(e, None, None)
            elif e.offset in dh.ready:
                out[i] = dh.ready.pop(e.offset)
            else:
                nursery.start_soon(one, i, e)
    return [r for r in out if r is not None]


def _dot_entry(nodes: Nodes, dh: DirHandle, e: DirEntry) -> pyfuse3.EntryAttributes:
    # The kernel links no inode for '.'/'..' (it only shows d_ino and d_type).
    a = pyfuse3.EntryAttributes()
    a.st_ino = dh.inode.ino if e.name == "." else nodes.table.number_for(e.qid.path)
    a.st_mode = stat.S_IFDIR
    return a


async def fill(
    nodes: Nodes, dh: DirHandle, start_id: int, token: pyfuse3.ReaddirToken, timeouts: Timeouts
) -> None:
    """Hand the kernel the entries of `dh` after cookie `start_id` until its buffer is full."""
    cookie = start_id
    if cookie == 0:
        dh.full_sent = 0
    while True:
        entries = await _entries_after(nodes, dh, cookie)
        if not entries:
            return
        if dh.full_sent >= FULL_ENTRIES and NODEID_OFFSET is not None:
            light = [Resolved(e, None, None) for e in entries[:READDIR_BATCH]]
            resolved = light
        else:
            resolved = await _resolve(nodes, dh, entries[:RESOLVE_CHUNK])
        release: list[Node] = []
        full = False
        for r in resolved:
            e = r.entry
            if full:
                if r.node is not None:
                    dh.ready[e.offset] = r  # resolved already: the next call starts here
                continue
            attrs: pyfuse3.EntryAttributes | None
            if e.name in (".", ".."):
                attrs = _dot_entry(nodes, dh, e)
            elif r.gone:
                cookie = e.offset  # vanished since it was listed: skip it
                continue
            elif r.node is None or r.attr is None:
                ifmt = _DT_TO_IFMT.get(e.type, stat.S_IFREG)
                attrs = unlinked_entry(nodes.table.number_for(e.qid.path), ifmt)
                if attrs is None:
                    cookie = e.offset
                    continue
            else:
                attrs = entry_attributes(nodes.table.number_for(r.attr.qid.path), r.attr, timeouts)
            if not pyfuse3.readdir_reply(token, os.fsencode(e.name), attrs, e.offset):
                full = True
                if r.node is not None:
                    dh.ready[e.offset] = r
                continue
            cookie = e.offset
            if r.node is not None and r.attr is not None:
                # The kernel now holds a lookup on this entry (readdirplus).
                ent, drop = nodes.table.register(r.node, r.attr.qid, dh.inode.ino, e.name)
                ent.last_attr = r.attr
                nodes.asked.discard(ent.ino)
                dh.full_sent += 1
                release += drop
        await nodes.release(release)
        nodes.maybe_shed()
        if full:
            return
