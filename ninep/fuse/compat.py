"""A pyfuse3 workaround: readdirplus entries the kernel shows but does not link.

pyfuse3's `EntryAttributes.st_ino` sets both the node id (the inode the kernel links and will
later forget) and attr.st_ino (the d_ino readdir shows). A readdirplus entry with node id 0 is
shown but not linked (Linux fuse_direntplus_link), which is what a listing without lookups needs;
pyfuse3 has no API for it, so the field is located once, at import, and its layout checked.

This module must never write into an EntryAttributes at an offset it has not verified: when the
layout is not the expected one, `NODEID_OFFSET` is None and `unlinked_entry` returns None, and
callers do without.
"""

from __future__ import annotations

import ctypes

import pyfuse3


def _find_nodeid_offset() -> int | None:
    """Where pyfuse3 keeps the node id of an EntryAttributes (fuse_entry_param.ino).

    The layout is checked: node id, generation, st_dev, st_ino (struct fuse_entry_param). None
    if the layout is not that."""
    try:
        magic = 0x5A17_00C0_FFEE_1234
        e = pyfuse3.EntryAttributes()
        e.st_ino = magic
        raw = ctypes.string_at(id(e), type(e).__basicsize__)
        hits = [
            i
            for i in range(0, len(raw) - 7, 8)
            if int.from_bytes(raw[i : i + 8], "little") == magic
        ]
        if len(hits) != 2 or hits[1] - hits[0] != 24:
            return None
        ctypes.c_uint64.from_address(id(e) + hits[0]).value = 0
        if e.st_ino != 0 or ctypes.c_uint64.from_address(id(e) + hits[1]).value != magic:
            return None
        return hits[0]
    except Exception:  # any surprise: do without
        return None


#: Offset of the node id inside an EntryAttributes, or None when pyfuse3's layout is unknown.
NODEID_OFFSET = _find_nodeid_offset()


def unlinked_entry(ino: int, mode: int) -> pyfuse3.EntryAttributes | None:
    """A readdirplus entry showing inode number `ino` with no node for the kernel to link."""
    if NODEID_OFFSET is None:
        return None
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode = mode
    e.entry_timeout = 0
    e.attr_timeout = 0
    ctypes.c_uint64.from_address(id(e) + NODEID_OFFSET).value = 0
    return e
