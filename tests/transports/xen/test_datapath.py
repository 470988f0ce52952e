"""The compiled ring data path (XenRing, GrantMap) and zero-copy Rread, plus the emulated platform
(xenstore semantics, grants, event channels)."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kits.xen import (
    XenbusState,
    environment,
    hdr,
    msg,
    raw_handshake,
    roundtrip,
    run,
    wait_until,
)
from transports.xen._ext import ring_ext
from transports.xen.platform import XenstoreError

S = XenbusState


def pair(order: int = 1) -> tuple[Any, Any, memoryview, memoryview]:
    size = 1 << (order + 11)
    intf = memoryview(mmap.mmap(-1, 4096))
    data = memoryview(mmap.mmap(-1, 2 * size))
    back = ring_ext().XenRing(intf, data, order, False)
    front = ring_ext().XenRing(intf, data, order, True)
    return back, front, intf, data


def test_messages_cross_the_wrap_whole() -> None:
    back, front, intf, _ = pair()
    for k in range(50):
        body = bytes([k]) * (100 + 37 * k % 900)
        assert front.put([hdr(7 + len(body), 100, k) + body[:10], body[10:]])
        m = back.take(4096)
        assert m is not None and m[5] == k and m[7:] == body
        assert back.put([bytes(m)])
        r = front.take(4096)
        assert r == m
    assert struct.unpack_from("<I", intf, 64)[0] == back.indices[0]  # out_cons published
    assert back.indices[0] > 4096  # wrapped more than once


def test_put_is_whole_or_nothing_and_take_waits_for_the_whole_message() -> None:
    back, front, intf, _ = pair()
    assert front.put([msg(1, b"x" * 3000)])
    assert not front.put([msg(2, b"y" * 2000)])  # 5014 > 4096: nothing written
    assert struct.unpack_from("<I", intf, 68)[0] == 3007
    assert back.take(4096) is not None
    assert front.put([msg(2, b"y" * 2000)])
    # A message whose bytes have not all arrived yet is not returned.
    struct.pack_into("<I", intf, 68, 3007 + 100)
    assert back.take(4096) is None
    struct.pack_into("<I", intf, 68, 3007 + 2007)
    m = back.take(4096)
    assert m is not None and len(m) == 2007
    with pytest.raises(ValueError):
        front.put([b"\0" * 5000])  # can never fit
    with pytest.raises(ValueError):
        front.put([b"\0" * 3])  # not a message


def test_size_above_limit_breaks_the_ring_for_good() -> None:
    back, front, _, _ = pair()
    assert front.put([msg(1, b"z" * 600)])
    with pytest.raises(ring_ext().XenRingError):
        back.take(512)
    assert back.broken
    with pytest.raises(ring_ext().XenRingError):
        back.take(4096)


def test_staged_rread_is_invisible_until_published(tmp_path: Path) -> None:
    back, front, intf, _ = pair()
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert back.put_pread(7, fd, 2, 5, False) == 5
        assert struct.unpack_from("<I", intf, 4)[0] == 0 and front.take(4096) is None
        with pytest.raises(RuntimeError):
            back.put([msg(1)])  # nothing may be written behind a staged message
        back.publish()
        assert front.take(4096) == struct.pack("<IBHI", 16, 117, 7, 5) + b"23456"
        with pytest.raises(RuntimeError):
            back.publish()
    finally:
        os.close(fd)


def test_grant_map_is_contiguous_and_shared() -> None:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 16 * 4096)
    m = mmap.mmap(fd, 16 * 4096)
    for page in range(16):
        m[page * 4096] = page
    g = ring_ext().xen_map_grants(fd, [7, 3, 12])
    v = memoryview(g)
    assert len(v) == 3 * 4096 and (v[0], v[4096], v[8192]) == (7, 3, 12)
    v[4096 + 1] = 0xAB  # writes land in the granting domain's page
    assert m[3 * 4096 + 1] == 0xAB
    with pytest.raises(BufferError):
        g.close()
    v.release()
    g.close()
    assert g.closed
    with pytest.raises(ValueError):
        ring_ext().xen_map_grants(fd, [16])
    m.close()
    os.close(fd)


def test_zero_copy_rread_across_the_wrap_and_errors(sock_path: str, tmp_path: Path) -> None:
    content = os.urandom(5000)
    f = tmp_path / "data"
    f.write_bytes(content)
    fd = os.open(f, os.O_RDONLY)
    errors: list[int] = []

    async def reader(chan: Any) -> None:
        while True:
            try:
                m = bytes(await chan.receive())
            except trio.EndOfChannel:
                return
            tag = m[5] | m[6] << 8
            offset, count = struct.unpack_from("<QI", m, 7)
            use_fd = fd if offset != 99999 else 9999  # a bad fd: OSError before anything is sent
            try:
                await chan.send_rread(tag, use_fd, offset, count)
            except OSError as e:
                errors.append(e.errno or 0)
                await chan.send([struct.pack("<IBHI", 11, 7, tag, e.errno or 0)])

    async def main() -> None:
        async with environment(sock_path) as env:
            await env.serve(1, handler=reader)
            raw = await raw_handshake(env, 1, num_rings=2, order=1)
            assert await raw.wait_backend({S.Connected}) == S.Connected
            r = raw.rings[0]
            pos = 0
            for k in range(12):  # 12 × ~1000 bytes through a 4096-byte ring: wraps several times
                offset, count = (k * 397) % 4000, 900 + k
                assert r.ring.put([struct.pack("<IBHQI", 19, 116, 2 * k, offset, count)])
                r.evtchn.notify()
                with trio.fail_after(5):
                    while (m := r.ring.take(4096)) is None:
                        await trio.sleep(0.002)
                size, mtype, tag, n = struct.unpack_from("<IBHI", m)
                assert (mtype, tag, n, size) == (117, 2 * k, count, 11 + count)
                assert m[11:] == content[offset : offset + count]
                pos += size
            # Reading at end of file sends an Rread of 0 bytes.
            assert r.ring.put([struct.pack("<IBHQI", 19, 116, 40, 5000, 100)])
            r.evtchn.notify()
            with trio.fail_after(5):
                while (m := r.ring.take(4096)) is None:
                    await trio.sleep(0.002)
            assert struct.unpack_from("<IBHI", m) == (11, 117, 40, 0)
            # A failing read raises before sending; the reply then goes out on the same ring.
            assert r.ring.put([struct.pack("<IBHQI", 19, 116, 42, 99999, 10)])
            r.evtchn.notify()
            with trio.fail_after(5):
                while (m := r.ring.take(4096)) is None:
                    await trio.sleep(0.002)
            assert struct.unpack_from("<IBHI", m) == (11, 7, 42, errno.EBADF)
            assert errors == [errno.EBADF]

    try:
        run(main)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_big_zero_copy_read_over_the_linux_like_frontend(
    sock_path: str, tmp_path: Path, where: str
) -> None:
    # ext4 serves cached pages inline (RWF_NOWAIT); tmpfs has no RWF_NOWAIT: worker thread.
    content = os.urandom(3 << 20)
    f = tmp_path / "big" if where == "tmp" else Path(tempfile.mkdtemp(dir="/dev/shm")) / "big"
    f.write_bytes(content)
    fd = os.open(f, os.O_RDONLY)

    async def reader(chan: Any) -> None:
        while True:
            try:
                m = bytes(await chan.receive())
            except trio.EndOfChannel:
                return
            offset, count = struct.unpack_from("<QI", m, 7)
            await chan.send_rread(m[5] | m[6] << 8, fd, offset, count)

    async def main() -> None:
        async with environment(sock_path) as env:
            await env.serve(1, handler=reader)
            front = await env.connect(1)
            count = front.max_message_size - 11
            got = bytearray()
            tag = 0
            while len(got) < len(content):
                await front.send([struct.pack("<IBHQI", 19, 116, tag, len(got), count)])
                m = await front.receive()
                n = struct.unpack_from("<I", m, 7)[0]
                got += m[11 : 11 + n]
                tag += 1
            assert got == content
            await front.aclose()

    try:
        run(main)
    finally:
        os.close(fd)
        if where == "shm":
            shutil.rmtree(f.parent)


def test_xenstore_semantics(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            a = await env.platform(0)
            b = await env.platform(0)
            await a.write("/x/y/z", "1")
            assert await b.read("/x/y/z") == "1"
            assert await b.read("/x/y") == ""  # parents exist
            assert await b.directory("/x") == ["y"]
            with pytest.raises(XenstoreError) as ei:
                await b.read("/nope")
            assert ei.value.errno == errno.ENOENT
            w = await b.watch("/x")
            assert await w.wait() == "/x"  # fires once when set
            await a.write("/x/y/q", "2")
            assert await w.wait() == "/x/y/q"
            await a.rm("/x/y")
            gone = {await w.wait() for _ in range(3)}
            assert gone == {"/x/y", "/x/y/z", "/x/y/q"}
            await w.aclose()
            # Transactions: isolated until commit; a conflicting one fails with EAGAIN.
            tx = await a.transaction_start()
            await a.write("/t/k", "v", tx)
            with pytest.raises(XenstoreError):
                await b.read("/t/k")
            assert await a.transaction_end(tx)
            assert await b.read("/t/k") == "v"
            tx = await a.transaction_start()
            assert await a.read("/t/k", tx) == "v"
            await b.write("/t/k", "other")
            await a.write("/t/k", "mine", tx)
            assert not await a.transaction_end(tx)
            assert await b.read("/t/k") == "other"
            await a.aclose()
            await b.aclose()

    run(main)


def test_event_channels_and_grants_between_domains(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            guest = await env.platform(5, arena_pages=32)
            dom0 = await env.platform(0)
            pages = await guest.share_pages(0, 2)
            pages.view[:5] = b"hello"
            g = await dom0.map_grants(5, pages.refs)
            with memoryview(g) as v:
                assert bytes(v[:5]) == b"hello"
                v[4096:4099] = b"abc"
            assert bytes(pages.view[4096:4099]) == b"abc"
            g.close()
            with pytest.raises(XenstoreError):
                await dom0.map_grants(5, [0])  # ref 0 is reserved
            with pytest.raises(XenstoreError):
                await dom0.map_grants(5, [32])
            ch_g = await guest.alloc_unbound(0)
            ch_0 = await dom0.bind_interdomain(5, ch_g.port)
            with pytest.raises(XenstoreError):
                await dom0.bind_interdomain(5, ch_g.port)  # already bound
            ch_0.notify()
            with trio.fail_after(2):
                await trio.lowlevel.wait_readable(ch_g.fileno())
            ch_g.clear()
            ch_g.notify()
            with trio.fail_after(2):
                await trio.lowlevel.wait_readable(ch_0.fileno())
            await ch_0.aclose()
            await ch_g.aclose()
            pages.release()
            await guest.aclose()
            await dom0.aclose()

    run(main)


def test_four_frontends_at_once(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            for dom in range(1, 5):
                await env.serve(dom)
            fronts = [await env.connect(dom) for dom in range(1, 5)]

            async def chat(front: Any) -> None:
                for tag in range(50):
                    assert (await roundtrip(front, tag, bytes([tag]) * tag))[7:] == bytes(
                        [tag]
                    ) * tag

            async with trio.open_nursery() as nursery:
                for front in fronts:
                    nursery.start_soon(chat, front)
            for front in fronts:
                await front.aclose()
            await wait_until(lambda: _all_closed(env))

    run(main)


async def _all_closed(env: Any) -> bool:
    return all(lst.device.history[-1] == S.Closed for lst in env.listeners.values())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1)),  # peer's producer index
            st.binary(min_size=0, max_size=64),  # bytes it scribbles at a random place
            st.integers(0, 8191),
            st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1)),  # its consumer index
        ),
        max_size=20,
    ),
    st.integers(7, 5000),
)
def test_fuzz_hostile_indices_and_bytes(ops: list[tuple[int, bytes, int, int]], limit: int) -> None:
    back, _, intf, data = pair()
    err = ring_ext().XenRingError
    for prod, junk, where, cons in ops:
        data[where : where + len(junk)] = junk[: 8192 - where]
        struct.pack_into("<I", intf, 68, prod)
        struct.pack_into("<I", intf, 0, cons)
        try:
            m = back.take(limit)
        except err:
            assert back.broken
            return
        if m is not None:
            size = struct.unpack_from("<I", m)[0]
            assert 7 <= size == len(m) <= min(limit, 4096)
        try:
            ok = back.put([msg(1, junk)])
        except err:
            return
        assert isinstance(ok, bool)
