"""A hostile frontend against the backend: broken indices, rewritten headers, garbage, doorbell
storms and missing doorbells. The backend must survive, stop only the offending ring, and keep
serving the frontend's other rings and other frontends."""

from __future__ import annotations

import logging
import struct
from typing import Any

import pytest
import trio

from tests.kits.xen import (
    Env,
    RawFront,
    XenbusState,
    environment,
    hdr,
    msg,
    raw_exchange,
    raw_handshake,
    roundtrip,
    run,
    wait_until,
)

S = XenbusState
RING = 4096  # order 1: 2^(1+11) bytes per direction
OUT_CONS, OUT_PROD, IN_CONS, IN_PROD = 64, 68, 0, 4


async def setup(env: Env, handler: Any = None) -> tuple[RawFront, Any]:
    """Domain 1: a raw frontend with 2 rings of order 1; domain 2: a well-behaved frontend."""
    if handler is None:
        await env.serve(1)
    else:
        await env.serve(1, handler=handler)
    await env.serve(2)
    raw = await raw_handshake(env, 1, num_rings=2, order=1)
    assert await raw.wait_backend({S.Connected, S.Closing}) == S.Connected
    good = await env.connect(2)
    return raw, good


def write_out(raw: RawFront, i: int, pos: int, data: bytes) -> None:
    """Writes request bytes at free-running position `pos` of ring i's out half (with wrap)."""
    view = raw.rings[i].data.view
    for k, b in enumerate(data):
        view[RING + ((pos + k) % RING)] = b


async def others_still_work(raw: RawFront, good: Any, ring: int = 1) -> None:
    r = await raw_exchange(raw, ring, 41, b"still here")
    assert r[7:] == b"still here"
    assert (await roundtrip(good, 5))[7:] == b"ping"


async def ring_stopped(caplog: pytest.LogCaptureFixture, i: int) -> None:
    async def seen() -> bool:
        return any(
            f"ring {i}:" in r.getMessage() and "stopped" in r.getMessage() for r in caplog.records
        )

    await wait_until(seen)


@pytest.fixture(autouse=True)
def _log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ninep.xen")


