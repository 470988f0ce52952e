"""Encode and decode 9P messages, from the declarations in `ninep.protocol.messages`.

Two codecs are derived from the same declarations:
- the reference codec: `construct` Structs built per dialect (`reference_decode`,
  `reference_encode`); clear and obviously right, but a few microseconds per message;
- the fast codec: Python source generated per (message, dialect) from the field list — one
  `struct` call per run of fixed-size fields, bounds-checked strings and payloads, payloads
  returned as memoryviews (never copied) — compiled once at import.
A property test proves both agree byte for byte; the server uses the fast one.

Decoding never trusts a length: every count is checked against the frame before it is used, and a
malformed message raises `DecodeError` (carrying the tag when the header was readable), never
anything else. This module must never do I/O or know about sessions.
"""

from __future__ import annotations

import errno
import struct
import typing
from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import cache
from typing import Any

import construct as cs

from ninep.protocol import messages as m
from ninep.protocol.numbers import DIALECTS, HEADER_SIZE, V9P2000_U
from ninep.protocol.types import Qid

Buffer = bytes | bytearray | memoryview

HEADER = struct.Struct("<IBH")
_INT_FORMATS = {id(m.u8): "B", id(m.u16): "H", id(m.u32): "I", id(m.u64): "Q"}


class DecodeError(Exception):
    """A malformed message. `tag` is None when even the header could not be read."""

    def __init__(self, message: str, tag: int | None = None, msgtype: int | None = None,
                 err: int = errno.EPROTO) -> None:
        super().__init__(message)
        self.tag = tag
        self.msgtype = msgtype
        self.errno = err


class EncodeError(ValueError):
    """A message that cannot be put on the wire (a string over 65535 bytes, say)."""


# --- the declarations, per dialect --------------------------------------------------------------


_wire_fields: dict[tuple[type, str], tuple[tuple[str, Any], ...]] = {}


def wire_fields(cls: type, dialect: str) -> tuple[tuple[str, Any], ...]:
    """(name, construct-or-marker) of the fields `cls` has on the wire in `dialect`, in order."""
    key = (cls, dialect)
    if key not in _wire_fields:
        _wire_fields[key] = _compute_wire_fields(cls, dialect)
    return _wire_fields[key]


def _compute_wire_fields(cls: type, dialect: str) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in fields(cls):
        if f.name == "tag":
            continue
        meta = hints[f.name].__metadata__
        only = [x for x in meta[1:] if isinstance(x, m.Only)]
        if only and dialect not in only[0].dialects:
            continue
        out.append((f.name, meta[0]))
    return tuple(out)


# --- reference codec (construct) ----------------------------------------------------------------


class _StatAdapter(cs.Adapter):
    def __init__(self, subcon: cs.Construct, names: Sequence[str]) -> None:
        super().__init__(subcon)
        self.names = tuple(names)

    def _decode(self, obj: cs.Container, context: object, path: str) -> m.Stat:
        return m.Stat(**{n: obj[n] for n in self.names})

    def _encode(self, obj: m.Stat, context: object, path: str) -> dict[str, Any]:
        return {n: getattr(obj, n) for n in self.names}


@cache
def stat_construct(dialect: str) -> cs.Construct:
    """A Dir as stored in Rread of a directory: size[2] followed by its fields."""
    wf = wire_fields(m.Stat, dialect)
    return cs.Prefixed(cs.Int16ul, _StatAdapter(cs.Struct(*(n / c for n, c in wf)), [n for n, _ in wf]))


_reference_structs: dict[tuple[type, str], cs.Construct] = {}


def reference_struct(cls: type[m.Message], dialect: str) -> cs.Construct:
    key = (cls, dialect)
    if key not in _reference_structs:
        _reference_structs[key] = _build_reference_struct(cls, dialect)
    return _reference_structs[key]


def _build_reference_struct(cls: type[m.Message], dialect: str) -> cs.Construct:
    parts = []
    for name, con in wire_fields(cls, dialect):
        if con is m.stat:  # stat[n]: a count, then the Dir with its own size
            con = cs.Prefixed(cs.Int16ul, stat_construct(dialect))
        parts.append(name / con)
    return cs.Struct(*parts)


def reference_encode(msg: m.Message, dialect: str) -> bytes:
    values = {n: getattr(msg, n) for n, _ in wire_fields(type(msg), dialect)}
    values = {n: bytes(v) if isinstance(v, memoryview) else v for n, v in values.items()}
    body = reference_struct(type(msg), dialect).build(values)
    return HEADER.pack(HEADER_SIZE + len(body), msg.msgtype, msg.tag) + body


