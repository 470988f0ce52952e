"""Helpers for the virtio tests: a back-end on a temporary socket, an echo server, a raw
vhost-user peer for malformed-message tests."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ninep.cli.serving import direct_io_policy
from ninep.client import Client
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.options import ConnectOptions
from transports.virtio import connect_address
from transports.virtio import vhost_user as vu
from transports.virtio.backend import VhostUserListener

HDR = struct.Struct("<IBH")


@dataclass
class Echo:
    """A Channel handler answering every message with type+1 and the same body, after a delay
    that depends on the tag (so replies complete out of order). `hold` tags wait for `release`."""

    sessions: int = 0
    ended: int = 0
    hold: set[int] = field(default_factory=set)
    release: trio.Event = field(default_factory=trio.Event)
    received: list[bytes] = field(default_factory=list)
    channels: list[object] = field(default_factory=list)

    async def __call__(self, channel) -> None:  # noqa: ANN001 - any Channel
        self.sessions += 1
        self.channels.append(channel)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        msg = await channel.receive()
                    except trio.EndOfChannel:
                        break
                    self.received.append(bytes(msg))
                    nursery.start_soon(self._answer, channel, bytes(msg))
                nursery.cancel_scope.cancel()
        finally:
            self.ended += 1

    async def _answer(self, channel, msg: bytes) -> None:  # noqa: ANN001
        size, mtype, tag = HDR.unpack_from(msg)
        if tag in self.hold:
            await self.release.wait()
        else:
            await trio.sleep(0.002 * (tag % 4))
        body = msg[7:]
        await channel.send([HDR.pack(7 + len(body), mtype + 1, tag), body])


@asynccontextmanager
async def serving(
    handler: Callable[[object], Awaitable[None]], tag: str = "t0", max_msize: int = 1 << 20, poll_us: int = 0
) -> AsyncIterator[tuple[str, VhostUserListener]]:
    """The back-end in this process. It does not poll its rings by default: its driver (the test)
    runs on the same event loop, so a spin could never see a request, and kick counts stay exact."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vhost.sock")
        listener = VhostUserListener("vhost-user:" + path, path, tag, max_msize, poll_us, direct_io_policy())
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve, handler)
            yield path, listener
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def local_client(
    export: str | os.PathLike[str], options: SessionOptions | None = None
) -> AsyncIterator[tuple[Client, int, VhostUserListener, Server]]:
    """Our client attached to a local-backend server over the vhost-user front-end (msize 512K):
    (client, root fid, the vhost-user listener, the server)."""
    from fs_backends.local import LocalBackend

    server = Server(LocalBackend(str(export)), options)
    async with serving(server.handle, max_msize=512 * 1024) as (path, listener):
        channel = await connect_address("vhost-user:" + path, ConnectOptions(max_msize=512 * 1024))
        async with Client.connect(channel, msize=512 * 1024) as c:
            yield c, await c.attach(), listener, server


class RawPeer:
    """A VMM that sends whatever the test wants."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    async def send(self, req: int, payload: bytes = b"", *, flags: int = 0, fds: list[int] | None = None) -> None:
        await vu.send_message(self.sock, req, payload, flags=flags, fds=fds)

    async def recv(self) -> vu.Message | None:
        with trio.fail_after(5):
            return await vu.recv_message(self.sock)

    async def call(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> vu.Message:
        await self.send(req, payload, flags=vu.FLAG_NEED_REPLY, fds=fds)
        msg = await self.recv()
        assert msg is not None
        assert msg.request == req and msg.flags & vu.FLAG_REPLY
        return msg

    async def ack(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        msg = await self.call(req, payload, fds)
        return int(vu.U64.unpack(msg.payload)[0])

    def close(self) -> None:
        self.sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
