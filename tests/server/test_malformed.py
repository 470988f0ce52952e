"""Hostile bytes on a raw socket: bad sizes close the connection with a log line; unknown types,
truncated fields, bad UTF-8 and requests before Tversion get error replies; duplicate tags drop
the connection — and the server keeps serving everyone else throughout."""

from __future__ import annotations

import errno
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from fs_backends.memory import MemoryBackend
from ninep.protocol import messages as m
from ninep.protocol.codec import codec_for
from ninep.protocol.numbers import (
    L_O_CREAT,
    L_O_RDWR,
    LOCK_FLAGS_BLOCK,
    LOCK_TYPE_WRLCK,
    NOFID,
    V9P2000,
    V9P2000_L,
)
from ninep.server.session import SessionOptions
from tests.kits.harness import client_for, served

L = codec_for(V9P2000_L)
MSIZE = 8192


def frame(msgtype: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), msgtype, tag) + body


class Raw:
    """A unix-socket peer that speaks bytes."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def reply(self, timeout: float = 15) -> bytes | None:
        """The next whole message, or None when the server closed the connection."""
        with trio.fail_after(timeout):
            while True:
                if len(self.buf) >= 4:
                    (size,) = struct.unpack_from("<I", self.buf)
                    if len(self.buf) >= size:
                        msg, self.buf = self.buf[:size], self.buf[size:]
                        return msg
                try:
                    data = await self.sock.recv(65536)
                except ConnectionResetError:
                    return None
                if not data:
                    return None
                self.buf += data

    async def rpc(self, msg: m.Message) -> m.Message:
        await self.send(L.encode_bytes(msg))
        r = await self.reply()
        assert r is not None, "connection closed"
        return L.decode(r)

    async def version(self) -> None:
        r = await self.rpc(m.Tversion(MSIZE, V9P2000_L, tag=0xFFFF))
        assert isinstance(r, m.Rversion) and r.msize == MSIZE


async def raw(path: Path) -> Raw:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(path))
    return Raw(sock)


def run(tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with served(MemoryBackend(), "unix", tmp_path, SessionOptions(max_msize=MSIZE)) as (server, connect):
                # A well-behaved client connected the whole time: it must never notice.
                async with client_for(connect, msize=MSIZE) as good:
                    root = await good.attach()
                    await scenario(tmp_path / "9p.sock", good, root)
                    assert (await good.getattr(root)).qid.type & 0x80
                async with client_for(connect, msize=MSIZE) as fresh:
                    await fresh.write_file(await fresh.attach(), "after", b"still serving")
                    assert await fresh.read_file(await fresh.attach(), "after") == b"still serving"

    trio.run(main)


@pytest.mark.parametrize("size", [0, 3, 6, MSIZE + 1, 0xFFFFFFFF])
def test_bad_size_closes_the_connection_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, size: int) -> None:
    async def scenario(sock: Path, good: Any, root: int) -> None:
        r = await raw(sock)
        await r.version()
        await r.send(struct.pack("<IBH", size, 110, 1) + b"\0" * 16)
        assert await r.reply() is None
        # The same before Tversion, against the transport's own limit.
        r = await raw(sock)
        await r.send(struct.pack("<I", size if size < 7 else 0xFFFFFFFF) + b"\x64\x00\x00")
        assert await r.reply() is None

    with caplog.at_level(logging.INFO):
        run(tmp_path, scenario)
    assert sum("framing lost" in rec.getMessage() for rec in caplog.records) >= 2


def test_unknown_and_reply_types_answer_eopnotsupp(tmp_path: Path) -> None:
    async def scenario(sock: Path, good: Any, root: int) -> None:
        r = await raw(sock)
        await r.version()
        for msgtype in (0, 6, 106, 150, 255, 101, 105, 7, 25):
            await r.send(frame(msgtype, 42, b"\0" * 12))
            reply = L.decode(await r.reply())  # type: ignore[arg-type]
            assert isinstance(reply, m.Rlerror) and reply.tag == 42, msgtype
            assert reply.ecode in (errno.EOPNOTSUPP, errno.EPROTO), msgtype
        # Still usable afterwards.
        assert isinstance(await r.rpc(m.Tattach(1, NOFID, "root", "", 0, tag=3)), m.Rattach)

    run(tmp_path, scenario)


def test_truncated_fields_and_bad_utf8_answer_rlerror(tmp_path: Path) -> None:
    async def scenario(sock: Path, good: Any, root: int) -> None:
        r = await raw(sock)
        await r.version()
        assert isinstance(await r.rpc(m.Tattach(1, NOFID, "root", "", 0, tag=1)), m.Rattach)
        bad = [
            (frame(110, 5, struct.pack("<IIH", 1, 2, 3) + struct.pack("<H", 1) + b"a"), (errno.EPROTO, errno.EINVAL)),
            (frame(110, 5, struct.pack("<IIH", 1, 2, 1) + struct.pack("<H", 60000)), (errno.EPROTO, errno.EINVAL)),
            (frame(118, 5, struct.pack("<IQI", 1, 0, 5000) + b"short"), (errno.EPROTO, errno.EINVAL)),
            (frame(24, 5, struct.pack("<I", 1)), (errno.EPROTO, errno.EINVAL)),  # Tgetattr missing its mask
            (frame(120, 5, b""), (errno.EPROTO, errno.EINVAL)),  # Tclunk with no fid
            (frame(120, 5, struct.pack("<IB", 1, 0)), (errno.EPROTO, errno.EINVAL)),  # trailing byte
            (frame(72, 5, struct.pack("<I", 1) + struct.pack("<H", 2) + b"\xc3\x28" + struct.pack("<II", 0o755, 0)), (errno.EINVAL,)),
            (frame(110, 5, struct.pack("<IIH", 1, 2, 1) + struct.pack("<H", 2) + b"\xff\xfe"), (errno.EINVAL,)),
        ]
        for wire, errs in bad:
            await r.send(wire)
            reply = L.decode(await r.reply())  # type: ignore[arg-type]
            assert isinstance(reply, m.Rlerror) and reply.tag == 5 and reply.ecode in errs, wire
        # Nothing was created by the malformed Tmkdir, fid 2 was never made, fid 1 still works.
        assert isinstance(await r.rpc(m.Tclunk(2, tag=6)), m.Rlerror)
        assert isinstance(await r.rpc(m.Tgetattr(1, 0x7FF, tag=6)), m.Rgetattr)

    run(tmp_path, scenario)


def test_requests_before_tversion_get_an_error_and_version_still_works(tmp_path: Path) -> None:
    async def scenario(sock: Path, good: Any, root: int) -> None:
        r = await raw(sock)
        for msg in (m.Tattach(1, NOFID, "root", "", tag=3), m.Tclunk(1, tag=4)):
            await r.send(codec_for(V9P2000).encode_bytes(msg))
            raw_reply = await r.reply()
            assert raw_reply is not None
            _, msgtype, tag = struct.unpack_from("<IBH", raw_reply)
            assert msgtype in (107, 7) and tag == msg.tag
        await r.version()
        assert isinstance(await r.rpc(m.Tattach(1, NOFID, "root", "", 0, tag=1)), m.Rattach)

    run(tmp_path, scenario)


def test_malformed_tversion_closes_the_connection(tmp_path: Path) -> None:
    async def scenario(sock: Path, good: Any, root: int) -> None:
        r = await raw(sock)
        await r.send(frame(100, 0xFFFF, struct.pack("<I", MSIZE) + struct.pack("<H", 40) + b"9P2000.L"))
        assert await r.reply() is None

    run(tmp_path, scenario)


def test_a_tag_reused_while_in_flight_drops_the_connection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(sock: Path, good: Any, root: int) -> None:
        # `good` holds a write lock; the raw client queues a blocking lock behind it (tag 9 stays
        # in flight), then sends another request with tag 9.
        f, _ = await good.walk(root, [])
        await good.lcreate(f, "locked", L_O_RDWR | L_O_CREAT, 0o644)
        assert await good.lock(f, LOCK_TYPE_WRLCK) == 0
        r = await raw(sock)
        await r.version()
        assert isinstance(await r.rpc(m.Tattach(1, NOFID, "root", "", 0, tag=1)), m.Rattach)
        assert isinstance(await r.rpc(m.Twalk(1, 2, ["locked"], tag=1)), m.Rwalk)
        assert isinstance(await r.rpc(m.Tlopen(2, L_O_RDWR, tag=1)), m.Rlopen)
        await r.send(L.encode_bytes(m.Tlock(2, LOCK_TYPE_WRLCK, LOCK_FLAGS_BLOCK, 0, 0, 7, "raw", tag=9)))
        await trio.sleep(0.1)
        await r.send(L.encode_bytes(m.Tgetattr(1, 0x7FF, tag=9)))
        assert await r.reply() is None
        # The dropped connection's queued lock request went with it: `good` unlocks and relocks.
        await trio.sleep(0.1)
        assert await good.lock(f, 2) == 0
        g, _ = await good.walk(root, ["locked"])
        await good.lopen(g, L_O_RDWR)
        assert await good.lock(g, LOCK_TYPE_WRLCK, proc_id=99, client_id="other") == 0

    with caplog.at_level(logging.INFO):
        run(tmp_path, scenario)
    assert any("framing lost" in rec.getMessage() and "tag 9" in rec.getMessage() for rec in caplog.records)


def test_garbage_streams_never_take_the_server_down(tmp_path: Path) -> None:
    import random

    rnd = random.Random(1234)

    async def scenario(sock: Path, good: Any, root: int) -> None:
        for i in range(40):
            r = await raw(sock)
            if i % 2:
                await r.version()
            blob = bytearray(rnd.randbytes(rnd.randrange(1, 400)))
            if i % 4 < 2 and len(blob) >= 7:  # a plausible size so the body reaches the decoder
                struct.pack_into("<I", blob, 0, len(blob))
            await r.send(bytes(blob))
            with trio.move_on_after(0.05):
                while await r.reply() is not None:
                    pass
            r.sock.close()
            assert (await good.getattr(root)).qid.type & 0x80

    run(tmp_path, scenario)


def test_a_tag_reused_as_soon_as_its_reply_arrives_is_served(tmp_path: Path) -> None:
    """Fast clients (diod's, Linux's) reuse a tag the moment its reply is read; the server must
    not mistake that for a duplicate tag still in flight. The client runs in a thread with a
    blocking socket so it answers as fast as a C client would."""
    import socket

    def fast_client(path: Path) -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.settimeout(20)
        buf = b""

        def rpc(msg: m.Message) -> m.Message | None:
            nonlocal buf
            s.sendall(L.encode_bytes(msg))
            while True:
                if len(buf) >= 4 and len(buf) >= struct.unpack_from("<I", buf)[0]:
                    n = struct.unpack_from("<I", buf)[0]
                    out, buf = buf[:n], buf[n:]
                    return L.decode(out)
                data = s.recv(65536)
                if not data:
                    return None
                buf += data

        assert isinstance(rpc(m.Tversion(MSIZE, V9P2000_L, tag=0xFFFF)), m.Rversion)
        assert isinstance(rpc(m.Tattach(1, NOFID, "root", "", 0, tag=0)), m.Rattach)
        done = 0
        for i in range(3000):
            reply = rpc(m.Tgetattr(1, 0x7FF, tag=0) if i % 2 else m.Tclunk(77, tag=0))
            if reply is None:
                break
            assert reply.tag == 0
            done += 1
        s.close()
        return done

    async def scenario(sock: Path, good: Any, root: int) -> None:
        assert await trio.to_thread.run_sync(fast_client, sock) == 3000

    run(tmp_path, scenario)
