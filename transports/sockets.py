"""The `tcp:HOST:PORT`, `unix:PATH` and `fd:RFD,WFD` addresses: parses them and makes the
stream listeners and channels for them, with TLS on TCP when the options carry a TLS config.

It sits above `transports.stream` (framing) and `transports.tls` (handshakes) so that neither
needs the other's address handling; `transports.address` names it for these three schemes. This
module must never frame or interpret messages, nor accept a connection itself.
"""

from __future__ import annotations

import socket

import trio

from transports.base import Channel
from transports.options import (
    AddressError,
    ConnectOptions,
    ListenOptions,
    check_exposure,
    parse_tcp,
)
from transports.stream import (
    STREAM_MAX_MESSAGE,
    FdListener,
    FdPairChannel,
    SocketChannel,
    SocketListener,
)
from transports.tls import client_channel, tcp_upgrade


def _parse_fds(rest: str) -> tuple[int, int]:
    r, sep, w = rest.partition(",")
    if not sep or not r.isdigit() or not w.isdigit():
        raise AddressError(f"fd address must be fd:RFD,WFD, not fd:{rest}")
    return int(r), int(w)


def listener_from_address(address: str, options: ListenOptions) -> SocketListener | FdListener:
    scheme, _, rest = address.partition(":")
    limit = min(options.max_msize, STREAM_MAX_MESSAGE)
    if scheme == "tcp":
        host, port = parse_tcp(rest)
        check_exposure(host, options)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return SocketListener(address, family, (host, port), limit, upgrade=tcp_upgrade(options, limit))
    if scheme == "unix":
        if not rest:
            raise AddressError("unix address must be unix:PATH")
        return SocketListener(address, socket.AF_UNIX, rest, limit)
    if scheme == "fd":
        r, w = _parse_fds(rest)
        return FdListener(address, r, w, limit)
    raise AddressError(f"not a stream address: {address}")


async def connect_address(address: str, options: ConnectOptions) -> Channel:
    scheme, _, rest = address.partition(":")
    limit = min(options.max_msize, STREAM_MAX_MESSAGE)
    if scheme == "tcp":
        host, port = parse_tcp(rest)
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if options.tls is not None:
            return await client_channel(sock, host, address, options.tls, limit)
        return SocketChannel(sock, address, limit)
    if scheme == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(rest)
        except BaseException:
            sock.close()
            raise
        return SocketChannel(sock, address, limit)
    if scheme == "fd":
        r, w = _parse_fds(rest)
        return FdPairChannel(r, w, limit)
    raise AddressError(f"not a stream address: {address}")
