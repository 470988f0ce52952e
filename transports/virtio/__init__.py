"""virtio-9p over vhost-user: ninep as the device back-end of a VM's virtio-9p device, and an
in-process front-end (VMM + guest driver) for tests, FUSE and benchmarks.

Addresses: `vhost-user:SOCK`. `listener_from_address` serves the socket (the mount tag comes
from `options.tag`); `connect_address` connects a `Frontend` and returns its client Channel.
The compiled extension `transports._ring` is required; importing this package without it raises
an ImportError that says how to build it.

This package must never touch guest memory outside `transports._ring` on the server side.
"""

from __future__ import annotations

from transports.base import Channel, Listener
from transports.options import AddressError, ConnectOptions, ListenOptions
from transports.virtio.backend import VhostUserListener
from transports.virtio.frontend import Frontend, FrontendChannel, FrontendError

SCHEME = "vhost-user:"
#: The largest msize Linux's virtio transport uses is 500 KiB; our front-end can go higher.
DEFAULT_FRONTEND_MSIZE = 512 * 1024


def _path(address: str) -> str:
    if not address.startswith(SCHEME) or len(address) == len(SCHEME):
        raise AddressError(f"expected vhost-user:SOCKET_PATH, got {address!r}")
    return address[len(SCHEME) :]


def listener_from_address(address: str, options: ListenOptions) -> Listener:
    try:
        return VhostUserListener(address, _path(address), options.tag, options.max_msize, options.poll_us,
                                 options.direct_io)
    except ValueError as exc:
        raise AddressError(str(exc)) from None


async def connect_address(address: str, options: ConnectOptions) -> Channel:
    frontend = Frontend(_path(address), msize=min(options.max_msize, 4 * 1024 * 1024), expected_tag=None)
    try:
        return await frontend.connect()
    except BaseException:
        await frontend.aclose()
        raise


__all__ = [
    "DEFAULT_FRONTEND_MSIZE",
    "Frontend",
    "FrontendChannel",
    "FrontendError",
    "VhostUserListener",
    "connect_address",
    "listener_from_address",
]
