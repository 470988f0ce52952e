"""A Xen 9pfs frontend that behaves as Linux's net/9p/trans_xen.c does — the client-side Channel.

Handshake as Linux: wait for the backend's InitWait, require version 1 in `versions` and
`max-rings` ≥ the rings we use (2), use ring order min(`max-ring-page-order`, 9), share one
interface page and 2^order data pages per ring, allocate an event channel per ring, write
`version`, `num-rings`, `ring-ref<N>`, `event-channel-<N>` in one transaction, read `tag`, go
Initialised, and become Connected when the backend is.

Data path as Linux: a request goes on ring `tag % num_rings` (Tversion's NOTAG → ring 1), is
written whole once enough space is free (never split across waits), then the backend is
notified. Responses are read header first (via `XenRing.take`), a reply bigger than our receive
capacity (msize) breaks the channel, one for a tag we did not send is skipped with a warning.

This module must never read a response in place; it is a test/bench/FUSE client, not a guest
kernel, but it keeps the same rules so the backend is exercised as a Linux guest would.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from transports.base import Buffer, FramingError
from transports.xen._ext import ring_ext
from transports.xen.backend import XenbusState, header_tag, peer_may_wait, ring_bytes
from transports.xen.doorbell import Doorbell
from transports.xen.emu import frontend_dir
from transports.xen.platform import EventChannel, SharedPages, XenPlatform, read_or

log = logging.getLogger("ninep.xen.frontend")

NUM_RINGS = 2  # XEN_9PFS_NUM_RINGS
MAX_RING_ORDER = 9  # XEN_9PFS_RING_ORDER
LINUX_MAXSIZE = 1 << (MAX_RING_ORDER + 12 - 2)


class XenConnectError(ConnectionError):
    """The backend is missing, refused us, or offers nothing we can use."""


@dataclass(eq=False)
class FrontRing:
    ring: Any  # transports._ring.XenRing (frontend=True)
    evtchn: EventChannel
    intf: SharedPages
    data: SharedPages
    lock: trio.Lock = field(default_factory=trio.Lock)


class XenFrontend:
    """Client Channel over the rings of one device. Create with `await XenFrontend.connect()`."""

    def __init__(self, platform: XenPlatform, devid: int, owns_platform: bool) -> None:
        self.platform = platform
        self.devid = devid
        self.fe = frontend_dir(platform.domid, devid)
        self.be = ""
        self.backend_id = 0
        self.tag = ""
        self.peer = f"xen:{platform.domid}/{devid}"
        self.rings: list[FrontRing] = []
        self.max_message_size = LINUX_MAXSIZE
        self._msize = LINUX_MAXSIZE
        self._bell: Doorbell | None = None
        self._owns_platform = owns_platform
        self._inflight: set[int] = set()
        self._next_ring = 0
        self._closed = False
        self._watch: Any = None
        self._monitor_scope = trio.CancelScope()
        #: Set when the backend left (Closing/Closed) or the platform connection broke.
        self.backend_gone = False

    @classmethod
    async def connect(
        cls,
        platform: XenPlatform,
        devid: int,
        *,
        num_rings: int = NUM_RINGS,
        max_ring_order: int = MAX_RING_ORDER,
        owns_platform: bool = False,
        timeout: float = 10.0,
    ) -> XenFrontend:
        self = cls(platform, devid, owns_platform)
        try:
            with trio.fail_after(timeout):
                await self._handshake(num_rings, max_ring_order)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(announce=True)
            raise
        return self

    async def _state(self, path: str) -> XenbusState:
        raw = await read_or(self.platform, path)
        try:
            return XenbusState(int(raw)) if raw is not None else XenbusState.Unknown
        except ValueError:
            return XenbusState.Unknown

    async def _wait_backend(self, wanted: set[XenbusState], fail: set[XenbusState]) -> XenbusState:
        while True:
            s = await self._state(f"{self.be}/state")
            if s in wanted:
                return s
            if s in fail:
                raise XenConnectError(f"{self.peer}: backend went to {s.name}")
            await self._watch.wait()

    async def _handshake(self, num_rings: int, max_ring_order: int) -> None:
        p = self.platform
        be = await read_or(p, f"{self.fe}/backend")
        if not be:
            raise XenConnectError(f"{self.peer}: no such device (is the backend running?)")
        self.be = be
        self.backend_id = int(await read_or(p, f"{self.fe}/backend-id", "0") or 0)
        self._watch = await p.watch(f"{be}/state")
        await p.write(f"{self.fe}/state", str(int(XenbusState.Initialising)))
        await self._wait_backend({XenbusState.InitWait}, set())
        versions = (await read_or(p, f"{be}/versions", "")) or ""
        if "1" not in versions.split(","):
            raise XenConnectError(f"{self.peer}: backend offers versions {versions!r}, not 1")
        max_rings = int(await read_or(p, f"{be}/max-rings", "0") or 0)
        if max_rings < num_rings:
            raise XenConnectError(
                f"{self.peer}: backend allows {max_rings} rings, need {num_rings}"
            )
        order = min(int(await read_or(p, f"{be}/max-ring-page-order", "0") or 0), max_ring_order)
        if order < 1:
            raise XenConnectError(f"{self.peer}: backend ring order {order} unusable")
        size = ring_bytes(order)
        self.max_message_size = LINUX_MAXSIZE if size >= LINUX_MAXSIZE else size // 2
        self._msize = self.max_message_size

        for _ in range(num_rings):
            intf = await p.share_pages(self.backend_id, 1)
            data = await p.share_pages(self.backend_id, 1 << order)
            struct.pack_into("<I", intf.view, 128, order)
            struct.pack_into(f"<{1 << order}I", intf.view, 132, *data.refs)
            ch = await p.alloc_unbound(self.backend_id)
            ring = ring_ext().XenRing(intf.view, data.view, order, True)
            self.rings.append(FrontRing(ring, ch, intf, data))
        self._bell = Doorbell([r.evtchn for r in self.rings])
        while True:
            tx = await p.transaction_start()
            await p.write(f"{self.fe}/version", "1", tx)
            await p.write(f"{self.fe}/num-rings", str(num_rings), tx)
            for i, r in enumerate(self.rings):
                await p.write(f"{self.fe}/ring-ref{i}", str(r.intf.refs[0]), tx)
                await p.write(f"{self.fe}/event-channel-{i}", str(r.evtchn.port), tx)
            self.tag = (await read_or(p, f"{self.fe}/tag", "")) or ""
            if await p.transaction_end(tx):
                break
        await p.write(f"{self.fe}/state", str(int(XenbusState.Initialised)))
        await self._wait_backend({XenbusState.Connected}, {XenbusState.Closing, XenbusState.Closed})
        await p.write(f"{self.fe}/state", str(int(XenbusState.Connected)))
        # Not tied to any caller's nursery: a Channel has none. It only watches the backend state.
        trio.lowlevel.spawn_system_task(self._monitor, name=f"{self.peer} backend monitor")

    async def _monitor(self) -> None:
        """Ends the channel (receive → EndOfChannel) when the backend leaves, as Linux's
        otherend_changed does."""
        with self._monitor_scope:
            try:
                while True:
                    s = await self._state(f"{self.be}/state")
                    if s != XenbusState.Connected:
                        log.info("%s: backend went to %s", self.peer, s.name)
                        break
                    await self._watch.wait()
            except Exception as e:  # the platform connection broke: same outcome
                log.info("%s: lost the platform: %s", self.peer, e)
            self.backend_gone = True
            if self._bell is not None:
                self._bell.close()

    # -- Channel -------------------------------------------------------------------------------

    def set_msize(self, msize: int) -> None:
        self._msize = max(7, min(msize, self.max_message_size))

    async def send(self, parts: Sequence[Buffer]) -> None:
        if self._closed or self._bell is None:
            raise trio.ClosedResourceError("channel closed")
        tag = header_tag(parts)
        r = self.rings[tag % len(self.rings)]
        self._inflight.add(tag)
        async with r.lock:
            try:
                while not r.ring.put(parts):
                    await self._bell.wait()
            except ValueError as e:
                if type(e).__name__ == "XenRingError":
                    raise FramingError(f"{self.peer}: {e}") from e
                raise
        r.evtchn.notify()

    async def receive(self) -> memoryview:
        while True:
            if self._closed or self._bell is None:
                raise trio.EndOfChannel
            n = len(self.rings)
            for k in range(n):
                r = self.rings[(self._next_ring + k) % n]
                try:
                    queued, prod = r.ring.peek()
                    msg = r.ring.take(self._msize)
                except ValueError as e:
                    raise FramingError(f"{self.peer}: {e}") from e
                if msg is None:
                    continue
                self._next_ring = (self._next_ring + k + 1) % n
                if peer_may_wait(r.ring, queued, prod, self._msize):
                    r.evtchn.notify()  # the backend may be waiting for room in this ring
                tag = msg[5] | (msg[6] << 8)
                if tag not in self._inflight:
                    log.warning("%s: reply for unknown tag %d skipped", self.peer, tag)
                    break
                self._inflight.discard(tag)
                return memoryview(msg)
            else:
                try:
                    await self._bell.wait()
                except trio.ClosedResourceError:
                    raise trio.EndOfChannel from None

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            await self._teardown(announce=True)

    async def _teardown(self, announce: bool) -> None:
        self._closed = True
        self._monitor_scope.cancel()
        if self._bell is not None:
            self._bell.close()
        p = self.platform
        with contextlib.suppress(Exception):
            if announce and self.be:
                await p.write(f"{self.fe}/state", str(int(XenbusState.Closing)))
                if self._watch is not None:
                    with trio.move_on_after(5):
                        await self._wait_backend(
                            {
                                XenbusState.Closing,
                                XenbusState.Closed,
                                XenbusState.InitWait,
                                XenbusState.Unknown,
                            },
                            set(),
                        )
        for r in self.rings:
            r.ring.close()
            with contextlib.suppress(Exception):
                await r.evtchn.aclose()
            r.intf.release()
            r.data.release()
        self.rings = []
        with contextlib.suppress(Exception):
            if announce and self.be:
                await p.write(f"{self.fe}/state", str(int(XenbusState.Closed)))
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.aclose()
        if self._owns_platform:
            with contextlib.suppress(Exception):
                await p.aclose()
