"""The server-side Channel of one running virtqueue: each available descriptor chain is one 9P
request; its reply goes back into the same chain.

`receive` pops the virtqueue itself (no task between the ring and the session): it takes the
next available chain, and only when the ring is empty waits for the driver's kick on its eventfd.

Replies are matched to chains by the tag in the 7-byte header (tags are unique among a
session's requests in flight; a duplicate is tolerated by answering chains of one tag in order).
An empty ring is watched for a while before `receive` sleeps on the kick eventfd (adaptive
polling, `transports.virtio.polling`): a driver that sends its next request soon after a reply
finds us awake, and need not kick.

Requests are handed out as soon as they are popped, so the server may process several at once
and answer them in any order. `send_rread` reads a file straight into the chain's buffers; a large
Twrite arrives with its data left in guest memory (`take_payload`, written to a file with pwritev).
Tread and Twrite on fids the session registered (`direct_open`, transports.base.DirectIO) never
reach it: the queue serves them itself while popping or spinning (transports/ring/direct.c).

This module must never parse a 9P message beyond its header, except Tflush's oldtag (to return a
flushed request's buffers to the driver) and the fixed Twrite header (to leave its data in place).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from errno import EINVAL, EMSGSIZE, EOPNOTSUPP
from typing import Any, Protocol

import trio

from ninep.protocol.numbers import T
from transports.base import Buffer, DirectTotals
from transports.virtio._ext import Chain, VirtqError, drain_eventfd, signal_eventfd
from transports.virtio.polling import AdaptivePoll, event_loop_fd

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IBH")
RREAD_HEADER = struct.Struct("<IBHI")
RLERROR = struct.Struct("<IBHI")
#: size[4] type[1] tag[2] fid[4] offset[8] count[4], the same in every dialect.
TWRITE_HEADER = struct.Struct("<IBHIQI")
TFLUSH, RFLUSH, RLERROR_TYPE = int(T.Tflush), int(T.Rflush), int(T.Rlerror)
TREAD, RREAD, TWRITE = int(T.Tread), int(T.Rread), int(T.Twrite)
#: Twrites with more data than this keep it in guest memory (Linux's own zero-copy threshold).
ZERO_COPY_WRITE_MIN = 1024


def _header_of(parts: Sequence[Buffer]) -> bytes:
    head = b""
    for part in parts:
        head += bytes(memoryview(part)[: 7 - len(head)])
        if len(head) >= 7:
            return head
    raise ValueError("reply shorter than a 9P header")


def split_args() -> tuple[int, int, int]:
    """`VirtQueue.set_split` arguments that leave large Twrite data in guest memory."""
    return TWRITE, TWRITE_HEADER.size, TWRITE_HEADER.size + ZERO_COPY_WRITE_MIN


@dataclass(slots=True)
class GuestPayload:
    """The data of one Twrite, still in guest memory: `count` bytes at `start` of its chain's
    readable stream. Addresses and lengths were read and checked once when the chain was popped;
    the guest may still change the bytes (that is its own data)."""

    chain: Chain
    start: int
    count: int

    def __len__(self) -> int:
        return self.count

    def pwrite(self, fd: int, offset: int) -> int:
        """Blocking pwritev from guest memory to `fd` (GIL released): run it in a worker thread."""
        n: int = self.chain.pwrite(fd, offset, self.start, self.count)
        return n

    def copy(self) -> bytes:
        """A private copy, for writes that do not go to a host fd."""
        data: bytes = self.chain.read(self.start, self.count)
        return data


class Ring(Protocol):
    """What the channel reads of the back-end's state of its ring (`backend.Vring`): both may
    change while the channel runs (SET_VRING_ENABLE, SET_VRING_KICK)."""

    enabled: bool
    kick: int | None


#: Requests `receive` hands out from a full ring before letting other tasks run once.
POPS_PER_CHECKPOINT = 32


class QueueChannel:
    """One virtqueue seen as a Channel (server side). Created by the back-end when the queue
    starts; closed when it stops (the VMM stopped the ring, reset, disconnected, or the driver
    broke the ring rules)."""

    def __init__(
        self,
        peer: str,
        max_message_size: int,
        notify: Callable[[], None],
        queue: Any,
        ring: Ring,
        broken: Callable[[str], object],
        poll: AdaptivePoll | None = None,
        *,
        direct: bool = False,
    ) -> None:
        self.peer = peer
        self.max_message_size = max_message_size
        self._msize = max_message_size
        self._notify = notify
        self._queue = queue  # transports._ring.VirtQueue
        #: Whether the queue may serve fids itself: only under a direct-I/O policy (its write guard
        #: and histogram size set on the queue by the device that made it).
        self._direct = direct
        self._ring = ring
        self._broken = broken  # stops the ring and tells the VMM (err eventfd)
        self._waiting_on: int | None = None  # the kick fd `receive` is parked on
        self._unyielded = 0
        self.requests = 0
        self._inflight: dict[int, deque[Chain]] = {}
        self._flushes: dict[int, int] = {}  # tag of a Tflush -> the tag it flushes
        self._payloads: dict[int, GuestPayload] = {}  # tag of a split Twrite -> its data
        self._closed = False
        self._zero_copy_reads = 0  # Rreads that went file -> guest buffers directly
        self._zero_copy_writes = 0  # Twrites handed out with their data left in guest memory
        self._nowait = True  # try preadv2(RWF_NOWAIT) on the loop before a worker thread
        self._poll = poll or AdaptivePoll(0)
        self._loop_fd = event_loop_fd() if self._poll.max_ns else -1
        self._idle_since = 0  # when the device last went idle (ns), for the polling window

    # -- reading the ring ---------------------------------------------------------------------
    def _accept(self, chain: Chain) -> memoryview | None:
        """Checks a popped chain's framing; returns its message, or None when it was answered
        (EMSGSIZE) here. A chain with no room for any 9P message breaks the queue."""
        request = chain.request
        if len(request) < 7 or chain.capacity < 7:
            self._queue.mark_broken(  # raises VirtqError
                f"chain with {len(request)} readable and {chain.capacity} writable bytes cannot carry 9P"
            )
        size, mtype, tag = HEADER.unpack_from(request)
        if size < 7 or size > chain.readable or size > self._msize:
            log.warning("%s: request of %d bytes declares size %d; answered EMSGSIZE", self.peer, chain.readable, size)
            self._answer_error(chain, tag, EMSGSIZE)
            return None
        message = self._split_write(chain, request, size, tag) if chain.split else memoryview(request)[:size]
        if mtype == TFLUSH and size >= 9:
            (oldtag,) = struct.unpack_from("<H", request, 7)
            self._flushes[tag] = oldtag
        self._inflight.setdefault(tag, deque()).append(chain)
        return message

    def _next(self, arm: bool = True) -> memoryview | None:
        """The next request waiting in the ring, or None when it is empty (then, with EVENT_IDX
        and `arm`, the driver has been asked to kick at its next buffer). Raises VirtqError."""
        while self._ring.enabled and not self._closed:
            chain = self._queue.pop(arm)
            if chain is None:
                return None
            self.requests += 1
            message = self._accept(chain)
            if message is not None:
                return message
        return None

    def _split_write(self, chain: Chain, head: bytes, size: int, tag: int) -> memoryview:
        """The message to hand out for a Twrite whose data stayed in guest memory: its header with
        count 0 (size 23), the data kept for `take_payload`. A Twrite whose count disagrees with
        its size is copied whole instead, so the codec rejects it as it would on any transport."""
        _, _, _, fid, offset, count = TWRITE_HEADER.unpack_from(head)
        if size != TWRITE_HEADER.size + count:
            return memoryview(head + chain.read(len(head), size - len(head)))
        self._payloads[tag] = GuestPayload(chain, TWRITE_HEADER.size, count)
        self._zero_copy_writes += 1
        return memoryview(TWRITE_HEADER.pack(TWRITE_HEADER.size, TWRITE, tag, fid, offset, 0))

    def take_payload(self, tag: int) -> GuestPayload | None:
        """The guest-memory data of the Twrite `tag` received with count 0, once; else None."""
        return self._payloads.pop(tag, None)

    def _answer_error(self, chain: Chain, tag: int, errno: int) -> None:
        if chain.capacity >= RLERROR.size:
            chain.write([RLERROR.pack(RLERROR.size, RLERROR_TYPE, tag, errno)])
            self._complete(chain, RLERROR.size)
        else:
            self._complete(chain, 0)

    def _complete(self, chain: Chain, length: int) -> None:
        if chain.complete(length):
            self._notify()
        if not self._inflight and self._poll.max_ns:
            # The device went idle: the polling window counts from here. A reader asleep on the
            # kick (it went there while this request was in a worker thread) is woken to spin,
            # so the driver's next request finds it awake — the wake-up costs nothing across
            # threads, the reader being a task of this same loop.
            self._idle_since = time.perf_counter_ns()
            if self._waiting_on is not None and self._poll.ns:
                signal_eventfd(self._waiting_on)

    def _take(self, tag: int) -> Chain | None:
        chains = self._inflight.get(tag)
        if not chains:
            return None
        chain = chains.popleft()
        if not chains:
            del self._inflight[tag]
        return chain

    # -- Channel ------------------------------------------------------------------------------
    async def receive(self) -> memoryview:
        spun = False  # since the last wake-up
        while not self._closed:
            # Idle (nothing in flight) and about to spin on the ring: do not ask for a kick first
            # (the spin asks for one when it gives up). While requests are in flight the reader
            # sleeps; the last reply wakes it to spin (`_complete`).
            spin = not spun and self._poll.ns > 0 and not self._inflight
            served = self._queue.direct_served
            try:
                message = self._next(arm=not spin)
            except VirtqError as exc:
                log.warning("%s: queue broken: %s", self.peer, exc)
                self._broken(str(exc))  # closes this channel
                break
            if self._queue.direct_served != served:
                # Requests came and were answered by direct I/O: they end an idle period like
                # any request, and the device has been idle again since the last of them.
                self._arrived()
                if not self._inflight and self._poll.max_ns:
                    self._idle_since = self._queue.direct_last_ns
                spun = False
                if message is None:
                    # Spin for the next one (above), letting other tasks run first: a driver that
                    # keeps the ring full of such requests must not keep the loop to itself.
                    await trio.lowlevel.checkpoint()
                    continue
            if message is not None:
                self._arrived()
                # A ring kept full hands out requests without waiting; let the workers they
                # started run now and then (an empty ring makes us wait anyway).
                self._unyielded += 1
                if self._unyielded >= POPS_PER_CHECKPOINT:
                    self._unyielded = 0
                    await trio.lowlevel.checkpoint()
                    if self._closed:
                        break
                return message
            self._unyielded = 0
            if self._poll.max_ns and not self._inflight and not self._idle_since:
                self._idle_since = time.perf_counter_ns()
            if spin:
                spun = True
                if await self._spin():
                    continue
            kick = self._ring.kick
            if kick is None:
                break
            # Woken by a kick, or by `close` / a kick fd replaced (ClosedResourceError): either
            # way look at the ring (and at self._ring.kick) again.
            self._waiting_on = kick
            try:
                await trio.lowlevel.wait_readable(kick)
                drain_eventfd(kick)
            except (trio.ClosedResourceError, OSError):
                pass
            finally:
                self._waiting_on = None
            spun = False
        raise trio.EndOfChannel

    def _arrived(self) -> None:
        """A request arrived: the idle period it ends tunes the polling window."""
        if self._idle_since:
            self._poll.update(time.perf_counter_ns() - self._idle_since)
            self._idle_since = 0

    async def _spin(self) -> bool:
        """Whether a request for the session arrived while spinning on the ring for the current
        window. Tasks already runnable go first: the spin holds the event loop (it ends early only
        when the loop's epoll fd has something). Direct I/O requests are answered during the spin,
        each one starting the window again."""
        await trio.lowlevel.checkpoint()
        if self._closed or not self._ring.enabled:
            return False
        served = self._queue.direct_served
        found: bool = self._queue.poll(self._poll.ns, self._loop_fd)
        if self._queue.direct_served != served:
            self._idle_since = self._queue.direct_last_ns  # each was caught by the window
            self._poll.caught()
        return found

    async def send(self, parts: Sequence[Buffer]) -> None:
        if self._closed:
            return  # the ring is gone; its buffers went with it
        size, mtype, tag = HEADER.unpack(_header_of(parts))
        chain = self._take(tag)
        self._payloads.pop(tag, None)  # a Twrite answered without taking its data (an error)
        if chain is None:
            log.warning("%s: reply for tag %d matches no request in flight; dropped", self.peer, tag)
            return
        try:
            written = chain.write(parts)
        except ValueError as exc:
            log.warning("%s: %s; answered EMSGSIZE", self.peer, exc)
            self._answer_error(chain, tag, EMSGSIZE)
            return
        self._complete(chain, written)
        if mtype == RFLUSH:
            oldtag = self._flushes.pop(tag, None)
            if oldtag is not None and oldtag != tag:
                # The flushed request will get no reply; hand its buffers back, empty.
                old = self._take(oldtag)
                self._payloads.pop(oldtag, None)
                if old is not None:
                    self._complete(old, 0)

    async def send_rread(self, tag: int, fd: int, offset: int, count: int) -> int:
        chain = None if self._closed else self._take(tag)
        if chain is None:
            raise OSError(EINVAL, "no request in flight for this tag")
        count = max(0, min(count, self._msize - RREAD_HEADER.size))
        try:
            cached = self._pread_cached(chain, fd, offset, count)
            n = cached or 0
            if cached is None or 0 < n < count:
                # Not (all) in the page cache, or short because of end of file: a worker thread
                # reads the rest, so storage latency never stalls the event loop.
                n += await trio.to_thread.run_sync(
                    chain.pread, fd, offset + n, count - n, RREAD_HEADER.size + n
                )
        except BaseException:
            # Nothing was sent: the session answers with `send` (an Rlerror) on the same chain.
            if not self._closed:
                self._inflight.setdefault(tag, deque()).appendleft(chain)
            raise
        self._zero_copy_reads += 1
        if not self._closed:
            chain.write([RREAD_HEADER.pack(RREAD_HEADER.size + n, RREAD, tag, n)])
            self._complete(chain, RREAD_HEADER.size + n)
        return n

    def _pread_cached(self, chain: Chain, fd: int, offset: int, count: int) -> int | None:
        """Reads inline what the page cache holds right now (0 at end of file); None when
        nothing could be read that way (not cached, or no RWF_NOWAIT support)."""
        if not self._nowait or count == 0:
            return None
        try:
            n: int = chain.pread(fd, offset, count, RREAD_HEADER.size, nowait=True)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (EOPNOTSUPP, EINVAL):
                self._nowait = False  # this kernel or filesystem has no RWF_NOWAIT
                return None
            raise
        return n

    def set_msize(self, msize: int) -> None:
        self._msize = min(msize, self.max_message_size)
        self._queue.set_msize(self._msize)

    # -- DirectIO -----------------------------------------------------------------------------
    def direct_open(self, fid: int, fd: int, readable: bool, writable: bool) -> bool:
        flags = (1 if readable else 0) | (2 if writable else 0)
        taken = bool(flags) and self._direct and not self._closed and bool(self._queue.direct_open(fid, fd, flags))
        if not taken:
            os.close(fd)  # the fd is ours either way
        return taken

    def direct_close(self, fid: int) -> None:
        self._queue.direct_close(fid)

    def direct_stats(self) -> dict[int, DirectTotals]:
        stats: dict[int, DirectTotals] = self._queue.direct_stats()
        return stats

    @property
    def zero_copy_reads(self) -> int:
        """Rreads that went from a file straight into guest buffers (here or by direct I/O)."""
        direct = self._queue.direct_stats().get(TREAD)
        return self._zero_copy_reads + (direct[0] if direct else 0)

    @property
    def zero_copy_writes(self) -> int:
        """Twrites whose data went from guest buffers straight to a file, or was handed out in
        guest memory (`take_payload`)."""
        direct = self._queue.direct_stats().get(TWRITE)
        return self._zero_copy_writes + (direct[0] if direct else 0)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Ends `receive`; replies sent after this are dropped (the ring stopped)."""
        if not self._closed:
            self._closed = True
            if self._waiting_on is not None:
                trio.lowlevel.notify_closing(self._waiting_on)  # wakes `receive` (fd stays open)
            self._inflight.clear()
            self._flushes.clear()
            self._payloads.clear()
