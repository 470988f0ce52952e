"""The vhost-user back-end of a virtio-9p device: a unix-socket server that a VMM (QEMU's
`vhost-user-test-device-pci,virtio-id=9`, or `transports.virtio.frontend`) connects to.

Per connection one `Device` follows the VMM's messages: features, memory table (the guest memory
fds are mmapped by `MemTable`), vring configuration and eventfds. When a ring has memory,
addresses, a kick fd and is enabled, it starts: a `QueueChannel` is handed to the server's
handler, whose `receive` pops the ring itself and waits on the kick eventfd with trio only when
the ring is empty (no thread, and no task, per queue). GET_VRING_BASE, RESET_OWNER, a broken ring or a disconnect stop it again; the next
start (guest reboot, VMM reconnect) gets a fresh channel and so a fresh 9P session.

Everything the VMM sends is checked; a malformed message is logged and refused (REPLY_ACK
failure or an empty reply), never allowed to crash the server. This module must never touch
guest memory itself: all ring access goes through the compiled `transports._ring`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from transports.base import ChannelHandler
from transports.options import DirectIOPolicy
from transports.virtio import vhost_user as vu
from transports.virtio._ext import MemTable, VirtqError, VirtQueue, signal_eventfd
from transports.virtio.channel import QueueChannel, split_args
from transports.virtio.polling import AdaptivePoll, default_max_us

log = logging.getLogger(__name__)

NUM_QUEUES = 1
MAX_QUEUE_SIZE = 1024
MAX_TAG_LEN = 31  # as QEMU: the tag must fit its 32-byte buffer with a NUL
CONFIG_SPACE = 64

OFFERED_FEATURES = (
    vu.VIRTIO_F_VERSION_1
    | vu.VHOST_USER_F_PROTOCOL_FEATURES
    | vu.VIRTIO_9P_MOUNT_TAG
    | vu.VIRTIO_RING_F_EVENT_IDX
    | vu.VIRTIO_RING_F_INDIRECT_DESC
)
OFFERED_PROTOCOL = vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIG

#: Requests whose answer is a reply of their own (REPLY_ACK does not add another).
HAS_REPLY = {
    vu.Req.GET_FEATURES,
    vu.Req.GET_PROTOCOL_FEATURES,
    vu.Req.GET_QUEUE_NUM,
    vu.Req.GET_VRING_BASE,
    vu.Req.GET_CONFIG,
}


class Refused(Exception):
    """The message is well framed but not acceptable; it is logged and answered as a failure."""


def config_space(tag: str) -> bytes:
    """The virtio-9p config: le16 tag_len, tag bytes (no NUL), zero padding."""
    raw = tag.encode()
    return (struct.pack("<H", len(raw)) + raw).ljust(CONFIG_SPACE, b"\0")


def check_tag(tag: str) -> str:
    raw = tag.encode()
    if not raw or len(raw) > MAX_TAG_LEN:
        raise ValueError(f"mount tag must be 1..{MAX_TAG_LEN} bytes, got {tag!r}")
    return tag


def _close(fd: int | None) -> None:
    if fd is not None:
        trio.lowlevel.notify_closing(fd)  # wakes a task waiting on it (a no-op otherwise)
        os.close(fd)


@dataclass
class Vring:
    index: int
    num: int = 0
    base: int = 0
    desc: int = 0
    used: int = 0
    avail: int = 0
    has_addr: bool = False
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    queue: VirtQueue | None = None
    channel: QueueChannel | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"notifications": 0})

    def notify(self) -> None:
        if self.call is not None:
            signal_eventfd(self.call)
            self.stats["notifications"] += 1
            # The VMM thread that turns the call into an interrupt may have been woken on this
            # CPU: let it run now rather than after the rest of this request's bookkeeping and
            # the next spin (measured: ~50 µs of the guest's wait per request otherwise).
            os.sched_yield()


class Device:
    """The state of one virtio-9p device as configured by one VMM connection."""

    def __init__(
        self,
        tag: str,
        max_msize: int,
        handler: ChannelHandler,
        nursery: trio.Nursery,
        peer: str,
        poll_max_us: int = 0,
        direct_io: DirectIOPolicy | None = None,
    ) -> None:
        self.config = config_space(tag)
        self.poll_max_ns = poll_max_us * 1000
        self.direct_io = direct_io
        self.max_msize = max_msize
        self.handler = handler
        self.nursery = nursery
        self.peer = peer
        self.features = 0
        self.protocol = 0
        self.owner = False
        self.mem: MemTable | None = None
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        self.starts = 0

    # -- message dispatch ------------------------------------------------------------------
    async def handle(self, sock: trio.socket.SocketType, msg: vu.Message) -> None:
        name = msg.name()
        method: Callable[[vu.Message], bytes | None] | None = getattr(self, "_" + name.lower(), None)
        reply: bytes | None = None
        ok = True
        try:
            if method is None:
                raise Refused("not supported")
            reply = method(msg)
        except (Refused, ValueError, struct.error, OSError, VirtqError) as exc:
            log.warning("vhost-user %s: %s refused: %s", self.peer, name, exc)
            ok = False
        except Exception:  # a bug here must cost one message, not the device
            log.exception("vhost-user %s: %s failed", self.peer, name)
            ok = False
        finally:
            msg.close_fds()  # whatever a handler did not take
        if msg.request in HAS_REPLY:
            await vu.send_message(sock, msg.request, reply if ok and reply is not None else b"", flags=vu.FLAG_REPLY)
        elif msg.need_reply and self.protocol & vu.PROTOCOL_F_REPLY_ACK:
            await vu.send_message(sock, msg.request, vu.U64.pack(0 if ok else 1), flags=vu.FLAG_REPLY)

    @staticmethod
    def _u64(msg: vu.Message) -> int:
        if len(msg.payload) != 8:
            raise Refused(f"payload of {len(msg.payload)} bytes, expected 8")
        value: int = vu.U64.unpack(msg.payload)[0]
        return value

    def _vring(self, index: int) -> Vring:
        if index >= NUM_QUEUES:
            raise Refused(f"queue {index} does not exist (the device has {NUM_QUEUES})")
        return self.vrings[index]

    def _state(self, msg: vu.Message) -> tuple[Vring, int]:
        if len(msg.payload) != vu.VRING_STATE.size:
            raise Refused(f"vring state of {len(msg.payload)} bytes")
        index, num = vu.VRING_STATE.unpack(msg.payload)
        return self._vring(index), num

    # -- features and ownership -------------------------------------------------------------
    def _get_features(self, msg: vu.Message) -> bytes:
        return vu.U64.pack(OFFERED_FEATURES)

    def _set_features(self, msg: vu.Message) -> None:
        value = self._u64(msg)
        if value & ~OFFERED_FEATURES:
            raise Refused(f"features {value & ~OFFERED_FEATURES:#x} were not offered")
        if not value & vu.VIRTIO_F_VERSION_1:
            raise Refused("legacy (pre-VERSION_1) drivers are not supported")
        self.features = value
        log.info("vhost-user %s: features %#x", self.peer, value)

    def _get_protocol_features(self, msg: vu.Message) -> bytes:
        return vu.U64.pack(OFFERED_PROTOCOL)

    def _set_protocol_features(self, msg: vu.Message) -> None:
        value = self._u64(msg)
        if value & ~OFFERED_PROTOCOL:
            raise Refused(f"protocol features {value & ~OFFERED_PROTOCOL:#x} were not offered")
        self.protocol = value

    def _get_queue_num(self, msg: vu.Message) -> bytes:
        return vu.U64.pack(NUM_QUEUES)

    def _set_owner(self, msg: vu.Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: vu.Message) -> None:
        self.reset()

    def reset(self) -> None:
        for vr in self.vrings:
            self._stop(vr)
            _close(vr.kick)
            _close(vr.call)
            _close(vr.err)
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        self.features = 0
        self.owner = False
        self.mem = None

    # -- config space -----------------------------------------------------------------------
    def _get_config(self, msg: vu.Message) -> bytes:
        if len(msg.payload) < vu.CONFIG_HEADER.size:
            raise Refused("short config request")
        offset, size, flags = vu.CONFIG_HEADER.unpack_from(msg.payload)
        if size > vu.MAX_CONFIG_SIZE or offset > vu.MAX_CONFIG_SIZE or offset + size > vu.MAX_CONFIG_SIZE:
            raise Refused(f"config range {offset}+{size} out of bounds")
        data = self.config[offset : offset + size].ljust(size, b"\0")
        return vu.CONFIG_HEADER.pack(offset, size, flags) + data

    def _set_config(self, msg: vu.Message) -> None:
        raise Refused("the virtio-9p config space is read-only")

    # -- memory -----------------------------------------------------------------------------
    def _set_mem_table(self, msg: vu.Message) -> None:
        if len(msg.payload) < vu.MEM_HEADER.size:
            raise Refused("short memory table")
        count, _ = vu.MEM_HEADER.unpack_from(msg.payload)
        if count < 1 or count > 32 or len(msg.payload) < vu.MEM_HEADER.size + count * vu.MEM_REGION.size:
            raise Refused(f"memory table with {count} regions in {len(msg.payload)} bytes")
        if len(msg.fds) != count:
            raise Refused(f"{count} regions but {len(msg.fds)} fds")
        regions = []
        for i in range(count):
            gpa, size, uva, offset = vu.MEM_REGION.unpack_from(msg.payload, vu.MEM_HEADER.size + i * vu.MEM_REGION.size)
            regions.append((msg.fds[i], gpa, size, uva, offset))
        mem = MemTable(regions)  # maps; the fds are closed by handle() afterwards
        self.mem = mem
        for vr in self.vrings:
            if vr.queue is not None:
                try:
                    vr.queue.remap(mem, vr.desc, vr.avail, vr.used)
                except VirtqError as exc:
                    log.warning("vhost-user %s: queue %d after memory change: %s", self.peer, vr.index, exc)
                    self._stop(vr, broken=True)

    def _set_log_base(self, msg: vu.Message) -> None:
        raise Refused("dirty logging (migration) is not supported")

    # -- vrings -----------------------------------------------------------------------------
    def _set_vring_num(self, msg: vu.Message) -> None:
        vr, num = self._state(msg)
        if num < 1 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise Refused(f"queue size {num} is not a power of two up to {MAX_QUEUE_SIZE}")
        if vr.queue is not None:
            raise Refused("queue size change while the ring runs")
        vr.num = num

    def _set_vring_base(self, msg: vu.Message) -> None:
        vr, base = self._state(msg)
        if base > 0xFFFF:
            raise Refused(f"ring base {base} does not fit 16 bits")
        if vr.queue is not None:
            raise Refused("ring base change while the ring runs")
        vr.base = base

    def _set_vring_addr(self, msg: vu.Message) -> None:
        if len(msg.payload) != vu.VRING_ADDR.size:
            raise Refused(f"vring address of {len(msg.payload)} bytes")
        index, _flags, desc, used, avail, _log = vu.VRING_ADDR.unpack(msg.payload)
        vr = self._vring(index)
        vr.desc, vr.used, vr.avail, vr.has_addr = desc, used, avail, True
        if vr.queue is not None and self.mem is not None:
            try:
                vr.queue.remap(self.mem, desc, avail, used)
            except VirtqError as exc:
                self._stop(vr, broken=True)
                raise Refused(str(exc)) from None
        self._maybe_start(vr)

    def _vring_fd(self, msg: vu.Message) -> tuple[Vring, int | None]:
        value = self._u64(msg)
        vr = self._vring(value & vu.VRING_INDEX_MASK)
        if value & ~(vu.VRING_INDEX_MASK | vu.VRING_NOFD):
            raise Refused(f"unknown bits in {value:#x}")
        if value & vu.VRING_NOFD:
            return vr, None
        fd = msg.take_fd()
        if fd is None:
            raise Refused("no file descriptor came with the message")
        os.set_blocking(fd, False)
        return vr, fd

    def _set_vring_kick(self, msg: vu.Message) -> None:
        vr, fd = self._vring_fd(msg)
        if fd is None:
            raise Refused("polling mode (no kick fd) is not supported")
        old, vr.kick = vr.kick, fd
        _close(old)  # a running channel waiting on it wakes up and waits on the new one
        if not self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            vr.enabled = True  # without protocol features a ring starts on its kick fd
        if vr.queue is not None:
            signal_eventfd(fd)  # look at the ring again: a kick may have gone to the old fd
        self._maybe_start(vr)

    def _set_vring_call(self, msg: vu.Message) -> None:
        vr, fd = self._vring_fd(msg)
        old, vr.call = vr.call, fd
        if vr.queue is not None:
            vr.queue.set_call(-1 if fd is None else fd)  # direct I/O interrupts through it too
        _close(old)

    def _set_vring_err(self, msg: vu.Message) -> None:
        vr, fd = self._vring_fd(msg)
        old, vr.err = vr.err, fd
        _close(old)

    def _set_vring_enable(self, msg: vu.Message) -> None:
        vr, enable = self._state(msg)
        if enable not in (0, 1):
            raise Refused(f"enable value {enable}")
        vr.enabled = bool(enable)
        if vr.enabled:
            if vr.queue is not None and vr.kick is not None:
                signal_eventfd(vr.kick)  # look at the ring again
            self._maybe_start(vr)

    def _get_vring_base(self, msg: vu.Message) -> bytes:
        vr, _ = self._state(msg)
        base = self._stop(vr)
        _close(vr.kick)
        vr.kick = None
        vr.enabled = False
        return vu.VRING_STATE.pack(vr.index, base)

    # -- running a ring ---------------------------------------------------------------------
    def _maybe_start(self, vr: Vring) -> None:
        if vr.queue is not None or not (vr.enabled and vr.kick is not None and vr.has_addr and vr.num):
            return
        if self.mem is None:
            return
        # The latency histogram's size is the metrics' (through the policy); without direct I/O
        # the queue never serves a request, so one bucket that stays empty will do.
        buckets = 1 if self.direct_io is None else self.direct_io.latency_buckets
        try:
            queue = VirtQueue(
                self.mem,
                vr.num,
                vr.desc,
                vr.avail,
                vr.used,
                event_idx=bool(self.features & vu.VIRTIO_RING_F_EVENT_IDX),
                indirect=bool(self.features & vu.VIRTIO_RING_F_INDIRECT_DESC),
                last_avail=vr.base,
                max_request=self.max_msize,
                buckets=buckets,
            )
        except (VirtqError, ValueError) as exc:
            log.warning("vhost-user %s: queue %d cannot start: %s", self.peer, vr.index, exc)
            self._signal_error(vr)
            return
        queue.set_split(*split_args())  # large Twrite data stays in guest memory (zero-copy)
        queue.set_call(-1 if vr.call is None else vr.call)
        if self.direct_io is not None:
            queue.set_write_guard(round(self.direct_io.write_slow * 1e9), round(self.direct_io.write_backoff * 1e9))
        self.starts += 1
        vr.queue = queue
        vr.channel = QueueChannel(
            f"vhost-user:{self.peer}#{self.starts}", self.max_msize, vr.notify, queue, vr,
            lambda reason: self._stop(vr, broken=True), AdaptivePoll(self.poll_max_ns),
            direct=self.direct_io is not None,
        )
        log.info("vhost-user %s: queue %d started (size %d)", self.peer, vr.index, vr.num)
        self.nursery.start_soon(self._run_handler, vr.channel)

    async def _run_handler(self, channel: QueueChannel) -> None:
        try:
            await self.handler(channel)
        except Exception:
            log.exception("vhost-user %s: handler of %s failed", self.peer, channel.peer)
        finally:
            channel.close()

    def _stop(self, vr: Vring, broken: bool = False) -> int:
        """Stops a running ring; returns the index the next start continues from."""
        if vr.queue is not None:
            vr.base = vr.queue.stop()
            vr.queue = None
            if broken:
                self._signal_error(vr)
        if vr.channel is not None:
            vr.channel.close()
            vr.channel = None
        return vr.base

    def _signal_error(self, vr: Vring) -> None:
        if vr.err is not None:
            signal_eventfd(vr.err)

    def close(self) -> None:
        self.reset()


class VhostUserListener:
    """`vhost-user:SOCK`: listens on a unix socket; every VMM connection is one device."""

    def __init__(self, address: str, path: str, tag: str, max_msize: int, poll_us: int | None = None,
                 direct_io: DirectIOPolicy | None = None) -> None:
        self.address = address
        self.direct_io = direct_io
        self.path = path
        self.tag = check_tag(tag)
        self.max_msize = max_msize
        self.poll_us = default_max_us() if poll_us is None else poll_us
        self.devices: list[Device] = []

    async def serve(
        self,
        handler: ChannelHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            if os.path.exists(self.path) and _is_socket(self.path):
                os.unlink(self.path)  # a stale socket from an earlier run
            await sock.bind(self.path)
            sock.listen(128)  # several VMMs (or test frontends) may connect at once
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    while True:
                        conn, _ = await sock.accept()
                        nursery.start_soon(self._guarded_connection, conn, handler)
            finally:
                if _is_socket(self.path):
                    os.unlink(self.path)

    async def _guarded_connection(self, conn: trio.socket.SocketType, handler: ChannelHandler) -> None:
        try:
            await self._serve_connection(conn, handler)
        except Exception:
            log.exception("vhost-user %s: connection failed", self.path)

    async def _serve_connection(self, conn: trio.socket.SocketType, handler: ChannelHandler) -> None:
        peer = f"{self.path}"
        with conn:
            async with trio.open_nursery() as nursery:
                device = Device(self.tag, self.max_msize, handler, nursery, peer, self.poll_us, self.direct_io)
                self.devices.append(device)
                log.info("vhost-user %s: VMM connected", peer)
                try:
                    while True:
                        msg = await vu.recv_message(conn)
                        if msg is None:
                            break
                        await device.handle(conn, msg)
                except vu.ProtocolError as exc:
                    log.warning("vhost-user %s: dropping the connection: %s", peer, exc)
                except OSError as exc:
                    log.warning("vhost-user %s: connection error: %s", peer, exc)
                finally:
                    log.info("vhost-user %s: VMM disconnected", peer)
                    device.close()
                    self.devices.remove(device)
                    # Handlers see their channel end; give them a moment to clean up.
                    nursery.cancel_scope.deadline = trio.current_time() + 10


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
