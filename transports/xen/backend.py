"""The Xen 9pfs backend: the XenbusState handshake for one device and the server-side Channel.

`XenBackendDevice.run` drives one device (`xen:DOMID/DEVID`) through
InitWait → (frontend Initialised) → Connected → Closing → Closed → InitWait again when the
frontend re-initialises, forever. It publishes `versions=1`, `max-rings`, `max-ring-page-order`;
it validates everything the frontend wrote (version, num-rings, ring-ref<N>, event-channel-<N>,
each ring's ring_order and page refs, read from shared memory once) and refuses bad values by
going to Closing with a log line. Each connection is one `XenBackendChannel` handed to the
server's handler.

The channel's `receive` reads requests from every ring in turn (one doorbell over all the rings'
event channels; no task or thread per ring), copying each whole
message out (`transports._ring.XenRing.take`) before anyone parses it; several requests of one
ring may be in flight; a reply goes to the ring its request came from (found by tag), written
whole once there is room. A ring whose frontend breaks the protocol is stopped and logged; the
other rings keep working; when every ring is broken the channel reports a FramingError.

This module must never parse a message in place in shared memory or trust a frontend value
before it was checked.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ninep.protocol.numbers import READ_HEADER
from transports.base import Buffer, ChannelHandler, FramingError
from transports.xen._ext import ring_ext
from transports.xen.doorbell import Doorbell
from transports.xen.emu import backend_dir, frontend_dir, toolstack_create_device
from transports.xen.platform import (
    EventChannel,
    GrantMapping,
    XenPlatform,
    XenstoreError,
    le32,
    read_or,
)

log = logging.getLogger("ninep.xen")

MAX_RINGS = 8
MAX_RING_ORDER = 9
#: Reads the page cache cannot serve without blocking run in a worker thread; on filesystems
#: without RWF_NOWAIT, so do reads above this size.
THREAD_READ_THRESHOLD = 64 * 1024


class XenbusState(enum.IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


class HandshakeError(Exception):
    """The frontend wrote something the backend refuses; the device goes to Closing."""


def ring_bytes(order: int) -> int:
    """XEN_FLEX_RING_SIZE: bytes per direction of a ring of 2^order pages."""
    return 1 << (order + 11)


def parse_uint(value: str | None, what: str) -> int:
    if value is None:
        raise HandshakeError(f"{what} missing")
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise HandshakeError(f"{what} is not a number: {value!r}")
    return int(value)


def peer_may_wait(ring: Any, queued_before: int, prod_before: int, limit: int) -> bool:
    """After consuming: could the producer be waiting for the room we just freed? Only if the
    free space before was below the largest message (`limit`), or the producer moved meanwhile
    (it may have found the ring full just before our consumer index moved). Saves a wake-up per
    message otherwise; QEMU's backend likewise notifies only with its responses."""
    return ring.size - queued_before < limit or ring.peek()[1] != prod_before


def header_tag(parts: Sequence[Buffer]) -> int:
    head = b""
    for p in parts:
        head += bytes(memoryview(p)[: 7 - len(head)])
        if len(head) >= 7:
            break
    if len(head) < 7:
        raise ValueError("message shorter than a 9P header")
    return int(head[5] | (head[6] << 8))


@dataclass(eq=False)
class BackendRing:
    index: int
    ring: Any  # transports._ring.XenRing
    evtchn: EventChannel
    bell: Doorbell | None  # shared by all rings of a connection
    maps: list[GrantMapping]
    lock: trio.Lock = field(default_factory=trio.Lock)
    dead: bool = False

    def release(self) -> None:
        if self.bell is not None:
            self.bell.close()
        self.ring.close()
        for m in self.maps:
            with contextlib.suppress(BufferError):
                m.close()


