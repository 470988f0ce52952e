"""Fuzzing the codec with mutated valid encodings of every message of every dialect.

tests/codec already feeds random bytes, random bodies behind a valid header and single flipped
bytes; this adds stacked structural mutations (field edges, inserted, deleted, duplicated and cut
ranges, a fixed-up size field) and checks more than "only DecodeError":

- a rejection carries a real errno, and the tag whenever the header was intact (the session
  answers with them);
- whatever the fast codec accepts re-encodes to exactly the same bytes (no two wire images mean
  the same message) and the construct reference reads the same values from it;
- whatever the reference reads as a canonical message, the fast codec accepts too;
- 9P2000 Dir lists and 9P2000.L Rreaddir payloads (parsed by the client and the remote backend
  from a possibly hostile server) obey the same rules.
"""

from __future__ import annotations

import struct

import hypothesis.strategies as hs
from hypothesis import given

from ninep.protocol import messages as m
from ninep.protocol.codec import (
    DecodeError,
    codec_for,
    pack_dirent,
    reference_decode,
    reference_encode,
    unpack_dirents,
)
from ninep.protocol.numbers import DIALECTS, V9P2000, V9P2000_U
from ninep.protocol.types import Qid
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.mutate import apply, mutations
from tests.protocol.test_codec import _any_message, _instance, _plain


def check_decode(dialect: str, buf: bytes) -> m.Message | None:
    """Decodes `buf` and checks every invariant above; returns the message or None if rejected."""
    c = codec_for(dialect)
    header_ok = len(buf) >= 7 and struct.unpack_from("<I", buf)[0] == len(buf)
    try:
        msg = c.decode(buf)
    except DecodeError as e:
        assert isinstance(e.errno, int) and e.errno > 0
        if header_ok:
            assert e.tag == struct.unpack_from("<H", buf, 5)[0]
        msg = None
    if msg is not None:
        assert c.encode_bytes(msg) == buf, "a decoded message re-encodes differently"
        assert _plain(reference_decode(buf, dialect)) == _plain(msg)
        return msg
    if header_ok and buf[4] in m.MESSAGES:
        try:
            ref = reference_decode(buf, dialect)
            canonical = reference_encode(ref, dialect) == buf
        except Exception:  # construct raises many kinds; only acceptance matters here
            canonical = False
        assert not canonical, "the fast codec rejects a message the reference reads"
    return None


_case = hs.sampled_from(DIALECTS).flatmap(lambda d: hs.tuples(hs.just(d), _any_message(d)))


@fuzz_settings(1000)
@given(_case, hs.lists(mutations, min_size=1, max_size=6), hs.booleans() | hs.just(True))
def test_mutated_messages_decode_canonically_or_raise_decode_error(
    case: tuple[str, m.Message], muts: list[tuple[object, ...]], fix_size: bool
) -> None:
    dialect, msg = case
    check_decode(dialect, apply(codec_for(dialect).encode_bytes(msg), muts, fix_size))


@fuzz_settings(400)
@given(_case, _case, hs.integers(0, 1 << 16), hs.integers(0, 1 << 16))
def test_spliced_messages_decode_canonically_or_raise_decode_error(
    a: tuple[str, m.Message], b: tuple[str, m.Message], cut_a: int, cut_b: int
) -> None:
    """The head of one message on the tail of another (often of another type or dialect)."""
    dialect = a[0]
    wa, wb = codec_for(a[0]).encode_bytes(a[1]), codec_for(b[0]).encode_bytes(b[1])
    check_decode(dialect, apply(wa[: cut_a % (len(wa) + 1)] + wb[cut_b % (len(wb) + 1) :], [], True))


@fuzz_settings(300)
@given(
    hs.sampled_from([V9P2000, V9P2000_U]).flatmap(
        lambda d: hs.tuples(hs.just(d), hs.lists(_instance(m.Stat, d), max_size=4))
    ),
    hs.lists(mutations, max_size=4),
)
def test_mutated_dir_lists_decode_canonically_or_raise_decode_error(
    case: tuple[str, list[m.Stat]], muts: list[tuple[object, ...]]
) -> None:
    dialect, stats = case
    c = codec_for(dialect)
    raw = apply(b"".join(c.encode_stat(s) for s in stats), muts, fix_size=False)
    try:
        got = c.decode_stats(raw)
    except DecodeError:
        return
    assert b"".join(c.encode_stat(s) for s in got) == raw


_qid = hs.builds(Qid, hs.integers(0, 0xFF), hs.integers(0, 0xFFFFFFFF), hs.integers(0, 2**64 - 1))
_dirent = hs.tuples(_qid, hs.integers(0, 2**64 - 1), hs.integers(0, 0xFF), hs.text(max_size=30))


@fuzz_settings(300)
@given(hs.lists(_dirent, max_size=5), hs.lists(mutations, max_size=4))
def test_mutated_readdir_payloads_decode_canonically_or_raise_decode_error(
    entries: list[tuple[Qid, int, int, str]], muts: list[tuple[object, ...]]
) -> None:
    raw = apply(b"".join(pack_dirent(q, o, t, n.encode()) for q, o, t, n in entries), muts, fix_size=False)
    try:
        got = unpack_dirents(raw)
    except DecodeError:
        return
    assert b"".join(pack_dirent(q, o, t, n.encode()) for q, o, t, n in got) == raw
