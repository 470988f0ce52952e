"""The vhost-user back-end: handshake, config space, malformed messages, reconnects, ring
stop/restart, hostile chains and memory-table changes seen through the whole protocol."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kits.virtio import HDR, Echo, RawPeer, open_fds, serving
from transports.virtio import vhost_user as vu
from transports.virtio.frontend import F_WRITE, Frontend, FrontendChannel

pytestmark = pytest.mark.timeout(60)


def run(fn, *args):  # noqa: ANN001, ANN201
    return trio.run(fn, *args)


async def roundtrip(ch, tag: int, body: bytes) -> bytes:  # noqa: ANN001
    await ch.send([HDR.pack(7 + len(body), 100, tag), body])
    reply = await ch.receive()
    size, mtype, rtag = HDR.unpack_from(reply)
    assert (size, mtype, rtag) == (7 + len(body), 101, tag)
    return bytes(reply[7:])


def test_handshake_features_and_config() -> None:
    async def main() -> None:
        async with serving(Echo(), tag="hostshare") as (path, _):
            fe = Frontend(path, msize=65536, expected_tag="hostshare")
            await fe.connect()
            want = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES | vu.VIRTIO_9P_MOUNT_TAG
            assert fe.features & want == want
            assert fe.features & vu.VIRTIO_RING_F_EVENT_IDX and fe.features & vu.VIRTIO_RING_F_INDIRECT_DESC
            await fe.aclose()
            # The config space exactly as Linux reads it: le16 length, tag, no NUL.
            peer = await RawPeer.connect(path)
            msg = await peer.call(vu.Req.GET_CONFIG, vu.CONFIG_HEADER.pack(0, 20, 0) + bytes(20))
            assert msg.payload == vu.CONFIG_HEADER.pack(0, 20, 0) + b"\x09\x00hostshare" + bytes(9)
            msg = await peer.call(vu.Req.GET_CONFIG, vu.CONFIG_HEADER.pack(2, 4, 0) + bytes(4))
            assert msg.payload[12:] == b"host"
            peer.close()

    run(main)


def test_bad_tag_refused() -> None:
    from transports.options import AddressError, ListenOptions
    from transports.virtio import listener_from_address

    with pytest.raises(AddressError):
        listener_from_address("vhost-user:/tmp/x", ListenOptions(tag="x" * 32))
    with pytest.raises(AddressError):
        listener_from_address("vhost-user:", ListenOptions())


@pytest.mark.parametrize("indirect,event_idx", [(True, True), (False, False), (True, False)])
def test_concurrent_requests_complete_out_of_order(indirect: bool, event_idx: bool) -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (path, _):
            fe = Frontend(path, msize=65536, indirect=indirect, event_idx=event_idx)
            ch = await fe.connect()
            bodies = {tag: os.urandom(tag * 997 % 20000) for tag in range(60)}
            got = {}
            order = []

            async def receive_all() -> None:
                for _ in bodies:
                    reply = await ch.receive()
                    _, _, tag = HDR.unpack_from(reply)
                    got[tag] = bytes(reply[7:])
                    order.append(tag)

            async with trio.open_nursery() as n:
                n.start_soon(receive_all)
                for tag, body in bodies.items():
                    n.start_soon(ch.send, [HDR.pack(7 + len(body), 100, tag), body])
            assert got == bodies
            assert order != sorted(order)  # several in flight, answered out of order
            await ch.aclose()

    run(main)


def test_malformed_messages_are_refused_not_fatal() -> None:
    async def main() -> None:
        async with serving(Echo()) as (path, _):
            peer = await RawPeer.connect(path)
            await peer.send(vu.Req.SET_PROTOCOL_FEATURES, vu.U64.pack(vu.PROTOCOL_F_REPLY_ACK))
            before = open_fds()
            assert await peer.ack(vu.Req.SET_FEATURES, b"\x01\x02\x03\x04") != 0  # short payload
            assert await peer.ack(vu.Req.SET_FEATURES, vu.U64.pack(1 << 40)) != 0  # not offered
            assert await peer.ack(99) != 0  # unknown request
            assert await peer.ack(vu.Req.SET_CONFIG, vu.CONFIG_HEADER.pack(0, 2, 0) + b"xx") != 0
            assert await peer.ack(vu.Req.SET_VRING_NUM, vu.VRING_STATE.pack(0, 3)) != 0
            assert await peer.ack(vu.Req.SET_VRING_NUM, vu.VRING_STATE.pack(5, 64)) != 0
            assert await peer.ack(vu.Req.SET_VRING_BASE, vu.VRING_STATE.pack(0, 70000)) != 0
            assert await peer.ack(vu.Req.SET_VRING_KICK, vu.U64.pack(vu.VRING_NOFD)) != 0
            assert await peer.ack(vu.Req.SET_VRING_ADDR, b"short") != 0
            assert await peer.ack(vu.Req.SET_LOG_BASE, vu.U64.pack(0)) != 0
            # A memory table whose fds do not match its regions; the fds must not leak.
            mfd = os.memfd_create("m")
            os.ftruncate(mfd, 1 << 20)
            table = vu.MEM_HEADER.pack(2, 0) + vu.MEM_REGION.pack(0, 1 << 20, 0, 0) * 2
            assert await peer.ack(vu.Req.SET_MEM_TABLE, table, [mfd]) != 0
            # A region larger than its file would SIGBUS on access: refused.
            table = vu.MEM_HEADER.pack(1, 0) + vu.MEM_REGION.pack(0, 2 << 20, 0, 0)
            assert await peer.ack(vu.Req.SET_MEM_TABLE, table, [mfd]) != 0
            os.close(mfd)
            # A GET for a queue that does not exist gets an empty reply (QEMU then fails cleanly).
            msg = await peer.call(vu.Req.GET_VRING_BASE, vu.VRING_STATE.pack(9, 0))
            assert msg.payload == b""
            msg = await peer.call(vu.Req.GET_CONFIG, b"\0")
            assert msg.payload == b""
            # The connection still works.
            msg = await peer.call(vu.Req.GET_FEATURES)
            assert vu.U64.unpack(msg.payload)[0] & vu.VIRTIO_9P_MOUNT_TAG
            await trio.sleep(0.05)
            assert open_fds() == before
            peer.close()

    run(main)


def test_broken_framing_drops_only_that_connection() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (path, _):
            peer = await RawPeer.connect(path)
            await peer.sock.send(vu.HEADER.pack(vu.Req.SET_OWNER, 1, 1 << 20))
            assert await peer.recv() is None  # the back-end hung up
            peer.close()
            peer = await RawPeer.connect(path)
            await peer.sock.send(vu.HEADER.pack(vu.Req.GET_FEATURES, 1, 0)[:5])
            peer.close()  # closed mid-header
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            assert await roundtrip(ch, 1, b"still alive") == b"still alive"
            await ch.aclose()

    run(main)


def test_reconnect_and_abrupt_disconnect() -> None:
    async def main() -> None:
        echo = Echo(hold={7})
        async with serving(echo) as (path, listener):
            for i in range(3):
                fe = Frontend(path, msize=65536)
                ch = await fe.connect()
                assert await roundtrip(ch, i, b"boot %d" % i) == b"boot %d" % i
                await ch.aclose()
            # The VMM dies with a request in flight.
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            await ch.send([HDR.pack(8, 100, 7), b"x"])
            await trio.sleep(0.05)
            assert fe.sock is not None
            fe.sock.close()
            fe.sock = None
            await trio.sleep(0.05)
            echo.release.set()  # its reply now goes nowhere, harmlessly
            await ch.aclose()
            await trio.sleep(0.05)
            assert echo.sessions == 4 and echo.ended == 4
            assert listener.devices == []
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            assert await roundtrip(ch, 2, b"after") == b"after"
            await ch.aclose()

    run(main)


def test_ring_stop_and_restart_like_a_reboot() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (path, _):
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            for tag in range(3):
                await roundtrip(ch, tag, b"before")
            assert await fe.stop() == 3  # GET_VRING_BASE answers where the ring stopped
            await trio.sleep(0.01)
            assert echo.ended == 1  # the 9P session of that boot is over
            # The guest driver comes back: same memory, ring continues from base 3.
            await fe.request(vu.Req.SET_VRING_BASE, vu.VRING_STATE.pack(0, 3))
            await fe.request(vu.Req.SET_VRING_ADDR, fe.vring_addr())
            await fe.request(vu.Req.SET_VRING_KICK, vu.U64.pack(0), [fe.kick_fd])
            await fe.request(vu.Req.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1))
            assert await roundtrip(ch, 4, b"after reboot") == b"after reboot"
            assert echo.sessions == 2
            await ch.aclose()

    run(main)


def test_chain_without_room_for_a_reply_breaks_the_queue() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (path, _):
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            slot = fe.slots[0]
            fe.write(slot.out, HDR.pack(7, 100, 1))
            fe.put_desc(fe.desc, 0, slot.out, 7, 0)  # readable only: nowhere to answer
            fe.publish(0)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(fe.err_fd)  # the VMM is told via the err eventfd
            await trio.sleep(0.01)
            assert echo.ended == 1 and echo.received == []
            await ch.aclose()
            fe = Frontend(path, msize=65536)  # the device works again after a reset/reconnect
            ch = await fe.connect()
            assert await roundtrip(ch, 1, b"ok") == b"ok"
            await ch.aclose()

    run(main)


def test_declared_size_larger_than_chain_is_answered_emsgsize() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (path, _):
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            await ch.send([HDR.pack(500, 100, 3), b"short"])
            reply = await ch.receive()
            assert bytes(reply) == struct.pack("<IBHI", 11, 7, 3, 90)
            assert echo.received == []
            await ch.aclose()

    run(main)


async def held_hello(path: str) -> tuple[Frontend, FrontendChannel]:
    """A Frontend on `path` with "hello" sent as tag 5 (which the test's Echo holds)."""
    fe = Frontend(path, msize=65536)
    ch = await fe.connect()
    await ch.send([HDR.pack(12, 100, 5), b"hello"])
    await trio.sleep(0.02)
    return fe, ch


def test_memory_table_change_with_request_in_flight() -> None:
    async def main() -> None:
        echo = Echo(hold={5})
        async with serving(echo) as (path, listener):
            fe, ch = await held_hello(path)
            # Memory is unplugged: the buffer region disappears while tag 5 is being served.
            only_rings = vu.MEM_HEADER.pack(1, 0) + vu.MEM_REGION.pack(*fe.regions[0])
            await fe.request(vu.Req.SET_MEM_TABLE, only_rings, [fe.mem_fd])
            echo.release.set()
            reply = await ch.receive()  # written through the old mapping, which stays valid
            assert bytes(reply) == HDR.pack(12, 101, 5) + b"hello"
            # A new request in the vanished region breaks the queue instead of crashing.
            await ch.send([HDR.pack(7, 100, 6)])
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(fe.err_fd)
                # Tag 6 will never be answered: the driver side fails it rather than wait.
                with pytest.raises(trio.EndOfChannel):
                    await ch.receive()
            assert fe.broken == "the back-end reported the queue broken"
            await fe.aclose()

    run(main)


def test_requests_in_flight_fail_when_the_back_end_goes_away() -> None:
    async def main() -> None:
        echo = Echo(hold={5})
        async with serving(echo) as (path, _):
            fe, ch = await held_hello(path)
        # The back-end is gone, tag 5 unanswered: the reader learns it from the socket's hang-up.
        with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
            await ch.receive()
        assert fe.broken == "the back-end closed the vhost-user connection"
        await fe.aclose()

    run(main)


def test_flushed_request_buffers_come_back_empty() -> None:
    async def main() -> None:
        async def handler(channel) -> None:  # noqa: ANN001
            # Never answers tag 1; answers the Tflush for it.
            while True:
                try:
                    msg = await channel.receive()
                except trio.EndOfChannel:
                    return
                _, mtype, tag = HDR.unpack_from(msg)
                if mtype == 108:
                    await channel.send([HDR.pack(7, 109, tag)])

        async with serving(handler) as (path, _):
            fe = Frontend(path, msize=65536, slots=4)
            ch = await fe.connect()
            await ch.send([HDR.pack(8, 100, 1), b"z"])
            flushed_head = fe.last_head
            await ch.send([HDR.pack(9, 108, 2), struct.pack("<H", 1)])
            reply = await ch.receive()
            assert bytes(reply) == HDR.pack(7, 109, 2)
            # The flushed request's buffers were handed back with used.len 0 (Linux ignores it).
            assert fe.pop_used() == (flushed_head, 0)
            await ch.aclose()

    run(main)


def test_zero_copy_rread(tmp_path) -> None:  # noqa: ANN001
    content = os.urandom(300_000)
    (tmp_path / "f").write_bytes(content)
    fd = os.open(tmp_path / "f", os.O_RDONLY)

    async def handler(channel) -> None:  # noqa: ANN001
        while True:
            try:
                msg = await channel.receive()
            except trio.EndOfChannel:
                return
            _, mtype, tag = HDR.unpack_from(msg)
            _fid, offset, count = struct.unpack_from("<IQI", msg, 7)
            try:
                await channel.send_rread(tag, fd if offset < 1 << 40 else -1, offset, count)
            except OSError as exc:
                await channel.send([struct.pack("<IBHI", 11, 7, tag, exc.errno)])

    async def main() -> None:
        async with serving(handler) as (path, _):
            fe = Frontend(path, msize=256 * 1024)
            ch = await fe.connect()
            for tag, (offset, count) in enumerate([(0, 200_000), (290_000, 100_000), (5, 100), (1 << 41, 5000)]):
                await ch.send([struct.pack("<IBHIQI", 23, 116, tag, 1, offset, count)])
                if count > 1024:  # Linux's layout: 11-byte header buffer, then separate pages
                    assert fe.last_layout[:3] == [(23, 0), (11, F_WRITE), (4096, F_WRITE)]
                else:
                    assert fe.last_layout[:2] == [(23, 0), (4096, F_WRITE)]
                reply = bytes(await ch.receive())
                size, mtype, rtag = HDR.unpack_from(reply)
                if offset >= 1 << 40:
                    assert mtype == 7 and struct.unpack_from("<I", reply, 7)[0] == 9  # EBADF
                    continue
                want = content[offset : offset + count]
                assert (size, mtype, rtag) == (11 + len(want), 117, tag)
                assert struct.unpack_from("<I", reply, 7)[0] == len(want)
                assert reply[11:] == want
            await ch.aclose()

    try:
        run(main)
    finally:
        os.close(fd)


def test_zero_copy_twrite_leaves_the_data_in_guest_memory(tmp_path) -> None:  # noqa: ANN001
    got: list[tuple[bytes, bytes | None]] = []
    target = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)

    async def handler(channel) -> None:  # noqa: ANN001
        while True:
            try:
                msg = bytes(await channel.receive())
            except trio.EndOfChannel:
                return
            _, _, tag = HDR.unpack_from(msg)
            payload = channel.take_payload(tag)
            assert channel.take_payload(tag) is None  # handed out once
            got.append((msg, None if payload is None else payload.copy()))
            n = 0 if payload is None else await trio.to_thread.run_sync(payload.pwrite, target, 0)
            await channel.send([struct.pack("<IBHI", 11, 119, tag, n)])

    async def main() -> None:
        async with serving(handler) as (path, _):
            fe = Frontend(path, msize=256 * 1024)
            ch = await fe.connect()
            data = os.urandom(100_000)
            head = struct.pack("<IBHIQI", 23 + len(data), 118, 9, 1, 0, len(data))
            await ch.send([head, data])
            assert fe.last_layout[:3] == [(23, 0), (4096, 0), (4096, 0)]
            assert bytes(await ch.receive()) == struct.pack("<IBHI", 11, 119, 9, len(data))
            # The session sees the header with count 0; the data comes from guest memory.
            assert got[-1] == (struct.pack("<IBHIQI", 23, 118, 9, 1, 0, 0), data)
            assert (tmp_path / "out").read_bytes() == data

            # A hostile count that disagrees with the size: copied whole, for the codec to refuse.
            bad = struct.pack("<IBHIQI", 23 + len(data), 118, 10, 1, 0, len(data) + 5)
            await ch.send([bad, data])
            await ch.receive()
            assert got[-1] == (bad + data, None)
            bad = struct.pack("<IBHIQI", 23 + len(data), 118, 11, 1, 0, 7)
            await ch.send([bad, data])
            await ch.receive()
            assert got[-1] == (bad + data, None)
            # A size beyond what the chain carries never reaches the server.
            seen = len(got)
            await ch.send([struct.pack("<IBHIQI", 23 + 2 * len(data), 118, 12, 1, 0, 2 * len(data)), data])
            assert bytes(await ch.receive()) == struct.pack("<IBHI", 11, 7, 12, 90)
            assert len(got) == seen
            # Small writes are copied whole as before.
            await ch.send([struct.pack("<IBHIQI", 23 + 100, 118, 13, 1, 0, 100), data[:100]])
            await ch.receive()
            assert got[-1] == (struct.pack("<IBHIQI", 123, 118, 13, 1, 0, 100) + data[:100], None)
            await ch.aclose()

    try:
        run(main)
    finally:
        os.close(target)


