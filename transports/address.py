"""Turns command-line addresses into Listeners (server side) and Channels (client side).

`tcp:HOST:PORT`, `unix:PATH`, `fd:RFD,WFD` are served by `transports.sockets`
(framing in `transports.stream`, TLS in `transports.tls`); `vhost-user:SOCK`
by `transports.virtio`; `xen:DOMID/DEVID` by `transports.xen`. Each transport package exposes two
functions, imported lazily so a missing optional part (the compiled ring extension) only fails
when that transport is asked for:

    def listener_from_address(address: str, options: ListenOptions) -> Listener
    async def connect_address(address: str, options: ConnectOptions) -> Channel

(`address` is the whole string, scheme included; the options and `AddressError` are
`transports.options`'.)

This module must never open sockets itself or know any transport's details.
"""

from __future__ import annotations

import importlib

from transports.base import Channel, Listener
from transports.options import AddressError, ConnectOptions, ListenOptions

SCHEMES = {
    "tcp": "transports.sockets",
    "unix": "transports.sockets",
    "fd": "transports.sockets",
    "vhost-user": "transports.virtio",
    "xen": "transports.xen",
}


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