def reference_decode(buf: Buffer, dialect: str) -> m.Message:
    size, msgtype, tag = HEADER.unpack_from(buf, 0)
    cls = m.MESSAGES[msgtype]
    wf = wire_fields(cls, dialect)
    obj = reference_struct(cls, dialect).parse(bytes(buf[HEADER_SIZE:size]))
    values = {n: (list(obj[n]) if isinstance(obj[n], list) else obj[n]) for n, _ in wf}
    return cls(**values, tag=tag)


# --- fast codec (generated) ---------------------------------------------------------------------


class _Gen:
    """Writes the source of one decoder and one encoder for a field list."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.consts: dict[str, object] = {}

    def struct_const(self, fmt: str) -> str:
        name = f"_S_{fmt}"
        self.consts[name] = struct.Struct("<" + fmt)
        return name

    def runs(self, wf: Sequence[tuple[str, Any]]) -> list[tuple[str, list[str]] | tuple[str, str]]:
        """Groups fields into ("fixed", [names]) runs and single variable-size fields."""
        out: list[Any] = []
        for name, con in wf:
            if id(con) in _INT_FORMATS or con is m.qid:
                if out and out[-1][0] == "fixed":
                    out[-1][1].append(name)
                else:
                    out.append(("fixed", [name]))
            else:
                out.append((name, name))
        return out

    def fixed_format(self, names: list[str], wf: dict[str, Any]) -> str:
        return "".join("BIQ" if wf[n] is m.qid else _INT_FORMATS[id(wf[n])] for n in names)

    # decoding -------------------------------------------------------------------------------
    def decode_body(self, wf: Sequence[tuple[str, Any]], lines: list[str], ind: str) -> None:
        """Lines that read `wf` from buf at offset `o` (bounded by `end`) into locals f_<name>."""
        wfd = dict(wf)
        for kind, what in self.runs(wf):
            if kind == "fixed":
                assert isinstance(what, list)
                fmt = self.fixed_format(what, wfd)
                targets = []
                for n in what:
                    targets += [f"q_{n}_t", f"q_{n}_v", f"q_{n}_p"] if wfd[n] is m.qid else [f"f_{n}"]
                s = self.struct_const(fmt)
                lines.append(f"{ind}{', '.join(targets)}, = {s}.unpack_from(buf, o); o += {struct.calcsize('<' + fmt)}")
                for n in what:
                    if wfd[n] is m.qid:
                        lines.append(f"{ind}f_{n} = _tnew(Qid, (q_{n}_t, q_{n}_v, q_{n}_p))")
                continue
            assert isinstance(what, str)
            n, con = what, wfd[what]
            if con is m.string:
                lines += [f"{ind}(k,) = _S_H.unpack_from(buf, o); o += 2; e = o + k",
                          f"{ind}if e > end: raise _short()",
                          f"{ind}f_{n} = buf[o:e].decode(); o = e"]
            elif con is m.data:
                lines += [f"{ind}(k,) = _S_I.unpack_from(buf, o); o += 4; e = o + k",
                          f"{ind}if e > end: raise _short()",
                          f"{ind}f_{n} = buf[o:e]; o = e"]
            elif con is m.strings:
                lines += [f"{ind}(c,) = _S_H.unpack_from(buf, o); o += 2", f"{ind}f_{n} = []",
                          f"{ind}for _ in range(c):",
                          f"{ind}    (k,) = _S_H.unpack_from(buf, o); o += 2; e = o + k",
                          f"{ind}    if e > end: raise _short()",
                          f"{ind}    f_{n}.append(buf[o:e].decode()); o = e"]
            elif con is m.qids:
                lines += [f"{ind}(c,) = _S_H.unpack_from(buf, o); o += 2; e = o + 13 * c",
                          f"{ind}if e > end: raise _short()",
                          f"{ind}f_{n} = list(map(_mkqid, _S_BIQ.iter_unpack(buf[o:e]))); o = e"]
            elif con is m.stat:
                lines += [f"{ind}(k,) = _S_H.unpack_from(buf, o); o += 2; e = o + k",
                          f"{ind}if e > end: raise _short()",
                          f"{ind}f_{n}, o = _dec_stat(buf, o, e)",
                          f"{ind}if o != e: raise _short()"]
            else:  # pragma: no cover - a declaration the generator does not know
                raise TypeError(f"no fast codec for field {n}: {con!r}")

    # encoding -------------------------------------------------------------------------------
    def encode_body(self, wf: Sequence[tuple[str, Any]], lines: list[str], ind: str, src: str) -> None:
        """Lines that append the encoding of `wf` (values from object `src`) to list `p`;
        a data field ends the list and is kept apart as `d`."""
        wfd = dict(wf)
        for kind, what in self.runs(wf):
            if kind == "fixed":
                assert isinstance(what, list)
                fmt = self.fixed_format(what, wfd)
                args = []
                for n in what:
                    args += ([f"{src}.{n}.type", f"{src}.{n}.version", f"{src}.{n}.path"]
                             if wfd[n] is m.qid else [f"{src}.{n}"])
                lines.append(f"{ind}p.append({self.struct_const(fmt)}.pack({', '.join(args)}))")
                continue
            assert isinstance(what, str)
            n, con = what, wfd[what]
            if con is m.string:
                lines += [f"{ind}b = {src}.{n}.encode('utf-8')",
                          f"{ind}if len(b) > 0xFFFF: raise EncodeError('string too long: {n}')",
                          f"{ind}p.append(_S_H.pack(len(b))); p.append(b)"]
            elif con is m.data:
                lines += [f"{ind}d = {src}.{n}", f"{ind}p.append(_S_I.pack(len(d)))"]
            elif con is m.strings:
                lines += [f"{ind}p.append(_S_H.pack(len({src}.{n})))", f"{ind}for s in {src}.{n}:",
                          f"{ind}    b = s.encode('utf-8')",
                          f"{ind}    if len(b) > 0xFFFF: raise EncodeError('string too long')",
                          f"{ind}    p.append(_S_H.pack(len(b))); p.append(b)"]
            elif con is m.qids:
                lines.append(f"{ind}p.append(_S_H.pack(len({src}.{n})) + b''.join([_S_BIQ.pack(*q) for q in {src}.{n}]))")
            elif con is m.stat:
                lines += [f"{ind}b = _enc_stat({src}.{n})", f"{ind}p.append(_S_H.pack(len(b))); p.append(b)"]
            else:  # pragma: no cover
                raise TypeError(f"no fast codec for field {n}: {con!r}")


def _short() -> DecodeError:
    return DecodeError("field runs past the end of the message")


@cache
def _fast_codec(dialect: str) -> tuple[dict[int, Callable[..., m.Message]], dict[int, Callable[..., list[Buffer]]], Callable[..., Any], Callable[..., bytes]]:
    gen = _Gen(dialect)
    src: list[str] = []
    # The Dir structure, used inside Rstat/Twstat and in 9P2000 directory reads.
    swf = wire_fields(m.Stat, dialect)
    src.append("def _dec_stat(buf, o, end):")
    src += ["    (k,) = _S_H.unpack_from(buf, o); o += 2; end2 = o + k",
            "    if end2 > end: raise _short()", "    end = end2"]
    gen.decode_body(swf, src, "    ")
    src.append("    if o != end: raise _short()")
    src.append(f"    return Stat({', '.join(f'f_{n}' for n, _ in swf)}), o")
    src.append("def _enc_stat(x):")
    src.append("    p = []")
    gen.encode_body(swf, src, "    ", "x")
    src.append("    b = b''.join(p)")
    src.append("    return _S_H.pack(len(b)) + b")
    for number, cls in sorted(m.MESSAGES.items()):
        wf = wire_fields(cls, dialect)
        name = cls.__name__
        src.append(f"def dec_{name}(buf, end, tag):")
        if not any(con is m.data for _, con in wf):
            # No payload to keep as a view: one copy to bytes makes every string slice cheaper.
            # (No message has both a payload and strings.)
            src.append("    buf = bytes(buf)")
        src.append("    o = 7")
        gen.decode_body(wf, src, "    ")
        src.append("    if o != end: raise DecodeError('trailing bytes after the last field')")
        args = ", ".join(f"f_{n}" for n, _ in wf)
        src.append(f"    r = {name}({args}); r.tag = tag; return r")
        src.append(f"def enc_{name}(x):")
        src.append("    p = []")
        gen.encode_body(wf, src, "    ", "x")
        has_data = any(con is m.data for _, con in wf)
        runs = gen.runs(wf)
        if len(runs) == 1 and runs[0][0] == "fixed":
            # All fields fixed-size: header and body in one struct call.
            names = runs[0][1]
            assert isinstance(names, list)
            fmt = "IBH" + gen.fixed_format(names, dict(wf))
            values: list[str] = []
            for n in names:
                values += ([f"x.{n}.type", f"x.{n}.version", f"x.{n}.path"]
                           if dict(wf)[n] is m.qid else [f"x.{n}"])
            src[-1] = f"    return [{gen.struct_const(fmt)}.pack({struct.calcsize('<' + fmt)}, {number}, x.tag, {', '.join(values)})]"
            continue
        if not wf:
            src[-1] = f"    return [_S_IBH.pack(7, {number}, x.tag)]"
            continue
        if has_data:
            src.append("    h = b''.join(p)")
            src.append(f"    return [_S_IBH.pack(7 + len(h) + len(d), {number}, x.tag) + h, d]")
        else:
            src.append("    h = b''.join(p)")
            src.append(f"    return [_S_IBH.pack(7 + len(h), {number}, x.tag) + h]")
    for f in ("H", "I", "BIQ", "IBH"):
        gen.struct_const(f)
    namespace: dict[str, Any] = dict(gen.consts)
    namespace.update({c.__name__: c for c in m.MESSAGES.values()})
    namespace.update(Qid=Qid, _mkqid=Qid._make, _tnew=tuple.__new__, Stat=m.Stat, DecodeError=DecodeError, EncodeError=EncodeError, _short=_short)
    code = compile("\n".join(src), f"<ninep.protocol.codec fast {dialect}>", "exec")
    exec(code, namespace)
    decoders = {n: namespace[f"dec_{c.__name__}"] for n, c in m.MESSAGES.items()}
    encoders = {n: namespace[f"enc_{c.__name__}"] for n, c in m.MESSAGES.items()}
    return decoders, encoders, namespace["_dec_stat"], namespace["_enc_stat"]


class Codec:
    """The fast codec of one dialect. One instance per dialect is shared (see `codec_for`)."""

    def __init__(self, dialect: str) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self._decoders, self._encoders, self._dec_stat, self._enc_stat = _fast_codec(dialect)

    def decode(self, buf: Buffer) -> m.Message:
        """Decodes one whole message (header included). The returned message's payloads are views
        into `buf`: keep `buf` alive and unchanged while they are used."""
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
        end = len(mv)
        if end < HEADER_SIZE:
            raise DecodeError("message shorter than its header")
        size, msgtype, tag = HEADER.unpack_from(mv, 0)
        if size != end:
            raise DecodeError(f"size field {size} does not match the frame ({end} bytes)", tag, msgtype)
        dec = self._decoders.get(msgtype)
        if dec is None:
            raise DecodeError(f"unknown message type {msgtype}", tag, msgtype, errno.EOPNOTSUPP)
        try:
            return dec(mv, end, tag)
        except DecodeError as e:
            e.tag, e.msgtype = tag, msgtype
            raise
        except struct.error:
            raise DecodeError("message truncated", tag, msgtype) from None
        except UnicodeDecodeError:
            raise DecodeError("invalid UTF-8 in a string", tag, msgtype, errno.EINVAL) from None

    def encode(self, msg: m.Message) -> list[Buffer]:
        """The wire form as a list of buffers: normally one; two or three for messages that carry
        a data payload, which is passed through without a copy."""
        try:
            return self._encoders[msg.msgtype](msg)
        except struct.error as e:
            raise EncodeError(f"{type(msg).__name__}: {e}") from None

    def encode_bytes(self, msg: m.Message) -> bytes:
        return b"".join(self.encode(msg))

    def encode_stat(self, stat: m.Stat) -> bytes:
        """A Dir with its size prefix, as 9P2000 directory reads return them."""
        encoded: bytes = self._enc_stat(stat)
        return encoded

    def decode_stats(self, buf: Buffer) -> list[m.Stat]:
        """The Dirs of a 9P2000 directory read."""
        raw = bytes(buf)
        out, o = [], 0
        try:
            while o < len(raw):
                st, o = self._dec_stat(raw, o, len(raw))
                out.append(st)
        except (struct.error, UnicodeDecodeError):
            raise DecodeError("malformed directory entry") from None
        return out


@cache
def codec_for(dialect: str) -> Codec:
    return Codec(dialect)


# --- Rreaddir entries ---------------------------------------------------------------------------

_DIRENT = struct.Struct("<BIQQBH")  # qid, offset, type, name length


def pack_dirent(qid: Qid, offset: int, dtype: int, name: bytes) -> bytes:
    return _DIRENT.pack(qid.type, qid.version, qid.path, offset, dtype, len(name)) + name


def unpack_dirents(buf: Buffer) -> list[tuple[Qid, int, int, str]]:
    """(qid, offset, type, name) of each entry of an Rreaddir payload."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    out, o = [], 0
    try:
        while o < len(mv):
            qt, qv, qp, off, dtype, n = _DIRENT.unpack_from(mv, o)
            o += _DIRENT.size
            if o + n > len(mv):
                raise DecodeError("directory entry runs past the payload")
            out.append((Qid(qt, qv, qp), off, dtype, str(mv[o:o + n], "utf-8")))
            o += n
    except (struct.error, UnicodeDecodeError):
        raise DecodeError("malformed directory entry") from None
    return out


def fast_dialects() -> tuple[str, ...]:
    return DIALECTS


__all__ = ["Codec", "DecodeError", "EncodeError", "codec_for", "pack_dirent", "unpack_dirents",
           "reference_decode", "reference_encode", "HEADER", "V9P2000_U"]