class XenBackendChannel:
    """Server side of one connected frontend (a `Channel` with `ZeroCopyReads`)."""

    def __init__(self, rings: list[BackendRing], peer: str, max_msize: int) -> None:
        self.rings = rings
        self.peer = peer
        self.max_message_size = min(max_msize, min(r.ring.size for r in rings))
        self._limit = self.max_message_size
        # tag → ring of the request in flight with that tag. A tag is reused only after its reply
        # (or its Rflush), so a newer request simply replaces a flushed one's entry.
        self._routes: dict[int, BackendRing] = {}
        self._framing_lost = False
        self._closed = False
        self._next_ring = 0
        bell = rings[0].bell
        assert bell is not None
        self._bell: Doorbell = bell

    def _ring_failed(self, r: BackendRing, why: str) -> None:
        if r.dead:
            return
        r.dead = True
        log.warning("%s ring %d: %s; ring stopped", self.peer, r.index, why)
        if all(x.dead for x in self.rings):
            self._framing_lost = True

    # -- Channel -------------------------------------------------------------------------------

    async def receive(self) -> memoryview:
        """The next request from any ring (round robin), copied out whole. Called by one task;
        it waits on the doorbell of every ring at once, so no task per ring is needed."""
        n = len(self.rings)
        while True:
            if self._closed:
                raise trio.EndOfChannel
            if self._framing_lost:
                raise FramingError(f"{self.peer}: every ring broke the protocol")
            for k in range(n):
                r = self.rings[(self._next_ring + k) % n]
                if r.dead:
                    continue
                try:
                    queued, prod = r.ring.peek()
                    msg = r.ring.take(self._limit)
                except ValueError as e:  # XenRingError is a ValueError
                    self._ring_failed(r, str(e))
                    continue
                if msg is None:
                    continue
                self._next_ring = (self._next_ring + k + 1) % n
                if peer_may_wait(r.ring, queued, prod, self._limit):
                    r.evtchn.notify()
                self._routes[msg[5] | (msg[6] << 8)] = r
                return memoryview(msg)
            if self._framing_lost:
                continue
            try:
                await self._bell.wait()
            except trio.ClosedResourceError:
                raise trio.EndOfChannel from None

    def set_msize(self, msize: int) -> None:
        self._limit = max(7, min(msize, self.max_message_size))

    def _route(self, tag: int, pop: bool) -> BackendRing | None:
        return self._routes.pop(tag, None) if pop else self._routes.get(tag)

    async def send(self, parts: Sequence[Buffer]) -> None:
        tag = header_tag(parts)
        r = self._route(tag, pop=True)
        if r is None:
            # A reply nobody asked for on this connection (or the ring died): nowhere to go.
            log.debug("%s: reply with tag %d has no ring", self.peer, tag)
            return
        if r.dead:
            return
        async with r.lock:
            try:
                while not r.ring.put(parts):
                    await self._bell.wait()
            except trio.ClosedResourceError:
                return
            except ValueError as e:
                if type(e).__name__ == "XenRingError":
                    self._ring_failed(r, str(e))
                    return
                raise
        r.evtchn.notify()

    async def send_rread(self, tag: int, fd: int, offset: int, count: int) -> int:
        r = self._route(tag, pop=False)
        if r is None or r.dead:
            raise trio.ClosedResourceError("no ring for this reply")
        count = max(0, min(count, self._limit - READ_HEADER))
        async with r.lock:
            while True:
                try:
                    n = await self._pread_into(r, tag, fd, offset, count)
                except ValueError as e:
                    if type(e).__name__ == "XenRingError":
                        self._ring_failed(r, str(e))
                        self._route(tag, pop=True)
                        raise trio.ClosedResourceError("ring broken") from e
                    raise
                if n is not None:
                    break
                await self._bell.wait()
        self._route(tag, pop=True)
        r.evtchn.notify()
        return int(n)

    @staticmethod
    async def _pread_into(r: BackendRing, tag: int, fd: int, offset: int, count: int) -> int | None:
        """Rread from fd into ring r: from the page cache right here when it can be done without
        blocking (RWF_NOWAIT), else in a worker thread."""
        try:
            n: int | None = r.ring.put_pread(tag, fd, offset, count, True, True)
            return n
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP and count <= THREAD_READ_THRESHOLD:
                n = r.ring.put_pread(tag, fd, offset, count)  # small read, no NOWAIT support
                return n
            if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                raise
        # Read in a worker thread, publish from ours: the reply must not become visible while
        # the session still counts its tag as in flight.
        n = await trio.to_thread.run_sync(r.ring.put_pread, tag, fd, offset, count, False)
        if n is not None:
            r.ring.publish()
        return n

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bell.close()  # shared by every ring: wakes receive and waiting writers


