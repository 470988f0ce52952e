"""Fuzzing a whole Session: scripts of valid and mutated T-messages against the memory and local
backends (see tests/kits/session.py for the peer and the invariants it checks).

Messages are built from the codec's own declarations with every fid field drawn from a pool of
five (so fids collide, get clunked and reused, and walks start from open fids), tags from a small
pool (duplicates in flight), names from a handful that exist or not ('..', '', 'a/b'), sizes and
offsets at their edges, and any dialect for any message. Some frames are mutated byte-wise, some
carry a size over the negotiated msize or under the header.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hypothesis.strategies as hs
import pytest
from hypothesis import given

from fs_backends.base import Backend
from ninep.protocol import messages as m
from ninep.protocol.codec import codec_for, wire_fields
from ninep.protocol.numbers import (
    DIALECTS,
    MIN_MSIZE,
    NOFID,
    NONUNAME,
    NOTAG,
    V9P2000,
    V9P2000_L,
    V9P2000_U,
)
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.mutate import apply, mutations
from tests.kits.session import FLUSH_TAG_BASE, MAX_MSIZE, Batch, Frame, run_script
from tests.protocol.test_codec import _MAX, _instance, _strategy

FIDS = hs.sampled_from([0, 1, 2, 3, NOFID])
# Mostly distinct tags, sometimes one of a few (duplicates in flight, flushes that hit).
TAGS = hs.one_of(hs.sampled_from([0, 1, 2, 3, NOTAG]), *[hs.integers(4, FLUSH_TAG_BASE - 1)] * 4)
NAMES = hs.sampled_from(["a", "b", "d", "f", "..", ".", "", "a/b", "é"]) | hs.text(max_size=8)
_EDGE = [0, 1, 7, 100, 4095, 4096, 8192, MAX_MSIZE, 1 << 20, 2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1]
_FID_FIELDS = {"fid", "newfid", "dfid", "afid", "olddirfid", "newdirfid", "dirfd"}
_NAME_FIELDS = {"name", "oldname", "newname", "symtgt", "extension"}


def _edge(bits: int) -> hs.SearchStrategy[int]:
    top = (1 << bits) - 1
    return hs.sampled_from([v for v in _EDGE if v <= top])


def _field(name: str, con: Any, dialect: str) -> hs.SearchStrategy[Any]:
    if name in _FID_FIELDS:
        return FIDS
    if name == "oldtag":
        return TAGS
    if name in _NAME_FIELDS:
        return NAMES
    if name == "wname":
        return hs.lists(NAMES, max_size=4) | hs.lists(hs.just("d"), min_size=15, max_size=20)
    if name == "version":
        return hs.sampled_from([V9P2000_L, V9P2000_U, V9P2000, "9P2000.x", "bogus", ""])
    if name in ("uname", "aname"):
        return hs.sampled_from(["", "root", "nobody", "/", "nonexistent"])
    if name == "n_uname":
        return hs.sampled_from([0, 1000, 65534, NONUNAME])
    if name == "msize":
        return hs.sampled_from([0, 100, MIN_MSIZE - 1, MIN_MSIZE, 8192, MAX_MSIZE, 1 << 20, 2**32 - 1])
    if name == "data":
        return hs.binary(max_size=64) | hs.integers(0, MAX_MSIZE + 64).map(lambda n: b"w" * n)
    if name == "stat":
        return _instance(m.Stat, dialect)
    if name in ("offset", "size", "count", "start", "length", "attr_size"):
        return _edge(8 * con.sizeof()) | _strategy(con, dialect)
    if id(con) in _MAX:
        return _strategy(con, dialect) | hs.integers(0, 8)
    return _strategy(con, dialect)


def _request(dialect: str) -> hs.SearchStrategy[m.Message]:
    tmsgs = [cls for n, cls in sorted(m.MESSAGES.items()) if n % 2 == 0]
    # Tversion and Tflush are weighted up: they change the session's state the most.
    weighted = tmsgs + [m.Tversion, m.Tflush, m.Tattach, m.Twalk, m.Tclunk, m.Tlopen, m.Tlcreate]
    return hs.sampled_from(weighted).flatmap(
        lambda cls: hs.builds(
            cls,
            **{n: _field(n, con, dialect) for n, con in wire_fields(cls, dialect)},
            tag=TAGS,
        )
    )


@hs.composite
def frames(draw: hs.DrawFn) -> Frame:
    kind = draw(hs.sampled_from(["msg"] * 20 + ["mutated"] * 4 + ["badsize"]))
    if kind == "badsize":
        size = draw(hs.sampled_from([0, 1, 6, MAX_MSIZE + 1, 2**32 - 1]))
        return Frame(struct.pack("<IBH", size, 120, 1) + b"\0" * 4)
    dialect = draw(hs.sampled_from(DIALECTS))
    msg = draw(_request(dialect))
    try:
        wire = codec_for(dialect).encode_bytes(msg)
    except ValueError:  # a string over 65535 bytes and the like: send a Tclunk instead
        wire = codec_for(dialect).encode_bytes(m.Tclunk(0, tag=msg.tag))
    if kind == "mutated":
        wire = apply(wire, draw(hs.lists(mutations, min_size=1, max_size=3)), fix_size=draw(hs.sampled_from([True] * 5 + [False])))
    return Frame(wire)


def _opening() -> Batch:
    """A proper start most scripts get, so the fuzzing happens past Tversion and Tattach."""
    L = codec_for(V9P2000_L)
    return [
        Frame(L.encode_bytes(m.Tversion(8192, V9P2000_L, tag=NOTAG))),
        Frame(L.encode_bytes(m.Tattach(0, NOFID, "root", "", 0, tag=1))),
    ]


scripts = hs.tuples(hs.booleans() | hs.just(True), hs.lists(hs.lists(frames(), min_size=1, max_size=6), min_size=1, max_size=6)).map(
    lambda t: ([_opening()] if t[0] else []) + t[1]
)


@contextmanager
def backend_factory(kind: str) -> Iterator[Callable[[], Backend]]:
    if kind == "memory":
        from fs_backends.memory import MemoryBackend

        yield lambda: MemoryBackend(max_file_size=1 << 20)
        return
    from fs_backends.local import LocalBackend

    with tempfile.TemporaryDirectory(prefix="ninep-fuzz-") as d:
        yield lambda: LocalBackend(d)


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_session_survives_random_scripts(kind: str) -> None:
    budget = {"memory": 120, "local": 60}[kind]

    @fuzz_settings(budget)
    @given(scripts)
    def fuzz(batches: list[Batch]) -> None:
        with backend_factory(kind) as make:
            run_script(make, batches)

    fuzz()
