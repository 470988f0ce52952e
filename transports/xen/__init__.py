"""The Xen 9pfs ring transport ("xen:DOMID/DEVID"), over the emulated platform by default.

Address: `xen:DOMID/DEVID` optionally followed by `,xenstore=PATH` (the emulated xenstore socket;
default `$NINEP_XENSTORE` or /run/ninep/xenstore.sock, served by `ninep xenstore-emu`).

- `listener_from_address` → `XenListener`: the backend (domain 0) of device DEVID of domain
  DOMID; one Channel per frontend connection, again and again as frontends reconnect.
- `connect_address` → `XenFrontend`: plays guest domain DOMID and connects like Linux does.

Parts: `platform` (XenPlatform interface + emulated client), `emu` (the daemon
`ninep xenstore-emu` serves), `backend`, `frontend`, `doorbell`, `wire`.
This package must never touch ring memory outside `transports._ring`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from transports.base import ChannelHandler
from transports.options import AddressError, ConnectOptions, ListenOptions
from transports.xen.backend import BackendConfig, XenBackendChannel, XenBackendDevice, XenbusState
from transports.xen.frontend import NUM_RINGS, XenFrontend
from transports.xen.platform import EmuPlatform, XenPlatform, default_socket

__all__ = [
    "XenAddress",
    "XenBackendChannel",
    "XenBackendDevice",
    "XenFrontend",
    "XenListener",
    "XenbusState",
    "connect_address",
    "listener_from_address",
    "parse_address",
]

#: Pages of grantable memory a connecting frontend gets: 2 rings of order 9 plus slack.
FRONTEND_ARENA_PAGES = NUM_RINGS * (1 + 512) + 64


@dataclass(frozen=True, slots=True)
class XenAddress:
    domid: int
    devid: int
    xenstore: str


def parse_address(address: str) -> XenAddress:
    scheme, _, rest = address.partition(":")
    if scheme != "xen":
        raise AddressError(f"not a xen address: {address!r}")
    main, *opts = rest.split(",")
    dom, sep, dev = main.partition("/")
    if not sep or not dom.isdigit() or not dev.isdigit():
        raise AddressError(f"expected xen:DOMID/DEVID, got {address!r}")
    xenstore = default_socket()
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key != "xenstore" or not eq or not value:
            raise AddressError(f"unknown xen address option {opt!r}")
        xenstore = value
    domid, devid = int(dom), int(dev)
    if not 0 < domid < 0x7FF0:
        raise AddressError(f"domain id {domid} is not a guest domain")
    return XenAddress(domid, devid, xenstore)


class XenListener:
    def __init__(self, address: str, options: ListenOptions) -> None:
        self.address = address
        self.addr = parse_address(address)
        self.options = options
        self.device: XenBackendDevice | None = None

    async def serve(
        self,
        handler: ChannelHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        platform: XenPlatform = await EmuPlatform.connect(self.addr.xenstore, domid=0)
        try:
            cfg = BackendConfig(
                self.addr.domid,
                self.addr.devid,
                max_msize=self.options.max_msize,
                tag=self.options.tag,
            )
            self.device = XenBackendDevice(platform, cfg)
            await self.device.run(handler, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await platform.aclose()


def listener_from_address(address: str, options: ListenOptions) -> XenListener:
    return XenListener(address, options)


async def connect_address(address: str, options: ConnectOptions) -> XenFrontend:
    addr = parse_address(address)
    platform = await EmuPlatform.connect(
        addr.xenstore, domid=addr.domid, arena_pages=FRONTEND_ARENA_PAGES
    )
    try:
        front = await XenFrontend.connect(platform, addr.devid, owns_platform=True)
    except BaseException:
        with trio.CancelScope(shield=True):
            await platform.aclose()
        raise
    front.set_msize(options.max_msize)
    return front