def test_missing_doorbells_and_doorbell_storms() -> None:
    async def main() -> None:
        echo = Echo()
        async with serving(echo) as (path, _):
            fe = Frontend(path, msize=65536, event_idx=False)
            ch = await fe.connect()
            # Two requests published with only one kick between them: both are served.
            for tag in (1, 2):
                slot = fe.slots[fe.free.pop()]
                await fe.slot_sem.acquire()
                head = fe.place(slot, HDR.pack(7, 100, tag))
                fe.publish(head, kick=(tag == 2))
            tags = set()
            for _ in range(2):
                tags.add(HDR.unpack_from(await ch.receive())[2])
            assert tags == {1, 2}
            # A storm of kicks with nothing queued changes nothing.
            for _ in range(5000):
                fe.kick()
            await trio.sleep(0.05)
            assert await roundtrip(ch, 3, b"calm") == b"calm"
            assert len(echo.received) == 3
            await ch.aclose()

    run(main)


def test_no_kicks_needed_while_the_device_is_busy() -> None:
    """With EVENT_IDX the driver kicks only when the device went idle: requests queued while the
    server is still working on earlier ones are picked up without a kick (a guest exit each)."""

    async def main() -> None:
        busy = trio.Event()
        release = trio.Event()

        async def handler(channel) -> None:  # noqa: ANN001
            first = True
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        msg = await channel.receive()
                    except trio.EndOfChannel:
                        break
                    if first:  # stays busy with the first request before reading more
                        first = False
                        busy.set()
                        await release.wait()
                    size, mtype, tag = HDR.unpack_from(msg)
                    nursery.start_soon(channel.send, [HDR.pack(size, mtype + 1, tag), bytes(msg[7:])])
                nursery.cancel_scope.cancel()

        async with serving(handler) as (path, _):
            fe = Frontend(path, msize=65536, event_idx=True, slots=8)
            ch = await fe.connect()
            await ch.send([HDR.pack(8, 100, 1), b"a"])
            with trio.fail_after(5):
                await busy.wait()
            for tag in (2, 3, 4):
                await ch.send([HDR.pack(8, 100, tag), b"b"])
            assert fe.kicks == 1  # only the request that found the device idle
            release.set()
            tags = set()
            with trio.fail_after(5):
                for _ in range(4):
                    tags.add(HDR.unpack_from(await ch.receive())[2])
            assert tags == {1, 2, 3, 4}
            assert await roundtrip(ch, 9, b"idle again") == b"idle again"  # idle: kicked again
            assert fe.kicks == 2
            await ch.aclose()

    run(main)


