"""Helpers for the Xen transport tests: an emulated xenstore daemon, a backend with an echo-style
handler, and raw access for writing whatever a hostile guest would."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]


def _ensure_extension() -> None:
    try:
        import transports._ring as r

        if hasattr(r, "XenRing"):
            return
    except ImportError:
        pass
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


_ensure_extension()

from transports.options import ConnectOptions, ListenOptions  # noqa: E402
from transports.xen import XenFrontend, XenListener, connect_address, listener_from_address  # noqa: E402
from transports.xen.backend import XenbusState  # noqa: E402
from transports.xen.emu import Daemon, serve_xenstore  # noqa: E402
from transports.xen.platform import EmuPlatform, read_or  # noqa: E402


def run(fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    async def main() -> Any:
        with trio.fail_after(timeout):
            return await fn()

    return trio.run(main)


def hdr(size: int, mtype: int, tag: int) -> bytes:
    return struct.pack("<IBH", size, mtype, tag)


def msg(tag: int, body: bytes = b"", mtype: int = 100) -> bytes:
    return hdr(7 + len(body), mtype, tag) + body


async def echo(chan: Any) -> None:
    """Answers every message with the same bytes and type+1."""
    while True:
        try:
            m = await chan.receive()
        except trio.EndOfChannel:
            return
        b = bytearray(m)
        b[4] = (b[4] + 1) & 0xFF
        await chan.send([bytes(b[:7]), bytes(b[7:])])


async def wait_until(
    pred: Callable[[], Awaitable[bool]], timeout: float = 5, what: str = ""
) -> None:
    with trio.fail_after(timeout):
        while not await pred():
            await trio.sleep(0.005)


@dataclass
class Env:
    sock: str
    nursery: trio.Nursery
    daemon: Daemon
    listeners: dict[str, XenListener] = field(default_factory=dict)

    def address(self, domid: int, devid: int = 0) -> str:
        return f"xen:{domid}/{devid},xenstore={self.sock}"

    async def serve(
        self, domid: int, devid: int = 0, handler: Any = echo, options: ListenOptions | None = None
    ) -> XenListener:
        lst = listener_from_address(self.address(domid, devid), options or ListenOptions())
        await self.nursery.start(lst.serve, handler)
        self.listeners[f"{domid}/{devid}"] = lst
        return lst

    async def connect(self, domid: int, devid: int = 0) -> XenFrontend:
        return await connect_address(self.address(domid, devid), ConnectOptions())

    async def platform(self, domid: int = 0, arena_pages: int = 0) -> EmuPlatform:
        return await EmuPlatform.connect(self.sock, domid=domid, arena_pages=arena_pages)

    async def backend_state(self, domid: int, devid: int = 0) -> int:
        p = await self.platform(0x7000 + domid)
        try:
            return int(
                await read_or(p, f"/local/domain/0/backend/9pfs/{domid}/{devid}/state", "-1") or -1
            )
        finally:
            await p.aclose()


@asynccontextmanager
async def environment(sock: str) -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(serve_xenstore, sock)
        yield Env(sock, nursery, daemon)
        nursery.cancel_scope.cancel()


async def roundtrip(front: XenFrontend, tag: int, body: bytes = b"ping") -> bytes:
    await front.send([msg(tag, body)])
    r = bytes(await front.receive())
    return r


@dataclass
class RawRing:
    intf: Any  # SharedPages
    data: Any
    evtchn: Any
    ring: Any  # XenRing(frontend=True), usable once the backend accepted the rings


@dataclass
class RawFront:
    """A frontend whose every xenstore value and ring byte the test controls."""

    platform: EmuPlatform
    fe: str
    be: str
    rings: list[RawRing]
    order: int

    def intf(self, i: int) -> memoryview:
        return self.rings[i].intf.view

    def set_idx(self, i: int, off: int, value: int) -> None:
        struct.pack_into("<I", self.intf(i), off, value & 0xFFFFFFFF)

    def get_idx(self, i: int, off: int) -> int:
        return int(struct.unpack_from("<I", self.intf(i), off)[0])

    async def state(self, node: str = "be") -> int:
        path = self.be if node == "be" else self.fe
        return int(await read_or(self.platform, f"{path}/state", "-1") or -1)

    async def wait_backend(self, states: set[int], timeout: float = 5) -> int:
        with trio.fail_after(timeout):
            while True:
                s = await self.state()
                if s in states:
                    return s
                await trio.sleep(0.005)

    async def set_state(self, state: int) -> None:
        await self.platform.write(f"{self.fe}/state", str(state))

    async def close(self) -> None:
        for r in self.rings:
            if r.ring is not None:
                r.ring.close()
        await self.platform.aclose()


async def raw_handshake(
    env: Env,
    domid: int,
    devid: int = 0,
    *,
    num_rings: int = 2,
    order: int = 1,
    nodes: Callable[[dict[str, str], list[RawRing]], None] | None = None,
    intf_hook: Callable[[int, memoryview, list[int]], None] | None = None,
) -> RawFront:
    """Does a frontend handshake up to Initialised; `nodes` may rewrite the xenstore values the
    frontend publishes and `intf_hook` the interface pages, to play a hostile guest."""
    from transports.xen._ext import ring_ext

    plat = await env.platform(
        domid, arena_pages=max(64, num_rings * (1 + (1 << min(order, 9))) + 16)
    )
    fe = f"/local/domain/{domid}/device/9pfs/{devid}"
    be = await plat.read(f"{fe}/backend")
    raw = RawFront(plat, fe, be, [], order)
    await raw.set_state(XenbusState.Initialising)
    await raw.wait_backend({XenbusState.InitWait})
    for i in range(num_rings):
        intf = await plat.share_pages(0, 1)
        npages = 1 << min(order, 9) if order >= 1 else 1
        data = await plat.share_pages(0, npages)
        struct.pack_into("<I", intf.view, 128, order)
        refs = list(data.refs)
        if intf_hook is not None:
            intf_hook(i, intf.view, refs)
        struct.pack_into(f"<{len(refs)}I", intf.view, 132, *refs)
        ch = await plat.alloc_unbound(0)
        ring = ring_ext().XenRing(intf.view, data.view, order, True) if 1 <= order <= 9 else None
        raw.rings.append(RawRing(intf, data, ch, ring))
    values = {"version": "1", "num-rings": str(num_rings)}
    for i, r in enumerate(raw.rings):
        values[f"ring-ref{i}"] = str(r.intf.refs[0])
        values[f"event-channel-{i}"] = str(r.evtchn.port)
    if nodes is not None:
        nodes(values, raw.rings)
    for k, v in values.items():
        await plat.write(f"{fe}/{k}", v)
    await raw.set_state(XenbusState.Initialised)
    return raw


async def raw_exchange(raw: RawFront, i: int, tag: int, body: bytes = b"ping") -> bytes:
    """Sends one request on ring i of a raw frontend and waits for a reply on the same ring."""
    r = raw.rings[i]
    assert r.ring.put([msg(tag, body)])
    r.evtchn.notify()
    with trio.fail_after(5):
        while True:
            got = r.ring.take(1 << 20)
            if got is not None:
                return bytes(got)
            await trio.sleep(0.002)


__all__ = [
    "RawFront",
    "raw_exchange",
    "raw_handshake",
    "Env",
    "EmuPlatform",
    "XenbusState",
    "echo",
    "environment",
    "hdr",
    "msg",
    "roundtrip",
    "run",
    "wait_until",
]
