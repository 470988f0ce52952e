"""Byte-stream transports: TCP, unix sockets and inherited fd pairs, framed by the 9P size field.

`tcp:HOST:PORT` and `unix:PATH` listen (server) or connect (client); `fd:RFD,WFD` wraps one
already-connected pair of fds (what QEMU chardevs and Linux `trans=fd` use; `fd:0,1` is
stdin/stdout), served as a single connection. The addresses are parsed, and TLS put on TCP, by
`transports.sockets`: this module knows neither addresses nor TLS.

Framing: every message starts with its little-endian u32 size, which counts itself. A size below 7
or above the negotiated msize means the stream can no longer be trusted: `FramingError`, and the
server drops the connection. This module must never interpret anything past the 7-byte header.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from transports.base import Buffer, Channel, ChannelHandler, FramingError

log = logging.getLogger("ninep.transport")

_SIZE = struct.Struct("<I")
#: Linux's fd/tcp transports cap msize at 1 MiB (MAX_SOCK_BUF); we allow the server's hard cap.
STREAM_MAX_MESSAGE = 4 * 1024 * 1024
_RECV_CHUNK = 256 * 1024
#: Reads in a row that found data at once before a receive yields to the scheduler anyway.
_YIELD_EVERY = 16


class _Framer:
    """Splits a byte stream into whole messages. `fill(n)` must append at least one byte or raise
    EndOfChannel."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.pos = 0

    def set_limit(self, limit: int) -> None:
        self.limit = limit

    async def receive(
        self,
        read: Callable[[], Awaitable[bytes]],
        read_large: Callable[[int], Awaitable[memoryview]] | None = None,
    ) -> memoryview:
        """The next whole message, reading more with `read()` (b"" at end of stream) as needed;
        a message larger than a read chunk goes to `read_large(size)` when given."""
        while True:
            msg = self.take()
            if msg is not None:
                return msg
            pending = len(self.buf) - self.pos
            if read_large is not None and pending >= 4:
                (need,) = _SIZE.unpack_from(self.buf, self.pos)
                if need > _RECV_CHUNK:
                    return await read_large(need)
            data = await read()
            if not data:
                if pending:
                    raise FramingError("stream closed in the middle of a message")
                raise trio.EndOfChannel
            self.buf += data

    def take(self) -> memoryview | None:
        """A whole message out of the buffer, copied (private), or None if not all there yet."""
        avail = len(self.buf) - self.pos
        if avail < 4:
            return None
        (size,) = _SIZE.unpack_from(self.buf, self.pos)
        if size < 7 or size > self.limit:
            raise FramingError(f"message size {size} outside 7..{self.limit}")
        if avail < size:
            return None
        with memoryview(self.buf) as whole:  # one copy out; the view is released before resizing
            msg = memoryview(bytes(whole[self.pos:self.pos + size]))
        self.pos += size
        if self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos > 1 << 20:
            del self.buf[:self.pos]
            self.pos = 0
        return msg


def grow_send_buffer(sock: trio.socket.SocketType, size: int) -> None:
    """Lets a whole large reply fit in the socket buffer, so a 1 MiB Rread goes out in one
    sendmsg instead of a dozen waits (root may exceed wmem_max with SO_SNDBUFFORCE)."""
    for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            return
        except OSError:
            continue


