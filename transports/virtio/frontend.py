"""A VMM and a guest driver in one process, for tests, FUSE and benchmarks without a VM.

`Frontend` creates a memfd as "guest memory" (two regions at different guest-physical and
VMM-virtual addresses, so translation is exercised), lays out a split virtqueue in it, connects
to a vhost-user back-end socket with the message sequence QEMU 11 sends, and offers a client-side
`Channel`: `send` places a request as Linux's 9pnet_virtio does (device-readable descriptors with
the request, device-writable ones with room for msize; Tread/Treaddir above 1 KiB use an 11-byte
header buffer plus separate payload pages, Twrite above 1 KiB the request header plus payload
pages; everything split at 4 KiB page boundaries and put behind one INDIRECT descriptor when that
feature was negotiated) and `receive` returns replies in completion order.

The driver side runs in Python over an `mmap` of the memfd; stores are plain memory writes in
program order, which x86-64's ordering makes sufficient for the ring protocol (this is a test
driver, not a production one). It must never be used as the server side.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ninep.protocol.numbers import READ_HEADER, T
from transports.base import Buffer
from transports.virtio import vhost_user as vu
from transports.virtio._ext import drain_eventfd, signal_eventfd

log = logging.getLogger(__name__)

PAGE = 4096
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
ZC_THRESHOLD = 1024  # Linux uses the zero-copy layout for I/O above this many bytes
TREADDIR, TREAD, TWRITE = int(T.Treaddir), int(T.Tread), int(T.Twrite)
TWRITE_HDR = 23
REGION1_GPA = 1 << 32
UVA_BASE = (0x7F00_0000_0000, 0x7F80_0000_0000)


class FrontendError(Exception):
    """The back-end refused the device setup or broke the protocol."""


@dataclass(slots=True)
class Slot:
    index: int
    table: int  # gpa of this slot's indirect table (or first of its direct descriptors)
    out: int  # gpa of the request buffer (msize)
    inb: int  # gpa of the reply buffer (msize + a page for the zero-copy header area)
    segments: list[tuple[int, int]] | None = None  # where the reply will land (gpa, len)


def _pages(gpa: int, length: int) -> list[tuple[int, int]]:
    """Splits [gpa, gpa+length) at page boundaries, as a scatterlist of pages would be."""
    out = []
    while length > 0:
        take = min(length, PAGE - gpa % PAGE)
        out.append((gpa, take))
        gpa += take
        length -= take
    return out


class Frontend:
    """Plays VMM + guest driver for one virtio-9p device served over vhost-user at `path`."""

    def __init__(
        self,
        path: str,
        *,
        queue_size: int = 128,
        msize: int = 512 * 1024,
        slots: int | None = None,
        event_idx: bool = True,
        indirect: bool = True,
        expected_tag: str | None = None,
    ) -> None:
        if queue_size & (queue_size - 1) or not 4 <= queue_size <= 32768:
            raise ValueError("queue size must be a power of two between 4 and 32768")
        self.path = path
        self.num = queue_size
        self.msize = msize
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.expected_tag = expected_tag
        self.in_base = msize // PAGE + 3  # index of the first in descriptor in a slot's table
        per_slot_descs = 2 * self.in_base
        self.reply_capacity = msize
        self._in_tables: dict[tuple[int, int], bytearray] = {}
        self.nslots = slots or min(queue_size if indirect else queue_size // 4, max(8, (128 << 20) // msize))
        if not indirect:
            self.nslots = min(self.nslots, queue_size // 4)
        self.table_bytes = max(16 * per_slot_descs, 64)
        # Region 0: rings and indirect tables. Region 1: request and reply buffers.
        ring_bytes = 16 * queue_size + PAGE + 6 + 2 * queue_size + PAGE + 6 + 8 * queue_size
        r0 = _round(ring_bytes + self.nslots * self.table_bytes + 3 * PAGE, 1 << 21)
        self.slot_bytes = _round(2 * msize + 2 * PAGE, PAGE)
        r1 = _round(self.nslots * self.slot_bytes, 1 << 21)
        self.regions = [(0, r0, UVA_BASE[0], 0), (REGION1_GPA, r1, UVA_BASE[1], r0)]
        self.mem_fd = os.memfd_create("ninep-guest-memory", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, r0 + r1)
        self.mem = mmap.mmap(self.mem_fd, r0 + r1)
        # Ring indices are stored through this view: one 16-bit store, as Linux's virtio_store_mb.
        # struct.pack_into zeroes its target before packing, so the device could read a 0 index.
        self._u16 = memoryview(self.mem).cast("H")
        self.desc = PAGE
        self.avail = _round(self.desc + 16 * queue_size, PAGE)
        self.used = _round(self.avail + 6 + 2 * queue_size, PAGE)
        tables = _round(self.used + 6 + 8 * queue_size, PAGE)
        self.slots = [
            Slot(i, tables + i * self.table_bytes, REGION1_GPA + i * self.slot_bytes, REGION1_GPA + i * self.slot_bytes + msize)
            for i in range(self.nslots)
        ]
        self.free = list(range(self.nslots))
        self.slot_sem = trio.Semaphore(self.nslots)
        self.avail_idx = 0
        self.last_used = 0
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # What `wait_used` sleeps on, as one fd: the call eventfd, the err eventfd (the back-end
        # broke the queue) and the socket's hang-up (the back-end is gone). Either of the last
        # two fails the requests in flight, which would otherwise wait for ever.
        self._watch = select.epoll()
        self._watch.register(self.call_fd, select.EPOLLIN)
        self._watch.register(self.err_fd, select.EPOLLIN)
        #: Why the queue can no longer answer, once it cannot.
        self.broken: str | None = None
        self.sock: trio.socket.SocketType | None = None
        self.features = 0
        self.protocol = 0
        self.tag = ""
        self.kicks = 0
        self.last_head = -1
        self.last_layout: list[tuple[int, int]] = []  # (len, flags) of the last request placed
        self.interrupts = 0
        self._receive_lock = trio.Lock()
        self._closed = False
        self.channel = FrontendChannel(self)

    # -- memory helpers (also used by hostile-driver tests) ---------------------------------
    def offset(self, gpa: int, length: int = 0) -> int:
        for base, size, _, moff in self.regions:
            if base <= gpa and gpa + length <= base + size:
                return moff + gpa - base
        raise ValueError(f"gpa {gpa:#x}+{length} is not guest memory")

    def write(self, gpa: int, data: Buffer) -> None:
        off = self.offset(gpa, len(data))
        self.mem[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        return self.mem[off : off + length]

    def store16(self, gpa: int, value: int) -> None:
        """Stores a little-endian 16-bit ring field at an even `gpa` with a single store."""
        self._u16[self.offset(gpa, 2) // 2] = value if sys.byteorder == "little" else ((value & 0xFF) << 8) | (value >> 8)

    def put_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        DESC.pack_into(self.mem, self.offset(table + 16 * i, 16), addr, length, flags, nxt)

    def publish(self, head: int, *, kick: bool = True) -> None:
        """Adds `head` to the available ring and kicks if the device asked for it."""
        self.last_head = head
        self.store16(self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        old = self.avail_idx
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.store16(self.avail + 2, self.avail_idx)
        if kick and self._needs_kick(old):
            self.kick()

    def kick(self) -> None:
        self.kicks += 1
        signal_eventfd(self.kick_fd)

    def _needs_kick(self, old: int) -> bool:
        if self.features & vu.VIRTIO_RING_F_EVENT_IDX:
            (event,) = struct.unpack_from("<H", self.mem, self.offset(self.used + 4 + 8 * self.num))
            new = self.avail_idx
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        (flags,) = struct.unpack_from("<H", self.mem, self.offset(self.used))
        return not flags & 1

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.mem, self.offset(self.used + 2))[0])

    def pop_used(self) -> tuple[int, int] | None:
        """Next used element (id, len), or None."""
        if self.used_idx() == self.last_used:
            return None
        off = self.offset(self.used + 4 + 8 * (self.last_used % self.num))
        head, length = struct.unpack_from("<II", self.mem, off)
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.features & vu.VIRTIO_RING_F_EVENT_IDX:
            self.store16(self.avail + 4 + 2 * self.num, self.last_used)
        return head, length

    async def wait_used(self) -> tuple[int, int]:
        while True:
            got = self.pop_used()
            if got is not None:
                return got
            if self._closed:
                raise trio.ClosedResourceError("frontend closed")
            if self.broken is not None:
                raise FrontendError(self.broken)
            await trio.lowlevel.wait_readable(self._watch.fileno())
            for fd, _ in self._watch.poll(0):
                if fd == self.call_fd:
                    if drain_eventfd(self.call_fd):
                        self.interrupts += 1
                elif fd == self.err_fd:
                    self.broken = "the back-end reported the queue broken"
                else:  # the socket: only its hang-up is watched
                    self.broken = "the back-end closed the vhost-user connection"
            if self.broken is not None:
                log.warning("vhost-user:%s: %s; requests in flight fail", self.path, self.broken)

    # -- vhost-user (the VMM part) ----------------------------------------------------------
    async def request(self, req: int, payload: bytes = b"", fds: list[int] | None = None, *, ack: bool = True) -> bytes | None:
        assert self.sock is not None
        has_reply = req in (
            vu.Req.GET_FEATURES,
            vu.Req.GET_PROTOCOL_FEATURES,
            vu.Req.GET_QUEUE_NUM,
            vu.Req.GET_VRING_BASE,
            vu.Req.GET_CONFIG,
        )
        want_ack = ack and not has_reply and bool(self.protocol & vu.PROTOCOL_F_REPLY_ACK)
        await vu.send_message(self.sock, req, payload, flags=vu.FLAG_NEED_REPLY if want_ack else 0, fds=fds)
        if not (has_reply or want_ack):
            return None
        msg = await vu.recv_message(self.sock)
        if msg is None:
            raise FrontendError(f"back-end closed the connection after {vu.Req(req).name}")
        msg.close_fds()
        if msg.request != req or not msg.flags & vu.FLAG_REPLY:
            raise FrontendError(f"unexpected reply {msg.name()} to {vu.Req(req).name}")
        if want_ack:
            if msg.payload != vu.U64.pack(0):
                raise FrontendError(f"back-end refused {vu.Req(req).name}")
            return None
        return msg.payload

    async def _get_u64(self, req: int) -> int:
        payload = await self.request(req)
        if payload is None or len(payload) != 8:
            raise FrontendError(f"bad reply to {vu.Req(req).name}")
        return int(vu.U64.unpack(payload)[0])

    async def connect(self) -> FrontendChannel:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._watch.register(sock.fileno(), select.EPOLLRDHUP)
        await self.handshake()
        return self.channel

    async def handshake(self) -> None:
        """The sequence QEMU 11 sends for vhost-user-test-device-pci, up to a running queue."""
        offered = await self._get_u64(vu.Req.GET_FEATURES)
        if not offered & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            raise FrontendError("back-end does not offer protocol features")
        proto = await self._get_u64(vu.Req.GET_PROTOCOL_FEATURES)
        want = vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIG
        if proto & want != want:
            raise FrontendError(f"back-end protocol features {proto:#x} lack MQ/REPLY_ACK/CONFIG")
        await self.request(vu.Req.SET_PROTOCOL_FEATURES, vu.U64.pack(want))
        self.protocol = want
        if await self._get_u64(vu.Req.GET_QUEUE_NUM) < 1:
            raise FrontendError("back-end has no queue")
        await self.request(vu.Req.SET_OWNER)
        offered = await self._get_u64(vu.Req.GET_FEATURES)
        await self.request(vu.Req.SET_VRING_CALL, vu.U64.pack(0), [self.call_fd])
        await self.request(vu.Req.SET_VRING_ERR, vu.U64.pack(0), [self.err_fd])
        # The driver probes: reads the config space (the mount tag).
        config = await self.request(vu.Req.GET_CONFIG, vu.CONFIG_HEADER.pack(0, 64, 0) + bytes(64))
        if config is None or len(config) != 12 + 64:
            raise FrontendError("GET_CONFIG failed")
        (tag_len,) = struct.unpack_from("<H", config, 12)
        self.tag = config[14 : 14 + tag_len].decode(errors="replace")
        if self.expected_tag is not None and self.tag != self.expected_tag:
            raise FrontendError(f"device has mount tag {self.tag!r}, expected {self.expected_tag!r}")
        if not offered & vu.VIRTIO_9P_MOUNT_TAG or not offered & vu.VIRTIO_F_VERSION_1:
            raise FrontendError("device lacks MOUNT_TAG or VERSION_1 (Linux would refuse it)")
        features = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES | vu.VIRTIO_9P_MOUNT_TAG
        if self.want_event_idx:
            features |= offered & vu.VIRTIO_RING_F_EVENT_IDX
        if self.want_indirect:
            features |= offered & vu.VIRTIO_RING_F_INDIRECT_DESC
        self.features = features
        if not features & vu.VIRTIO_RING_F_INDIRECT_DESC:
            self.nslots = min(self.nslots, self.num // 4)
            self.free = list(range(self.nslots))
            self.slot_sem = trio.Semaphore(self.nslots)
        # The driver is ready.
        await self.request(vu.Req.SET_FEATURES, vu.U64.pack(features))
        await self.set_mem_table()
        await self.request(vu.Req.SET_VRING_NUM, vu.VRING_STATE.pack(0, self.num))
        await self.request(vu.Req.SET_VRING_BASE, vu.VRING_STATE.pack(0, self.avail_idx))
        await self.request(vu.Req.SET_VRING_ADDR, self.vring_addr())
        await self.request(vu.Req.SET_VRING_KICK, vu.U64.pack(0), [self.kick_fd])
        await self.request(vu.Req.SET_VRING_CALL, vu.U64.pack(0), [self.call_fd])
        await self.request(vu.Req.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1))

    def vring_addr(self) -> bytes:
        uva = self.uva_of
        return vu.VRING_ADDR.pack(0, 0, uva(self.desc), uva(self.used), uva(self.avail), 0)

    def uva_of(self, gpa: int) -> int:
        for base, size, uva, _ in self.regions:
            if base <= gpa < base + size:
                return uva + gpa - base
        raise ValueError(f"gpa {gpa:#x} is not guest memory")

    def mem_table_payload(self) -> bytes:
        payload = vu.MEM_HEADER.pack(len(self.regions), 0)
        for gpa, size, uva, moff in self.regions:
            payload += vu.MEM_REGION.pack(gpa, size, uva, moff)
        return payload

    async def set_mem_table(self) -> None:
        await self.request(vu.Req.SET_MEM_TABLE, self.mem_table_payload(), [self.mem_fd] * len(self.regions))

    async def stop(self) -> int:
        """What QEMU does at guest poweroff: disable the ring and fetch its base."""
        await self.request(vu.Req.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 0))
        payload = await self.request(vu.Req.GET_VRING_BASE, vu.VRING_STATE.pack(0, 0))
        if payload is None or len(payload) != 8:
            raise FrontendError("GET_VRING_BASE failed")
        return int(vu.VRING_STATE.unpack(payload)[1])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.sock is not None:
            try:
                with trio.move_on_after(5):
                    await self.stop()
            except (OSError, FrontendError, trio.BrokenResourceError):
                pass
            self.sock.close()
            self.sock = None
        trio.lowlevel.notify_closing(self._watch.fileno())
        self._watch.close()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self._u16.release()
        self.mem.close()
        os.close(self.mem_fd)

    # -- the driver part: placing requests ---------------------------------------------------
    def place(self, slot: Slot, message: bytes | bytearray | memoryview) -> int:
        """Writes a request into `slot` the way Linux lays it out; returns the head index."""
        msg = memoryview(message)
        size = len(msg)
        mtype = msg[4]
        out: list[tuple[int, int]]
        inn: list[tuple[int, int]]
        zc_count = struct.unpack_from("<I", msg, 19)[0] if size >= 23 and mtype in (TREAD, TREADDIR, TWRITE) else 0
        capacity = self.reply_capacity
        normal_reply = False
        if mtype in (TREAD, TREADDIR) and zc_count > ZC_THRESHOLD:
            self.write(slot.out, msg)
            count = min(zc_count, capacity - READ_HEADER)
            out = _pages(slot.out, size)
            payload = slot.inb + PAGE  # user pages, apart from the header area
            inn = [(slot.inb, READ_HEADER)] + _pages(payload, count)
        elif mtype == TWRITE and zc_count > ZC_THRESHOLD and size > TWRITE_HDR:
            self.write(slot.out, msg[:TWRITE_HDR])
            data = slot.out + PAGE
            self.write(data, msg[TWRITE_HDR:])
            out = [(slot.out, TWRITE_HDR)] + _pages(data, size - TWRITE_HDR)
            inn = _pages(slot.inb, PAGE)
        else:
            self.write(slot.out, msg)
            out = _pages(slot.out, size)
            inn = _pages(slot.inb, capacity)
            normal_reply = True
        slot.segments = inn
        self.last_layout = [(n, 0) for _, n in out] + [(n, F_WRITE) for _, n in inn]
        if self.features & vu.VIRTIO_RING_F_INDIRECT_DESC:
            # The chain runs through the out descriptors (from index 0), then jumps to the in
            # descriptors at a fixed index, so a slot's usual reply area is laid out only once.
            in_base = self.in_base
            table = bytearray(16 * len(out))
            for i, (a, n) in enumerate(out):
                DESC.pack_into(table, 16 * i, a, n, F_NEXT, i + 1 if i + 1 < len(out) else in_base)
            self.write(slot.table, table)
            key = (slot.index, capacity)
            in_table = self._in_tables.get(key) if normal_reply else None
            if in_table is None:
                in_table = bytearray(16 * len(inn))
                for i, (a, n) in enumerate(inn):
                    last = i + 1 == len(inn)
                    DESC.pack_into(in_table, 16 * i, a, n, F_WRITE | (0 if last else F_NEXT), 0 if last else in_base + i + 1)
                if normal_reply:
                    self._in_tables[key] = in_table
            self.write(slot.table + 16 * in_base, in_table)
            self.put_desc(self.desc, slot.index, slot.table, 16 * (in_base + len(inn)), F_INDIRECT)
            return slot.index
        descs = [(a, n, 0) for a, n in out] + [(a, n, F_WRITE) for a, n in inn]
        # Direct: 4 descriptors per slot, so merge page splits back into contiguous runs.
        descs = _merge(descs)
        if len(descs) > 4:
            raise ValueError("request layout needs more than 4 direct descriptors")
        base = 4 * slot.index
        for i, (a, n, f) in enumerate(descs):
            last = i == len(descs) - 1
            self.put_desc(self.desc, base + i, a, n, f | (0 if last else F_NEXT), 0 if last else base + i + 1)
        return base

    def collect(self, slot: Slot, length: int) -> bytes:
        """The reply bytes: the first `length` bytes of the slot's writable stream."""
        chunks = []
        runs = [(a, n) for a, n, _ in _merge([(a, n, 0) for a, n in slot.segments or []])]
        for gpa, n in runs:
            if length <= 0:
                break
            take = min(n, length)
            chunks.append(self.read(gpa, take))
            length -= take
        return b"".join(chunks)

    def slot_of_head(self, head: int) -> Slot:
        index = head if self.features & vu.VIRTIO_RING_F_INDIRECT_DESC else head // 4
        return self.slots[index]


