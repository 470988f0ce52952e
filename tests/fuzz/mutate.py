"""Byte-level mutations of valid wire images, drawn by hypothesis, for the codec and session fuzzers.

A mutation is a plain tuple so that a failing case prints readably and can be pasted into a
regression test. `apply` keeps the 9P size field honest when asked (most of the time): a decoder
that only ever sees a wrong size field stops at the frame check and fuzzes nothing behind it.
"""

from __future__ import annotations

import struct

import hypothesis.strategies as hs

#: Values that sit on the edges of the field widths and of the frame.
INTERESTING = (0, 1, 2, 6, 7, 8, 16, 17, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF,
               0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)

Mutation = tuple[object, ...]

_pos = hs.integers(0, 1 << 16)
mutations: hs.SearchStrategy[Mutation] = hs.one_of(
    hs.tuples(hs.just("xor"), _pos, hs.integers(1, 255)),
    hs.tuples(hs.just("set8"), _pos, hs.sampled_from(INTERESTING)),
    hs.tuples(hs.just("set16"), _pos, hs.sampled_from(INTERESTING)),
    hs.tuples(hs.just("set32"), _pos, hs.sampled_from(INTERESTING)),
    hs.tuples(hs.just("insert"), _pos, hs.binary(min_size=1, max_size=24)),
    hs.tuples(hs.just("delete"), _pos, hs.integers(1, 24)),
    hs.tuples(hs.just("dup"), _pos, hs.integers(1, 24)),
    hs.tuples(hs.just("truncate"), _pos),
)


def apply(wire: bytes, muts: list[Mutation], fix_size: bool) -> bytes:
    """`wire` with every mutation applied in order (positions taken modulo the current length)."""
    b = bytearray(wire)
    for mut in muts:
        kind, pos = mut[0], int(mut[1])  # type: ignore[call-overload]
        p = pos % (len(b) + 1)
        if kind == "xor" and b:
            b[pos % len(b)] ^= int(mut[2])  # type: ignore[call-overload]
        elif kind in ("set8", "set16", "set32"):
            width = {"set8": 1, "set16": 2, "set32": 4}[str(kind)]
            v = int(mut[2]) & ((1 << (8 * width)) - 1)  # type: ignore[call-overload]
            if len(b) >= width:
                p = pos % (len(b) - width + 1)
                b[p : p + width] = v.to_bytes(width, "little")
        elif kind == "insert":
            b[p:p] = bytes(mut[2])  # type: ignore[call-overload]
        elif kind == "delete":
            del b[p : p + int(mut[2])]  # type: ignore[call-overload]
        elif kind == "dup":
            b[p:p] = b[p : p + int(mut[2])]  # type: ignore[call-overload]
        elif kind == "truncate":
            del b[p:]
    if fix_size and len(b) >= 4:
        struct.pack_into("<I", b, 0, len(b))
    return bytes(b)