class SocketChannel:
    """A Channel over a connected trio socket (TCP or unix), usable by server and client."""

    def __init__(self, sock: trio.socket.SocketType, peer: str, max_message_size: int = STREAM_MAX_MESSAGE) -> None:
        grow_send_buffer(sock, min(max_message_size, 2 * 1024 * 1024) + 64 * 1024)
        self.sock = sock
        self.peer = peer
        self.max_message_size = max_message_size
        self._framer = _Framer(max_message_size)
        self._send_lock = trio.Lock()
        self._closed = False
        self._direct_reads = 0  # reads in a row that found data without waiting

    def set_msize(self, msize: int) -> None:
        self._framer.set_limit(msize)

    async def receive(self) -> memoryview:
        return await self._framer.receive(self._recv, self._receive_large)

    async def _recv(self) -> bytes:
        # Straight to the (non-blocking) socket first: when a request is already waiting, as it
        # usually is, it costs no trip through the scheduler; wait only when there is nothing.
        while True:
            try:
                data = os.read(self.sock.fileno(), _RECV_CHUNK)
            except BlockingIOError:
                pass
            except OSError as e:
                raise trio.EndOfChannel(str(e)) from None
            else:
                self._direct_reads += 1
                if self._direct_reads >= _YIELD_EVERY:
                    # A peer that never lets the socket run dry still lets other tasks (and
                    # cancellation) in now and then.
                    self._direct_reads = 0
                    await trio.lowlevel.checkpoint()
                return data
            self._direct_reads = 0
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (OSError, trio.ClosedResourceError) as e:
                raise trio.EndOfChannel(str(e)) from None

    async def _receive_large(self, size: int) -> memoryview:
        """Reads the rest of a large message straight into its final buffer, which becomes the
        message itself (no further copy). Only called when less than one message is buffered."""
        f = self._framer
        if size > f.limit:
            raise FramingError(f"message size {size} outside 7..{f.limit}")
        have = len(f.buf) - f.pos
        out = bytearray(size)
        out[:have] = f.buf[f.pos:]
        view = memoryview(out)
        while have < size:
            try:
                n = await self.sock.recv_into(view[have:])
            except (OSError, trio.ClosedResourceError) as e:
                raise trio.EndOfChannel(str(e)) from None
            if n == 0:
                raise FramingError("connection closed in the middle of a message")
            have += n
        f.buf = bytearray()
        f.pos = 0
        return view

    async def send(self, parts: Sequence[Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        lock = self._send_lock
        if lock.locked():
            async with lock:  # another reply is part-way out: queue behind it
                await self._send_all(views)
            return
        # Nobody is sending: write at once, without a scheduler round (most replies fit in the
        # socket buffer). Only a reply that does not fit takes the lock and waits for room.
        if self._write(views):
            return
        lock.acquire_nowait()
        try:
            await self._send_all(views)
        finally:
            lock.release()

    def _write(self, views: list[memoryview]) -> bool:
        """Writes what the socket takes now, dropping what went out from `views`; True when
        nothing is left."""
        try:
            n = os.writev(self.sock.fileno(), views)
        except BlockingIOError:
            return False
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
        return not views

    async def _send_all(self, views: list[memoryview]) -> None:
        while views and not self._write(views):
            try:
                await trio.lowlevel.wait_writable(self.sock)
            except (OSError, trio.ClosedResourceError) as e:
                raise trio.BrokenResourceError(str(e)) from e

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            await trio.lowlevel.checkpoint()


class StreamChannel:
    """A Channel over trio byte streams (a receive side and a send side, maybe the same object):
    fd pairs, and TLS (`transports.tls`) on top of a socket."""

    def __init__(self, r: trio.abc.ReceiveStream, w: trio.abc.SendStream, peer: str,
                 max_message_size: int = STREAM_MAX_MESSAGE) -> None:
        self.peer = peer
        self.max_message_size = max_message_size
        self._r = r
        self._w = w
        self._framer = _Framer(max_message_size)
        self._send_lock = trio.Lock()

    def set_msize(self, msize: int) -> None:
        self._framer.set_limit(msize)

    async def receive(self) -> memoryview:
        return await self._framer.receive(self._recv)

    async def _recv(self) -> bytes:
        try:
            return bytes(await self._r.receive_some(_RECV_CHUNK))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise trio.EndOfChannel(str(e)) from None

    async def send(self, parts: Sequence[Buffer]) -> None:
        async with self._send_lock:
            await self._w.send_all(b"".join(parts))

    async def aclose(self) -> None:
        await self._r.aclose()
        if self._w is not self._r:
            await self._w.aclose()


class FdPairChannel(StreamChannel):
    """A Channel over a read fd and a write fd (pipes, a socketpair end twice, a character device)."""

    def __init__(self, rfd: int, wfd: int, max_message_size: int = STREAM_MAX_MESSAGE) -> None:
        r = trio.lowlevel.FdStream(os.dup(rfd))
        w = r if rfd == wfd else trio.lowlevel.FdStream(os.dup(wfd))
        super().__init__(r, w, f"fd:{rfd},{wfd}", max_message_size)


# --- listeners ---------------------------------------------------------------------------------


async def _serve_channel(handler: ChannelHandler, channel: Channel) -> None:
    try:
        await handler(channel)
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()


#: Turns an accepted connection into a Channel (TLS: after a handshake); None when refused, in
#: which case it has closed the socket and logged why.
Upgrade = Callable[[trio.socket.SocketType, str], Awaitable[Channel | None]]


class SocketListener:
    """Accepts TCP or unix connections on a socket it binds, or on an inherited listening socket
    (`inherited`: systemd socket activation), which it then neither binds nor unlinks."""

    def __init__(self, address: str, family: int, sockaddr: object, max_message_size: int, *,
                 inherited: socket.socket | None = None, upgrade: Upgrade | None = None) -> None:
        self.address = address
        self.family = family
        self.sockaddr = sockaddr
        self.max_message_size = max_message_size
        self.inherited = inherited
        self.upgrade = upgrade
        self.bound: Any = None

    async def _bind(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family == socket.AF_UNIX:
                path = str(self.sockaddr)
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)
                # Bind under a temporary name and rename once listening, so the path appears only
                # when connections are accepted (scripts and QEMU may wait for it to exist).
                tmp = f"{self.sockaddr}.{os.getpid()}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                await sock.bind(tmp)
                sock.listen(128)
                os.rename(tmp, str(self.sockaddr))
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(self.sockaddr)
                sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    async def serve(self, handler: ChannelHandler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.from_stdlib_socket(self.inherited) if self.inherited is not None else await self._bind()
        with sock:
            self.bound = sock.getsockname()
            where = f"tcp:{self.bound[0]}:{self.bound[1]}" if self.family != socket.AF_UNIX else f"unix:{self.sockaddr}"
            log.info("listening on %s%s%s", self.address if self.inherited is not None else where,
                     f" ({where})" if self.inherited is not None else "", " with TLS" if self.upgrade else "")
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    while True:
                        try:
                            conn, addr = await sock.accept()
                        except OSError as e:
                            # Out of fds (EMFILE/ENFILE) or a connection reset before accept:
                            # refuse this one, keep serving the others.
                            log.warning("%s: accept failed: %s", self.address, e)
                            await trio.sleep(0.1)
                            continue
                        if self.family != socket.AF_UNIX:
                            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            peer = f"tcp:{addr[0]}:{addr[1]}"
                        else:
                            peer = f"unix:{self.sockaddr}"
                        nursery.start_soon(self._connection, handler, conn, peer)
            finally:
                if self.family == socket.AF_UNIX and self.inherited is None:
                    with contextlib.suppress(OSError):
                        os.unlink(str(self.sockaddr))

    async def _connection(self, handler: ChannelHandler, conn: trio.socket.SocketType, peer: str) -> None:
        if self.upgrade is None:
            await _serve_channel(handler, SocketChannel(conn, peer, self.max_message_size))
            return
        # In the connection's own task: a slow or failing handshake never holds up accept.
        channel = await self.upgrade(conn, peer)
        if channel is not None:
            await _serve_channel(handler, channel)


class FdListener:
    """Serves exactly one connection: the inherited fd pair. Returns when the peer closes."""

    def __init__(self, address: str, rfd: int, wfd: int, max_message_size: int) -> None:
        self.address = address
        self.rfd, self.wfd = rfd, wfd
        self.max_message_size = max_message_size

    async def serve(self, handler: ChannelHandler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        channel = FdPairChannel(self.rfd, self.wfd, self.max_message_size)
        task_status.started()
        await _serve_channel(handler, channel)