def test_producer_index_jumping_past_the_ring(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            cons = raw.get_idx(0, OUT_CONS)
            raw.set_idx(0, OUT_PROD, cons + RING + 8)
            raw.rings[0].evtchn.notify()
            await ring_stopped(caplog, 0)
            await others_still_work(raw, good)
            assert await raw.state() == S.Connected

    run(main)


def test_producer_index_moving_backwards(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            await raw_exchange(raw, 0, 1, b"a" * 30)  # out_cons is now 37
            raw.set_idx(0, OUT_PROD, raw.get_idx(0, OUT_CONS) - 16)
            raw.rings[0].evtchn.notify()
            await ring_stopped(caplog, 0)
            await others_still_work(raw, good)

    run(main)


def test_header_size_rewritten_after_first_read_frames_by_the_first(sock_path: str) -> None:
    got: list[bytes] = []

    async def handler(chan: Any) -> None:
        while True:
            try:
                m = bytes(await chan.receive())
            except trio.EndOfChannel:
                return
            got.append(m)
            b = bytearray(m)
            b[4] += 1
            await chan.send([bytes(b)])

    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env, handler)
            body = bytes(range(93))
            full = hdr(100, 100, 9) + body
            write_out(raw, 0, 0, full[:50])
            raw.set_idx(0, OUT_PROD, 50)
            raw.rings[0].evtchn.notify()
            await trio.sleep(0.1)  # the backend has read the header and waits for the rest
            write_out(raw, 0, 0, struct.pack("<I", 20))  # now claim the message is 20 bytes
            write_out(raw, 0, 50, full[50:])
            raw.set_idx(0, OUT_PROD, 100)
            raw.rings[0].evtchn.notify()
            await wait_until(lambda: _true(len(got) == 1))
            assert len(got[0]) == 100
            assert (
                struct.unpack_from("<I", got[0])[0] == 100
            )  # the private copy says what was framed
            assert got[0][7:] == body
            # Framing is intact: the reply is whole and ring 0 goes on with the next message.
            from transports.xen._ext import ring_ext

            r0 = raw.rings[0]
            r0.ring.close()
            # The test wrote by hand: give its ring end the indices as they now stand.
            r0.ring = ring_ext().XenRing(r0.intf.view, r0.data.view, 1, True)
            await wait_until(lambda: _true(raw.get_idx(0, IN_PROD) == 100))
            reply = r0.ring.take(RING)
            assert reply is not None and len(reply) == 100 and reply[4] == 101
            assert (await raw_exchange(raw, 0, 12))[5] == 12
            await others_still_work(raw, good)

    run(main)


async def _true(v: bool) -> bool:
    return v


@pytest.mark.parametrize(
    "garbage",
    [
        hdr(3, 100, 0) + b"\xff" * 20,  # size < 7
        hdr(0x7FFFFFFF, 100, 0) + b"\0" * 20,  # size > msize and ring
        hdr(RING + 1, 100, 0) + b"\0" * 20,  # size > ring
        b"\xde\xad\xbe\xef" * 16,  # noise
    ],
    ids=["size<7", "size>msize", "size>ring", "noise"],
)
def test_garbage_in_the_ring(
    sock_path: str, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            write_out(raw, 0, 0, garbage)
            raw.set_idx(0, OUT_PROD, len(garbage))
            raw.rings[0].evtchn.notify()
            await ring_stopped(caplog, 0)
            await others_still_work(raw, good)

    run(main)


def test_consumer_index_written_by_the_wrong_side(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            await raw_exchange(raw, 0, 1)
            raw.set_idx(0, IN_CONS, 5000)  # the frontend "consumed" responses never produced
            assert raw.rings[0].ring.put([msg(2)])
            raw.rings[0].evtchn.notify()
            await ring_stopped(caplog, 0)
            await others_still_work(raw, good)

    run(main)


def test_every_ring_broken_is_a_framing_error_and_the_device_closes(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[BaseException] = []

    async def handler(chan: Any) -> None:
        try:
            while True:
                await chan.receive()
        except Exception as e:
            seen.append(e)

    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env, handler)
            for i in (0, 1):
                raw.set_idx(i, OUT_PROD, RING * 3)
                raw.rings[i].evtchn.notify()
            await wait_until(lambda: _true(bool(seen)))
            assert type(seen[0]).__name__ == "FramingError"
            assert await raw.wait_backend({S.Closing}) == S.Closing
            assert (await roundtrip(good, 5))[7:] == b"ping"

    run(main)


def test_doorbell_storm(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            stop = trio.Event()

            async def storm() -> None:
                n = 0
                while not stop.is_set():
                    for r in raw.rings:
                        r.evtchn.notify()
                    n += 1
                    if n % 100 == 0:
                        await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(storm)
                for k in range(100):
                    assert (await raw_exchange(raw, k % 2, k))[5] == k
                    assert (await roundtrip(good, k))[5] == k
                stop.set()

    run(main)


def test_missing_doorbells(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            r = raw.rings[0]
            # Three requests without a doorbell: nothing happens (nobody was told) ...
            for tag in (1, 2, 3):
                assert r.ring.put([msg(tag)])
            await trio.sleep(0.1)
            assert raw.get_idx(0, IN_PROD) == 0
            # ... until the next doorbell, which must make the backend take everything queued.
            assert r.ring.put([msg(4)])
            r.evtchn.notify()
            tags: list[int] = []
            with trio.fail_after(5):
                while len(tags) < 4:
                    m = r.ring.take(RING)
                    if m is None:
                        await trio.sleep(0.002)
                        continue
                    tags.append(m[5])
            assert tags == [1, 2, 3, 4]
            await others_still_work(raw, good)

    run(main)


def test_responses_wait_for_space_and_never_overwrite(sock_path: str) -> None:
    async def big_echo(chan: Any) -> None:
        while True:
            try:
                m = bytes(await chan.receive())
            except trio.EndOfChannel:
                return
            tag = m[5]
            if tag > 3:
                await chan.send([bytes([*m[:4], m[4] + 1]), m[5:]])
                continue
            await chan.send([hdr(2000, 101, tag), bytes([tag]) * 1993])

    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env, big_echo)
            r = raw.rings[0]
            for tag in (1, 2, 3):
                assert r.ring.put([msg(tag)])
            r.evtchn.notify()
            # Two replies fit in 4096 bytes, the third must wait.
            await wait_until(lambda: _true(raw.get_idx(0, IN_PROD) == 4000))
            await trio.sleep(0.1)
            assert raw.get_idx(0, IN_PROD) == 4000
            got: list[bytes] = []
            with trio.fail_after(5):
                while len(got) < 3:
                    m = r.ring.take(RING)
                    if m is None:
                        r.evtchn.notify()  # Linux tells the backend when it has drained the ring
                        await trio.sleep(0.002)
                        continue
                    got.append(m)
                    used = raw.get_idx(0, IN_PROD) - raw.get_idx(0, IN_CONS)
                    assert 0 <= used <= RING
            for tag, m in zip((1, 2, 3), got, strict=True):
                assert len(m) == 2000 and m[5] == tag and m[7:] == bytes([tag]) * 1993
            await others_still_work(raw, good)

    run(main)


def test_several_requests_in_flight_on_one_ring_answer_out_of_order(sock_path: str) -> None:
    async def slow_first(chan: Any) -> None:
        async def answer(m: bytes) -> None:
            if m[5] == 0:
                await trio.sleep(0.3)
            b = bytearray(m)
            b[4] += 1
            await chan.send([bytes(b)])

        async with trio.open_nursery() as nursery:
            while True:
                try:
                    m = bytes(await chan.receive())
                except trio.EndOfChannel:
                    return
                nursery.start_soon(answer, m)

    async def main() -> None:
        async with environment(sock_path) as env:
            await env.serve(1, handler=slow_first)
            front = await env.connect(1)
            await front.send([msg(0)])  # ring 0
            await front.send([msg(2)])  # ring 0 as well
            await front.send([msg(1)])  # ring 1
            order = [bytes(await front.receive())[5] for _ in range(3)]
            assert order[-1] == 0 and sorted(order) == [0, 1, 2]
            await front.aclose()

    run(main)


def test_refs_and_order_rewritten_after_connect_change_nothing(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            for i in (0, 1):
                intf = raw.intf(i)
                struct.pack_into("<I", intf, 128, 9)  # claim a bigger ring ...
                struct.pack_into("<4I", intf, 132, 0, 0, 10**6, 7)  # ... and other pages
            await raw.platform.write(f"{raw.fe}/num-rings", "8")
            await raw.platform.write(f"{raw.fe}/ring-ref0", "1")
            for k in range(10):
                assert (await raw_exchange(raw, k % 2, k, b"q" * 300))[7:] == b"q" * 300
            await others_still_work(raw, good)

    run(main)


def test_frontend_leaving_while_replies_wait_for_room(sock_path: str) -> None:
    async def big_echo(chan: Any) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    m = bytes(await chan.receive())
                except trio.EndOfChannel:
                    return
                nursery.start_soon(chan.send, [hdr(3000, 101, m[5]), b"r" * 2993])

    async def main() -> None:
        async with environment(sock_path) as env:
            lst = await env.serve(1, handler=big_echo)
            raw = await raw_handshake(env, 1, num_rings=2, order=1)
            assert await raw.wait_backend({S.Connected}) == S.Connected
            r = raw.rings[0]
            for tag in (0, 2, 4):  # three 3000-byte replies, room for one
                assert r.ring.put([msg(tag)])
            r.evtchn.notify()
            await wait_until(lambda: _true(raw.get_idx(0, IN_PROD) == 3000))
            await raw.set_state(S.Closing)  # leave without reading them
            assert await raw.wait_backend({S.Closing}) == S.Closing
            await raw.set_state(S.Closed)
            assert await raw.wait_backend({S.Closed}) == S.Closed
            await raw.close()
            assert lst.device is not None
            front = await env.connect(1)
            assert (await roundtrip(front, 6))[:7] == hdr(3000, 101, 6)
            await front.aclose()

    run(main)


def test_backend_owned_indices_scribbled_by_the_frontend_are_ignored(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env)
            await raw_exchange(raw, 0, 1)  # 11 bytes each way
            raw.set_idx(0, OUT_CONS, 0xDEAD0000)  # the backend's consumer index
            raw.set_idx(0, IN_PROD, 0xBEEF0000)  # the backend's producer index
            m = msg(2, b"x")
            write_out(raw, 0, 11, m)
            raw.set_idx(0, OUT_PROD, 11 + len(m))
            raw.rings[0].evtchn.notify()
            # The backend acts on its own copies and writes them back over the scribbles.
            await wait_until(lambda: _true(raw.get_idx(0, IN_PROD) == 11 + len(m)))
            assert raw.get_idx(0, OUT_CONS) == 11 + len(m)
            reply = bytes(raw.rings[0].data.view[11 : 11 + len(m)])
            assert reply[4] == 101 and reply[5] == 2 and reply[7:] == b"x"
            await others_still_work(raw, good)

    run(main)


def test_tag_reused_after_an_unanswered_request_goes_to_the_new_ring(sock_path: str) -> None:
    async def drop_some(chan: Any) -> None:
        while True:
            try:
                m = bytes(await chan.receive())
            except trio.EndOfChannel:
                return
            if m[7:] != b"drop":  # a flushed request: the server sends nothing for it
                await chan.send([bytes([*m[:4], m[4] + 1]), m[5:]])

    async def main() -> None:
        async with environment(sock_path) as env:
            raw, good = await setup(env, drop_some)
            r0 = raw.rings[0]
            assert r0.ring.put([msg(4, b"drop")])
            r0.evtchn.notify()
            await wait_until(lambda: _true(raw.get_idx(0, OUT_CONS) == 11))
            reply = await raw_exchange(raw, 1, 4, b"again")
            assert reply[5] == 4 and reply[7:] == b"again"
            assert raw.get_idx(0, IN_PROD) == 0  # nothing went to ring 0

    run(main)
