"""Runs a ninep server on a chosen transport inside one trio run and connects clients to it.

Every transport the project has is registered in TRANSPORTS: a function that starts the server's
listener side in a nursery and returns a coroutine function that opens a new client Channel. The
end-to-end tests are parametrized over this table, so a new transport adds one entry here and
runs the whole suite.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from fs_backends.base import Backend
from ninep.cli.serving import direct_io_policy
from ninep.client import Client
from ninep.protocol.numbers import V9P2000_L
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.address import connect_address, listener_from_address
from transports.base import Channel
from transports.options import ConnectOptions, ListenOptions
from transports.stream import FdPairChannel

Connector = Callable[[], Awaitable[Channel]]
TransportSetup = Callable[[trio.Nursery, Server, Path], Awaitable[Connector]]


async def _address_transport(address: str, nursery: trio.Nursery, server: Server) -> Connector:
    # Direct I/O as `ninep serve` sets it up (vhost-user only uses it).
    options = ListenOptions(max_msize=server.options.max_msize, direct_io=direct_io_policy())
    listener = listener_from_address(address, options)
    await nursery.start(server.serve, [listener])
    if address.startswith("tcp:"):
        host, port = listener.bound  # type: ignore[attr-defined]
        address = f"tcp:{host}:{port}"

    async def connect() -> Channel:
        return await connect_address(address, ConnectOptions())

    return connect


async def tcp(nursery: trio.Nursery, server: Server, tmp: Path) -> Connector:
    return await _address_transport("tcp:127.0.0.1:0", nursery, server)


async def unix(nursery: trio.Nursery, server: Server, tmp: Path) -> Connector:
    return await _address_transport(f"unix:{tmp}/9p.sock", nursery, server)


async def fd(nursery: trio.Nursery, server: Server, tmp: Path) -> Connector:
    """Each client gets its own socketpair served as `fd:N,N` (what trans=fd sees)."""

    async def connect() -> Channel:
        a, b = socket.socketpair()
        # FdPairChannel dups the fds, so the socket objects can be closed right away.
        server_side = FdPairChannel(a.fileno(), a.fileno())
        client_side = FdPairChannel(b.fileno(), b.fileno())
        a.close()
        b.close()

        async def serve_one() -> None:
            try:
                await server.handle(server_side)
            finally:
                with trio.CancelScope(shield=True):
                    await server_side.aclose()

        nursery.start_soon(serve_one)
        return client_side

    await nursery.start(server.serve, [])
    return connect


async def xen(nursery: trio.Nursery, server: Server, tmp: Path) -> Connector:
    """An emulated xenstore; each client is a guest domain with its own 9pfs device (a device is
    reused by the next client once its frontend closed, as a rebooted guest would)."""
    from transports.xen.emu import serve_xenstore

    # Outside `tmp`: tests check that nothing but the export (and 9p.sock) appears there.
    sockdir = tempfile.mkdtemp(prefix="ninep-xs-")
    sock = f"{sockdir}/xs.sock"
    domids = iter(range(1, 0x7FF0))

    async def world(*, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as inner:
                await inner.start(serve_xenstore, sock)
                task_status.started(inner)
                await server.serve([])  # returns once shut down and drained
                inner.cancel_scope.cancel()
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)

    inner: trio.Nursery = await nursery.start(world)

    idle: list[str] = []  # devices whose frontend left: the backend waits for the next one

    class Reconnectable:
        """The frontend Channel; closing it hands its device to the next client."""

        def __init__(self, channel: Channel, address: str) -> None:
            self._channel, self._address = channel, address

        def __getattr__(self, name: str) -> Any:
            return getattr(self._channel, name)

        async def aclose(self) -> None:
            await self._channel.aclose()
            if self._address:
                idle.append(self._address)
                self._address = ""

    async def connect() -> Channel:
        if idle:
            address = idle.pop()
        else:
            address = f"xen:{next(domids)}/0,xenstore={sock}"
            listener = listener_from_address(address, ListenOptions(max_msize=server.options.max_msize))
            await inner.start(listener.serve, server.handle)
        return Reconnectable(await connect_address(address, ConnectOptions()), address)  # type: ignore[return-value]

    return connect


async def vhost_user(nursery: trio.Nursery, server: Server, tmp: Path) -> Connector:
    """virtio-9p: the vhost-user back-end, with `transports.virtio.Frontend` playing VMM and guest
    driver (each client is one VMM connection, so one device and one 9P session)."""
    return await _address_transport(f"vhost-user:{tmp}/vhost.sock", nursery, server)


TRANSPORTS: dict[str, TransportSetup] = {
    "tcp": tcp, "unix": unix, "fd": fd, "vhost-user": vhost_user, "xen": xen,
}


@asynccontextmanager
async def served(
    backend: Backend,
    transport: str,
    tmp: Path,
    options: SessionOptions | None = None,
) -> AsyncIterator[tuple[Server, Connector]]:
    """A running server on `transport`; yields it and a connector for new client channels."""
    server = Server(backend, options or SessionOptions(max_msize=1 << 20))
    async with trio.open_nursery() as nursery:
        connect = await TRANSPORTS[transport](nursery, server, tmp)
        try:
            yield server, connect
        finally:
            server.shutdown()
            await trio.sleep(0)
            nursery.cancel_scope.deadline = trio.current_time() + 10


@asynccontextmanager
async def client_for(connect: Connector, *, dialect: str = V9P2000_L, msize: int = 1 << 20) -> AsyncIterator[Client]:
    async with Client.connect(await connect(), dialect=dialect, msize=msize) as c:
        yield c


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