def test_missing_extension_gives_a_clear_import_error() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transports._ring'] = None\n"
        "try:\n    import transports.virtio\n"
        "except ImportError as e:\n    print(e)\n"
    )
    repo = str(Path(__file__).resolve().parents[3])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env={**os.environ, "PYTHONPATH": repo}).stdout
    assert "transports._ring" in out and "build_ext --inplace" in out


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.sampled_from(list(vu.Req)) | st.integers(0, 64),
            st.sampled_from([0, vu.FLAG_NEED_REPLY, 0xFFFFFFFF]),
            st.binary(max_size=300)
            | st.sampled_from([vu.U64.pack(v) for v in (0, 1, 0x100, 0x1FF, 2**64 - 1)])
            | st.builds(vu.VRING_STATE.pack, st.integers(0, 3), st.sampled_from([0, 1, 64, 65535, 2**32 - 1])),
            st.integers(0, 2),  # how many fds to attach
        ),
        max_size=25,
    ),
    running=st.booleans(),
)
def test_random_vmm_messages_never_take_the_back_end_down(messages, running: bool) -> None:  # noqa: ANN001
    async def main() -> None:
        async with serving(Echo()) as (path, listener):
            before = open_fds()
            first = None
            if running:  # a configured device with a live queue and a request in flight
                first = Frontend(path, msize=65536)
                ch = await first.connect()
                await ch.send([HDR.pack(8, 100, 1), b"x"])
                assert first.sock is not None
                peer = RawPeer(first.sock)
            else:
                peer = await RawPeer.connect(path)
            for req, flags, payload, nfds in messages:
                fds = [os.eventfd(0) for _ in range(nfds)]
                try:
                    await peer.send(req, payload, flags=flags & ~vu.VERSION, fds=fds)
                except OSError:
                    break  # the back-end hung up on something it could not frame
                finally:
                    for fd in fds:
                        os.close(fd)
            peer.close()
            with trio.fail_after(5):
                while listener.devices:
                    await trio.sleep(0.01)
            if first is not None:
                first.sock = None
                await first.aclose()
            # Every fd that came with a message is closed; the connection's own socket closes
            # just after its device leaves `listener.devices`, so give it a moment.
            with trio.move_on_after(5):
                while open_fds() != before:
                    await trio.sleep(0.01)
            assert open_fds() == before
            fe = Frontend(path, msize=65536)
            ch = await fe.connect()
            assert await roundtrip(ch, 1, b"alive") == b"alive"
            await ch.aclose()

    run(main)