def _merge(descs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for a, n, f in descs:
        if merged and merged[-1][2] == f and merged[-1][0] + merged[-1][1] == a:
            pa, pn, _ = merged[-1]
            merged[-1] = (pa, pn + n, f)
        else:
            merged.append((a, n, f))
    return merged


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class FrontendChannel:
    """The client side of the Frontend's queue: a `Channel` for `ninep.client`."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.max_message_size = frontend.msize
        self.peer = f"vhost-user:{frontend.path}"
        self._msize = frontend.msize
        self._send_lock = trio.Lock()

    async def send(self, parts: Sequence[Buffer]) -> None:
        fe = self.frontend
        message = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
        if len(message) > self._msize:
            raise ValueError(f"message of {len(message)} bytes exceeds msize {self._msize}")
        await fe.slot_sem.acquire()
        slot = fe.slots[fe.free.pop()]
        try:
            head = fe.place(slot, message)
        except BaseException:
            fe.free.append(slot.index)
            fe.slot_sem.release()
            raise
        fe.publish(head)

    async def receive(self) -> memoryview:
        fe = self.frontend
        while True:
            async with fe._receive_lock:
                try:
                    head, length = await fe.wait_used()
                except (trio.ClosedResourceError, OSError, FrontendError):
                    raise trio.EndOfChannel from None
            slot = fe.slot_of_head(head)
            data = fe.collect(slot, length)
            fe.free.append(slot.index)
            fe.slot_sem.release()
            if length:
                return memoryview(data)
            # A flushed request's buffers came back empty: nothing to deliver.

    def set_msize(self, msize: int) -> None:
        self._msize = min(msize, self.max_message_size)
        self.frontend.reply_capacity = self._msize

    async def aclose(self) -> None:
        await self.frontend.aclose()


async def connect(path: str, *, msize: int = 512 * 1024, **kwargs: object) -> FrontendChannel:
    frontend = Frontend(path, msize=msize, **kwargs)  # type: ignore[arg-type]
    try:
        return await frontend.connect()
    except BaseException:
        await frontend.aclose()
        raise


__all__ = ["Frontend", "FrontendChannel", "FrontendError", "connect"]
