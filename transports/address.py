"""Turns command-line addresses into Listeners (server side) and Channels (client side).

`tcp:HOST:PORT`, `unix:PATH`, `fd:RFD,WFD` are served by `transports.stream`; `vhost-user:SOCK`
by `transports.virtio`; `xen:DOMID/DEVID` by `transports.xen`. Each transport package exposes two
functions, imported lazily so a missing optional part (the compiled ring extension) only fails
when that transport is asked for:

    def listener_from_address(address: str, options: ListenOptions) -> Listener
    async def connect_address(address: str, options: ConnectOptions) -> Channel

(`address` is the whole string, scheme included.)

This module must never open sockets itself or know any transport's details.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transports.base import Channel, Listener

if TYPE_CHECKING:
    from transports.tls import ClientTLS, ServerTLS

SCHEMES = {
    "tcp": "transports.stream",
    "unix": "transports.stream",
    "fd": "transports.stream",
    "vhost-user": "transports.virtio",
    "xen": "transports.xen",
}


@dataclass(slots=True)
class ListenOptions:
    #: Largest msize the server will agree to (the transport may lower it further).
    max_msize: int = 4 * 1024 * 1024
    #: Mount tag presented by device transports (virtio config, Xen `tag` node).
    tag: str = "ninep"
    #: Allow non-loopback TCP binds without TLS client authentication.
    insecure: bool = False
    #: TLS on every TCP listener (transports.tls); None: plain TCP.
    tls: ServerTLS | None = None
    #: Longest spin (µs) of a vhost-user queue on its ring before sleeping until a kick
    #: (transports.virtio.polling); None: the default for this machine, 0: never spin.
    poll_us: int | None = None


@dataclass(slots=True)
class ConnectOptions:
    max_msize: int = 4 * 1024 * 1024
    tag: str = "ninep"
    #: TLS for `tcp:` addresses (transports.tls); None: plain TCP.
    tls: ClientTLS | None = None


class AddressError(ValueError):
    """An address that names no transport or is malformed."""


def split(address: str) -> tuple[str, str, str]:
    """Returns (scheme, module name, rest) or raises AddressError."""
    scheme, sep, rest = address.partition(":")
    if not sep or scheme not in SCHEMES:
        known = ", ".join(f"{s}:…" for s in SCHEMES)
        raise AddressError(f"unknown address {address!r}; expected one of {known}")
    return scheme, SCHEMES[scheme], address


def listener_from_address(address: str, options: ListenOptions | None = None) -> Listener:
    _, module, full = split(address)
    mod = importlib.import_module(module)
    listener: Listener = mod.listener_from_address(full, options or ListenOptions())
    return listener


async def connect_address(address: str, options: ConnectOptions | None = None) -> Channel:
    _, module, full = split(address)
    mod = importlib.import_module(module)
    channel: Channel = await mod.connect_address(full, options or ConnectOptions())
    return channel
