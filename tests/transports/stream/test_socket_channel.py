"""The socket channel (unix and TCP transports): replies written straight to the socket must
still arrive whole and never interleave when they do not fit in the socket buffer and several
tasks send at once; a receive sees every message of a burst that arrives in one read; a closed
peer ends the channel."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from transports.stream import SocketChannel


def _pair() -> tuple[SocketChannel, SocketChannel]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return SocketChannel(a, "a"), SocketChannel(b, "b")


def _message(tag: int, size: int) -> list[bytes]:
    body = bytes([tag % 251]) * (size - 7)
    return [struct.pack("<IBH", size, 101, tag), body]  # header and payload as separate parts


def test_large_concurrent_sends_arrive_whole_and_in_one_piece_each() -> None:
    async def main() -> None:
        server, client = _pair()
        # A small send buffer: every 1 MiB message is written in many pieces, with waits.
        server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sizes = {tag: (1 << 20) if tag % 2 else 100 for tag in range(12)}
        got: dict[int, bytes] = {}

        async def reader() -> None:
            for _ in sizes:
                msg = await client.receive()
                size, _, tag = struct.unpack_from("<IBH", msg, 0)
                assert size == len(msg) == sizes[tag]
                got[tag] = bytes(msg[7:])
                await trio.sleep(0.001)  # a slow reader keeps the socket buffer full

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            for tag, size in sizes.items():
                n.start_soon(server.send, _message(tag, size))
        assert {t: len(b) for t, b in got.items()} == {t: s - 7 for t, s in sizes.items()}
        assert all(b == bytes([t % 251]) * len(b) for t, b in got.items())
        await server.aclose()
        await client.aclose()

    trio.run(main)


def test_burst_of_messages_in_one_read_is_received_one_by_one() -> None:
    async def main() -> None:
        server, client = _pair()
        burst = b"".join(b"".join(_message(tag, 7 + tag)) for tag in range(50))
        await client.send([burst])  # all in the socket before the first receive
        for tag in range(50):
            msg = await server.receive()
            assert struct.unpack_from("<IBH", msg, 0) == (7 + tag, 101, tag)
        await client.aclose()
        with pytest.raises(trio.EndOfChannel):
            await server.receive()
        await server.aclose()

    trio.run(main)


def test_send_after_the_peer_closed_is_a_broken_channel() -> None:
    async def main() -> None:
        server, client = _pair()
        await client.aclose()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the first writes may still land in the buffer
                await server.send(_message(1, 1 << 16))
        await server.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await server.send(_message(2, 100))  # our own end closed: never a stray fd

    trio.run(main)
