"""The codec: every message of every dialect round-trips through both codecs, the fast codec and
the construct reference agree byte for byte and value for value on random messages, known wire
images decode as the spec says, payloads come back as views (no copy), and garbage only ever
raises DecodeError."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import fields
from typing import Any

import hypothesis.strategies as hs
import pytest
from hypothesis import HealthCheck, given, settings

from ninep.protocol import messages as m
from ninep.protocol.codec import (
    Codec,
    DecodeError,
    EncodeError,
    codec_for,
    pack_dirent,
    reference_decode,
    reference_encode,
    unpack_dirents,
    wire_fields,
)
from ninep.protocol.numbers import DIALECTS, NONUNAME, V9P2000, V9P2000_L, V9P2000_U
from ninep.protocol.types import Qid

ALL = sorted(m.MESSAGES.items())
IDS = [cls.__name__ for _, cls in ALL]
_MAX = {id(m.u8): 0xFF, id(m.u16): 0xFFFF, id(m.u32): 0xFFFFFFFF, id(m.u64): 0xFFFFFFFFFFFFFFFF}


# --- building messages from their declarations ---------------------------------------------------


def _strategy(con: Any, dialect: str) -> hs.SearchStrategy[Any]:
    if id(con) in _MAX:
        return hs.integers(0, _MAX[id(con)])
    if con is m.string:
        return hs.text(max_size=40)
    if con is m.data:
        return hs.binary(max_size=300)
    if con is m.strings:
        return hs.lists(hs.text(max_size=20), max_size=16)
    if con is m.qid:
        return _qids
    if con is m.qids:
        return hs.lists(_qids, max_size=16)
    if con is m.stat:
        return _instance(m.Stat, dialect)
    raise AssertionError(f"no strategy for {con!r}")


_qids = hs.builds(Qid, hs.integers(0, 0xFF), hs.integers(0, 0xFFFFFFFF), hs.integers(0, 2**64 - 1))


def _instance(cls: type, dialect: str) -> hs.SearchStrategy[Any]:
    """Instances of `cls` with every on-the-wire field random and the others at their default."""
    wf = wire_fields(cls, dialect)
    kw = {n: _strategy(c, dialect) for n, c in wf}
    if issubclass(cls, m.Message):
        kw["tag"] = hs.integers(0, 0xFFFF)
    return hs.builds(cls, **kw)


def _any_message(dialect: str) -> hs.SearchStrategy[m.Message]:
    return hs.sampled_from([cls for _, cls in ALL]).flatmap(lambda cls: _instance(cls, dialect))


def _sample(cls: type, dialect: str, big: bool) -> Any:
    """A deterministic instance: all fields at their maximum (big) or small typical values."""
    kw: dict[str, Any] = {}
    for n, con in wire_fields(cls, dialect):
        if id(con) in _MAX:
            kw[n] = _MAX[id(con)] if big else 7
        elif con is m.string:
            kw[n] = "ünïcödé/名前" if big else "name"
        elif con is m.data:
            kw[n] = bytes(range(256)) * 3 if big else b""
        elif con is m.strings:
            kw[n] = [f"n{i}" for i in range(16)] if big else []
        elif con is m.qid:
            kw[n] = Qid(0x80, 0xFFFFFFFF, 2**64 - 1) if big else Qid(0, 1, 2)
        elif con is m.qids:
            kw[n] = [Qid(i, i, i) for i in range(16)] if big else []
        elif con is m.stat:
            kw[n] = _sample(m.Stat, dialect, big)
    if issubclass(cls, m.Message):
        kw["tag"] = 0xFFFE if big else 1
    return cls(**kw)


def _plain(x: Any) -> Any:
    """A message as comparable plain values (memoryviews become bytes)."""
    if isinstance(x, m.Message | m.Stat):
        return (type(x).__name__, getattr(x, "tag", None), *(_plain(getattr(x, f.name)) for f in fields(x)))
    if isinstance(x, memoryview | bytearray):
        return bytes(x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("big", [False, True], ids=["small", "max"])
@pytest.mark.parametrize("number,cls", ALL, ids=IDS)
def test_every_message_round_trips_in_both_codecs(number: int, cls: type[m.Message], dialect: str, big: bool) -> None:
    msg = _sample(cls, dialect, big)
    fast = codec_for(dialect)
    wire = fast.encode_bytes(msg)
    assert wire == reference_encode(msg, dialect)
    size, msgtype, tag = struct.unpack_from("<IBH", wire)
    assert (size, msgtype, tag) == (len(wire), number, msg.tag)
    assert _plain(fast.decode(wire)) == _plain(msg)
    assert _plain(reference_decode(wire, dialect)) == _plain(msg)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.sampled_from(DIALECTS).flatmap(lambda d: hs.tuples(hs.just(d), _any_message(d))))
def test_fast_codec_agrees_with_reference(case: tuple[str, m.Message]) -> None:
    dialect, msg = case
    fast = codec_for(dialect)
    wire = fast.encode_bytes(msg)
    assert wire == reference_encode(msg, dialect), type(msg).__name__
    assert _plain(fast.decode(wire)) == _plain(reference_decode(wire, dialect)) == _plain(msg)


def test_dialect_only_fields_are_on_the_wire_only_in_their_dialects() -> None:
    att = m.Tattach(1, 0xFFFFFFFF, "u", "a", 1000, tag=3)
    assert len(codec_for(V9P2000).encode_bytes(att)) == len(codec_for(V9P2000_L).encode_bytes(att)) - 4
    back = codec_for(V9P2000).decode(codec_for(V9P2000).encode_bytes(att))
    assert isinstance(back, m.Tattach) and back.n_uname == NONUNAME
    err = m.Rerror("No such file or directory", 2, tag=1)
    assert codec_for(V9P2000_U).encode_bytes(err).endswith(struct.pack("<I", 2))
    assert codec_for(V9P2000).decode(codec_for(V9P2000).encode_bytes(err)).errno == 0  # type: ignore[attr-defined]
    cr = m.Tcreate(1, "dev", 0x00800000 | 0o600, 0, "c 1 3", tag=2)
    assert codec_for(V9P2000_U).decode(codec_for(V9P2000_U).encode_bytes(cr)).extension == "c 1 3"  # type: ignore[attr-defined]
    assert codec_for(V9P2000).decode(codec_for(V9P2000).encode_bytes(cr)).extension == ""  # type: ignore[attr-defined]


# --- known wire images (hand-assembled from the spec, independent of both codecs) ---------------------


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<H", len(b)) + b


def _frame(msgtype: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), msgtype, tag) + body


GOLDEN = [
    (V9P2000_L, m.Tversion(8192, "9P2000.L", tag=0xFFFF),
     bytes.fromhex("1500000064ffff002000000800395032303030 2e4c".replace(" ", ""))),
    (V9P2000_L, m.Twalk(1, 2, ["a", "bc"], tag=5), _frame(110, 5, struct.pack("<IIH", 1, 2, 2) + _s("a") + _s("bc"))),
    (V9P2000_L, m.Rwalk([Qid(0x80, 1, 42)], tag=5), _frame(111, 5, struct.pack("<HBIQ", 1, 0x80, 1, 42))),
    (V9P2000_L, m.Tattach(1, 0xFFFFFFFF, "root", "", 0, tag=1),
     _frame(104, 1, struct.pack("<II", 1, 0xFFFFFFFF) + _s("root") + _s("") + struct.pack("<I", 0))),
    (V9P2000, m.Tattach(1, 0xFFFFFFFF, "glenda", "", tag=1),
     _frame(104, 1, struct.pack("<II", 1, 0xFFFFFFFF) + _s("glenda") + _s(""))),
    (V9P2000_L, m.Rlerror(2, tag=9), _frame(7, 9, struct.pack("<I", 2))),
    (V9P2000_U, m.Rerror("no", 2, tag=9), _frame(107, 9, _s("no") + struct.pack("<I", 2))),
    (V9P2000, m.Rerror("no", tag=9), _frame(107, 9, _s("no"))),
    (V9P2000_L, m.Tread(3, 1 << 40, 4096, tag=2), _frame(116, 2, struct.pack("<IQI", 3, 1 << 40, 4096))),
    (V9P2000_L, m.Rread(b"hello", tag=2), _frame(117, 2, struct.pack("<I", 5) + b"hello")),
    (V9P2000_L, m.Twrite(3, 10, b"xy", tag=2), _frame(118, 2, struct.pack("<IQI", 3, 10, 2) + b"xy")),
    (V9P2000_L, m.Tlcreate(1, "f", 0o101, 0o644, 100, tag=4),
     _frame(14, 4, struct.pack("<I", 1) + _s("f") + struct.pack("<III", 0o101, 0o644, 100))),
    (V9P2000_L, m.Tgetattr(1, 0x3FFF, tag=4), _frame(24, 4, struct.pack("<IQ", 1, 0x3FFF))),
    (V9P2000_L, m.Rgetattr(0x7FF, Qid(0, 2, 3), 0o100644, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, tag=4),
     _frame(25, 4, struct.pack("<QBIQIIIQQQQQQQQQQQQQQQ", 0x7FF, 0, 2, 3, 0o100644, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17))),
    (V9P2000_L, m.Tlock(1, 1, 1, 0, 0, 42, "host", tag=6),
     _frame(52, 6, struct.pack("<IBIQQI", 1, 1, 1, 0, 0, 42) + _s("host"))),
    (V9P2000_L, m.Tflush(5, tag=6), _frame(108, 6, struct.pack("<H", 5))),
    (V9P2000_L, m.Rclunk(tag=6), _frame(121, 6, b"")),
]

_DIR_U = (struct.pack("<HIBIQIIIQ", 0, 0, 0x80, 1, 99, 0x800001ED, 10, 20, 0)
          + _s("d") + _s("root") + _s("root") + _s("root") + _s("") + struct.pack("<III", 0, 0, 0))
GOLDEN.append((V9P2000_U, m.Rstat(m.Stat(0, 0, Qid(0x80, 1, 99), 0x800001ED, 10, 20, 0, "d", "root", "root", "root", "", 0, 0, 0), tag=3),
               _frame(125, 3, struct.pack("<HH", len(_DIR_U) + 2, len(_DIR_U)) + _DIR_U)))


@pytest.mark.parametrize("dialect,msg,wire", GOLDEN, ids=[f"{d}-{type(x).__name__}" for d, x, _ in GOLDEN])
def test_known_wire_images(dialect: str, msg: m.Message, wire: bytes) -> None:
    assert codec_for(dialect).encode_bytes(msg) == wire
    assert reference_encode(msg, dialect) == wire
    assert _plain(codec_for(dialect).decode(wire)) == _plain(msg)


# --- payloads without copies ----------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [m.Rread(b"abcdef", tag=1), m.Twrite(1, 0, b"abcdef", tag=1), m.Rreaddir(b"abcdef", tag=1)],
                         ids=lambda x: type(x).__name__)
def test_payloads_decode_as_views_into_the_buffer(msg: m.Message) -> None:
    buf = bytearray(codec_for(V9P2000_L).encode_bytes(msg))
    got = codec_for(V9P2000_L).decode(buf)
    data = got.data  # type: ignore[attr-defined]
    assert isinstance(data, memoryview)
    assert bytes(data) == b"abcdef"
    buf[-6] = ord("X")  # the view sees the change: it is the buffer, not a copy
    assert bytes(data) == b"Xbcdef"


def test_payload_is_passed_through_encode_without_copy() -> None:
    payload = memoryview(bytearray(b"z" * 100000))
    parts = codec_for(V9P2000_L).encode(m.Rread(payload, tag=1))
    assert any(p is payload for p in parts)
    assert b"".join(parts) == reference_encode(m.Rread(payload, tag=1), V9P2000_L)


def test_unencodable_values_raise_encode_error() -> None:
    with pytest.raises(EncodeError):
        codec_for(V9P2000_L).encode(m.Twalk(1, 2, ["x" * 70000]))
    with pytest.raises(EncodeError):
        codec_for(V9P2000_L).encode(m.Tclunk(2**32))


# --- directory entry helpers ------------------------------------------------------------------------------


def test_dirents_round_trip_and_reject_garbage() -> None:
    raw = pack_dirent(Qid(0x80, 0, 5), 3, 4, b"dir") + pack_dirent(Qid(0, 1, 6), 9, 8, "fïle".encode())
    assert unpack_dirents(raw) == [(Qid(0x80, 0, 5), 3, 4, "dir"), (Qid(0, 1, 6), 9, 8, "fïle")]
    for cut in range(1, len(raw)):
        if cut == len(pack_dirent(Qid(0x80, 0, 5), 3, 4, b"dir")):
            continue
        with pytest.raises(DecodeError):
            unpack_dirents(raw[:cut])


def test_stat_lists_round_trip() -> None:
    c = codec_for(V9P2000_U)
    stats = [_sample(m.Stat, V9P2000_U, big) for big in (False, True)]
    raw = b"".join(c.encode_stat(s) for s in stats)
    assert [_plain(s) for s in c.decode_stats(raw)] == [_plain(s) for s in stats]
    with pytest.raises(DecodeError):
        c.decode_stats(raw[:-1])


# --- garbage ------------------------------------------------------------------------------------------------


def _decode_only_raises_decode_error(codec: Codec, buf: bytes) -> None:
    with contextlib.suppress(DecodeError):
        codec.decode(buf)


@settings(max_examples=1500, deadline=None)
@given(hs.sampled_from(DIALECTS), hs.binary(max_size=200))
def test_random_bytes_only_raise_decode_error(dialect: str, raw: bytes) -> None:
    _decode_only_raises_decode_error(codec_for(dialect), raw)


@settings(max_examples=1500, deadline=None)
@given(hs.sampled_from(DIALECTS), hs.sampled_from([n for n, _ in ALL]), hs.binary(max_size=120))
def test_random_bodies_with_a_valid_header_only_raise_decode_error(dialect: str, msgtype: int, body: bytes) -> None:
    _decode_only_raises_decode_error(codec_for(dialect), _frame(msgtype, 1, body))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.sampled_from(DIALECTS).flatmap(lambda d: hs.tuples(hs.just(d), _any_message(d))), hs.data())
def test_truncated_and_corrupted_messages_only_raise_decode_error(case: tuple[str, m.Message], data: hs.DataObject) -> None:
    dialect, msg = case
    c = codec_for(dialect)
    wire = c.encode_bytes(msg)
    # Truncated: the size field claims the true (shorter) frame, so only field bounds can catch it.
    cut = data.draw(hs.integers(7, len(wire)))
    short = struct.pack("<I", cut) + wire[4:cut]
    if cut < len(wire):
        with pytest.raises(DecodeError):
            c.decode(short)
    # Trailing garbage after the last field.
    with pytest.raises(DecodeError):
        c.decode(struct.pack("<I", len(wire) + 1) + wire[4:] + b"\0")
    # Any single byte flipped: decodes or raises DecodeError, nothing else.
    if len(wire) > 7:
        pos = data.draw(hs.integers(7, len(wire) - 1))
        flipped = bytearray(wire)
        flipped[pos] ^= data.draw(hs.integers(1, 255))
        _decode_only_raises_decode_error(c, bytes(flipped))


def test_size_field_must_match_frame() -> None:
    wire = codec_for(V9P2000_L).encode_bytes(m.Tclunk(1, tag=1))
    for bad in (struct.pack("<I", len(wire) + 1) + wire[4:], struct.pack("<I", len(wire) - 1) + wire[4:], wire[:5]):
        with pytest.raises(DecodeError):
            codec_for(V9P2000_L).decode(bad)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_counts_overrunning_the_frame(dialect: str) -> None:
    c = codec_for(dialect)
    cases = [
        _frame(110, 1, struct.pack("<IIH", 1, 2, 16) + _s("a")),  # 16 names announced, 1 present
        _frame(110, 1, struct.pack("<IIH", 1, 2, 1) + struct.pack("<H", 500) + b"ab"),  # name longer than frame
        _frame(111, 1, struct.pack("<H", 3) + struct.pack("<BIQ", 0, 0, 0)),  # 3 qids, 1 present
        _frame(117, 1, struct.pack("<I", 0xFFFFFFFF) + b"abc"),  # Rread count overruns
        _frame(118, 1, struct.pack("<IQI", 1, 0, 10) + b"abc"),  # Twrite count overruns
        _frame(125, 1, struct.pack("<HH", 200, 198) + b"\0" * 20),  # stat size overruns
        _frame(126, 1, struct.pack("<IHH", 1, 10, 60) + b"\0" * 8),  # inner stat bigger than outer
    ]
    for wire in cases:
        with pytest.raises(DecodeError) as ei:
            c.decode(wire)
        assert ei.value.tag == 1


@pytest.mark.parametrize("dialect", DIALECTS)
def test_invalid_utf8_raises_decode_error_with_einval(dialect: str) -> None:
    import errno

    wire = _frame(110, 4, struct.pack("<IIH", 1, 2, 1) + struct.pack("<H", 2) + b"\xff\xfe")
    with pytest.raises(DecodeError) as ei:
        codec_for(dialect).decode(wire)
    assert ei.value.errno == errno.EINVAL and ei.value.tag == 4


def test_unknown_type_raises_decode_error_with_eopnotsupp() -> None:
    import errno

    for msgtype in (0, 6, 106, 200, 255):
        with pytest.raises(DecodeError) as ei:
            codec_for(V9P2000_L).decode(_frame(msgtype, 8, b"abc"))
        assert ei.value.errno == errno.EOPNOTSUPP and ei.value.tag == 8 and ei.value.msgtype == msgtype
