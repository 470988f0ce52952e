"""The vhost-user wire format: message numbers, flags, payload layouts and framed I/O with fds.

A message is `u32 request, u32 flags, u32 size` (little-endian) followed by `size` payload bytes;
file descriptors travel as SCM_RIGHTS ancillary data with the message. Both ends of ninep's
vhost-user support (the back-end in `transports.virtio.backend`, the test VMM in
`transports.virtio.frontend`) use this module.

This module must never interpret a message beyond its framing, and never keep an fd it received:
every fd belongs to the `Message` that carries it until the consumer takes or closes it.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

HEADER = struct.Struct("<III")
#: No vhost-user message a device of ours accepts is larger than this (GET_CONFIG: 12 + 256).
MAX_PAYLOAD = 4096
MAX_FDS = 32

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25


# Virtio feature bits (device-independent ones from the virtio spec, 9P's bit 0 from Linux).
VIRTIO_9P_MOUNT_TAG = 1 << 0
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32

# Protocol feature bits.
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9

VRING_NOFD = 1 << 8
VRING_INDEX_MASK = 0xFF

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEM_HEADER = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
MAX_CONFIG_SIZE = 256


class ProtocolError(Exception):
    """The connection's framing can no longer be trusted (or the peer closed mid-message)."""


@dataclass(slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fd(self) -> int | None:
        """Takes ownership of the first remaining fd (None if none came)."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def name(self) -> str:
        try:
            return Req(self.request).name
        except ValueError:
            return f"request {self.request}"


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
            into.extend(fds)


async def _recv_exact(sock: trio.socket.SocketType, n: int, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        data, ancdata, msg_flags, _ = await sock.recvmsg(n - got, socket.CMSG_SPACE(MAX_FDS * 4))
        _fds_from_ancillary(ancdata, fds)
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors in one message")
        if not data:
            if got == 0 and not chunks:
                return b""
            raise ProtocolError("peer closed the connection in the middle of a message")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


async def recv_message(sock: trio.socket.SocketType) -> Message | None:
    """Reads one message; None on a clean end of stream. Raises ProtocolError on bad framing
    (any fds received with the broken message are closed)."""
    fds: list[int] = []
    try:
        head = await _recv_exact(sock, HEADER.size, fds)
        if not head:
            return None
        request, flags, size = HEADER.unpack(head)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"message {request} declares a {size}-byte payload")
        payload = await _recv_exact(sock, size, fds) if size else b""
        if size and not payload:
            raise ProtocolError("peer closed the connection in the middle of a message")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


async def send_message(
    sock: trio.socket.SocketType,
    request: int,
    payload: bytes = b"",
    *,
    flags: int = 0,
    fds: list[int] | None = None,
) -> None:
    """Writes one message (the caller keeps ownership of `fds`)."""
    data = HEADER.pack(request, VERSION | flags, len(payload)) + payload
    ancdata = []
    if fds:
        ancdata.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    sent = await sock.sendmsg([data], ancdata)
    view = memoryview(data)[sent:]
    while view:
        n = await sock.send(view)
        view = view[n:]