@dataclass
class BackendConfig:
    domid: int
    devid: int
    back_domid: int = 0
    max_rings: int = MAX_RINGS
    max_ring_order: int = MAX_RING_ORDER
    max_msize: int = 4 * 1024 * 1024
    tag: str = "ninep"


class XenBackendDevice:
    """Runs the handshake of one device forever, serving each connection with `handler`."""

    def __init__(self, platform: XenPlatform, config: BackendConfig) -> None:
        self.platform = platform
        self.config = config
        self.be = backend_dir(config.back_domid, config.domid, config.devid)
        self.fe = frontend_dir(config.domid, config.devid)
        self.peer = f"xen:{config.domid}/{config.devid}"
        #: Every state this backend wrote, in order (tests check transitions with it).
        self.history: list[XenbusState] = []

    async def _set_state(self, state: XenbusState) -> None:
        self.history.append(state)
        log.debug("%s backend -> %s", self.peer, state.name)
        await self.platform.write(f"{self.be}/state", str(int(state)))

    async def _frontend_state(self) -> XenbusState:
        raw = await read_or(self.platform, f"{self.fe}/state")
        try:
            return XenbusState(int(raw)) if raw is not None else XenbusState.Closed
        except ValueError:
            return XenbusState.Unknown

    async def _wait_frontend(self, watch: Any, wanted: set[XenbusState]) -> XenbusState:
        while True:
            s = await self._frontend_state()
            if s in wanted:
                return s
            await watch.wait()

    async def run(
        self,
        handler: ChannelHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        p = self.platform
        if await read_or(p, f"{self.be}/frontend") is None:
            # Emulation: nobody played the toolstack yet.
            await toolstack_create_device(
                p,
                self.config.domid,
                self.config.devid,
                back_domid=self.config.back_domid,
                tag=self.config.tag,
            )
        fe = await read_or(p, f"{self.be}/frontend")
        if fe:
            self.fe = fe
        watch = await p.watch(f"{self.fe}/state")
        started = False
        try:
            while True:
                await p.write(f"{self.be}/versions", "1")
                await p.write(f"{self.be}/max-rings", str(self.config.max_rings))
                await p.write(f"{self.be}/max-ring-page-order", str(self.config.max_ring_order))
                await self._set_state(XenbusState.InitWait)
                if not started:
                    started = True
                    task_status.started()
                await self._wait_frontend(watch, {XenbusState.Initialised, XenbusState.Connected})
                try:
                    rings = await self._connect()
                except HandshakeError as e:
                    log.warning("%s: refusing frontend: %s", self.peer, e)
                    await self._set_state(XenbusState.Closing)
                    await self._wait_frontend(
                        watch,
                        {
                            XenbusState.Closing,
                            XenbusState.Closed,
                            XenbusState.Initialising,
                            XenbusState.Unknown,
                        },
                    )
                    await self._set_state(XenbusState.Closed)
                    await self._wait_frontend(
                        watch, {XenbusState.Initialising, XenbusState.Unknown}
                    )
                    continue
                await self._serve(rings, handler, watch)
                await self._wait_frontend(watch, {XenbusState.Initialising, XenbusState.Unknown})
        finally:
            # The backend is going away (server shutdown): tell the frontend, best effort.
            with trio.move_on_after(1, shield=True), contextlib.suppress(Exception):
                if self.history and self.history[-1] != XenbusState.Closed:
                    await self._set_state(XenbusState.Closed)
                await watch.aclose()

    async def _serve(self, rings: list[BackendRing], handler: ChannelHandler, watch: Any) -> None:
        chan = XenBackendChannel(rings, self.peer, self.config.max_msize)
        try:
            await self._set_state(XenbusState.Connected)
            log.info(
                "%s: connected, %d ring(s) of %d bytes", self.peer, len(rings), rings[0].ring.size
            )
            async with trio.open_nursery() as nursery:

                async def run_handler() -> None:
                    try:
                        await handler(chan)
                    except Exception:
                        log.exception("%s: handler failed", self.peer)
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(run_handler)
                await self._wait_frontend(
                    watch,
                    {
                        XenbusState.Closing,
                        XenbusState.Closed,
                        XenbusState.Unknown,
                        XenbusState.Initialising,
                    },
                )
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await chan.aclose()
                for r in rings:
                    r.release()
                    with contextlib.suppress(Exception):
                        await r.evtchn.aclose()
        # Frontend Closing → we unmapped and unbound → Closing → frontend Closed → Closed.
        await self._set_state(XenbusState.Closing)
        await self._wait_frontend(
            watch, {XenbusState.Closed, XenbusState.Unknown, XenbusState.Initialising}
        )
        await self._set_state(XenbusState.Closed)

    async def _connect(self) -> list[BackendRing]:
        """Reads and validates the frontend's nodes and rings; maps and binds them."""
        p, fe, cfg = self.platform, self.fe, self.config
        version = await read_or(p, f"{fe}/version")
        if version != "1":
            raise HandshakeError(f"unsupported transport version {version!r}")
        num_rings = parse_uint(await read_or(p, f"{fe}/num-rings"), "num-rings")
        if not 1 <= num_rings <= cfg.max_rings:
            raise HandshakeError(f"num-rings {num_rings} out of range 1..{cfg.max_rings}")
        intf_refs: list[int] = []
        ports: list[int] = []
        for i in range(num_rings):
            intf_refs.append(parse_uint(await read_or(p, f"{fe}/ring-ref{i}"), f"ring-ref{i}"))
            ports.append(
                parse_uint(await read_or(p, f"{fe}/event-channel-{i}"), f"event-channel-{i}")
            )
        seen: set[int] = set()
        for ref in intf_refs:
            if ref in seen:
                raise HandshakeError(f"duplicate grant ref {ref}")
            seen.add(ref)
        rings: list[BackendRing] = []
        maps: list[GrantMapping] = []
        channels: list[EventChannel] = []
        try:
            for i in range(num_rings):
                try:
                    intf = await p.map_grants(cfg.domid, [intf_refs[i]])
                except (XenstoreError, ValueError, OSError) as e:
                    raise HandshakeError(f"ring {i}: cannot map interface page: {e}") from None
                maps.append(intf)
                # One read of the order and one of the ref list, into private memory.
                order = le32(intf, 128)
                if not 1 <= order <= cfg.max_ring_order:
                    raise HandshakeError(
                        f"ring {i}: ring_order {order} out of range 1..{cfg.max_ring_order}"
                    )
                with memoryview(intf) as page:  # type: ignore[arg-type]
                    refs = list(struct.unpack_from(f"<{1 << order}I", page, 132))
                for ref in refs:
                    if ref in seen:
                        raise HandshakeError(f"ring {i}: duplicate grant ref {ref}")
                    seen.add(ref)
                try:
                    data = await p.map_grants(cfg.domid, refs)
                except (XenstoreError, ValueError, OSError) as e:
                    raise HandshakeError(f"ring {i}: cannot map data pages: {e}") from None
                maps.append(data)
                try:
                    ch = await p.bind_interdomain(cfg.domid, ports[i])
                except XenstoreError as e:
                    raise HandshakeError(
                        f"ring {i}: cannot bind event channel {ports[i]}: {e}"
                    ) from None
                channels.append(ch)
                ring = ring_ext().XenRing(intf, data, order, False)
                rings.append(BackendRing(i, ring, ch, None, [intf, data]))
            # One doorbell over every ring's event channel, shared by the reader and the writers.
            bell = Doorbell(channels)
            for r in rings:
                r.bell = bell
        except BaseException:
            with trio.CancelScope(shield=True):
                for r in rings:
                    r.release()
                for m in maps:
                    with contextlib.suppress(BufferError):
                        m.close()
                for ch in channels:
                    with contextlib.suppress(Exception):
                        await ch.aclose()
            raise
        return rings
