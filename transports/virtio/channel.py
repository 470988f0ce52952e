"""The server-side Channel of one running virtqueue: each available descriptor chain is one 9P
request; its reply goes back into the same chain.

Replies are matched to chains by the tag in the 7-byte header (tags are unique among a
session's requests in flight; a duplicate is tolerated by answering chains of one tag in order).
Requests are handed out as soon as they are popped, so the server may process several at once
and answer them in any order. `send_rread` reads a file straight into the chain's buffers; a large
Twrite arrives with its data left in guest memory (`take_payload`, written to a file with pwritev).

This module must never parse a 9P message beyond its header, except Tflush's oldtag (to return a
flushed request's buffers to the driver) and the fixed Twrite header (to leave its data in place).
"""

from __future__ import annotations

import logging
import math
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from transports.base import Buffer
from transports.virtio._ext import Chain

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IBH")
RREAD_HEADER = struct.Struct("<IBHI")
RLERROR = struct.Struct("<IBHI")
#: size[4] type[1] tag[2] fid[4] offset[8] count[4], the same in every dialect.
TWRITE_HEADER = struct.Struct("<IBHIQI")
TFLUSH, RFLUSH, RREAD, TWRITE, RLERROR_TYPE = 108, 109, 117, 118, 7
#: Twrites with more data than this keep it in guest memory (Linux's own zero-copy threshold).
ZERO_COPY_WRITE_MIN = 1024
EINVAL, EMSGSIZE, EOPNOTSUPP = 22, 90, 95


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


class QueueChannel:
    """One virtqueue seen as a Channel (server side). Created by the back-end when the queue
    starts; closed when it stops (the VMM stopped the ring, reset, disconnected, or the driver
    broke the ring rules)."""

    def __init__(self, peer: str, max_message_size: int, notify: Callable[[], None]) -> None:
        self.peer = peer
        self.max_message_size = max_message_size
        self._msize = max_message_size
        self._notify = notify
        self._send_q, self._recv_q = trio.open_memory_channel[memoryview](math.inf)
        self._inflight: dict[int, deque[Chain]] = {}
        self._flushes: dict[int, int] = {}  # tag of a Tflush -> the tag it flushes
        self._payloads: dict[int, GuestPayload] = {}  # tag of a split Twrite -> its data
        self._closed = False
        self.zero_copy_reads = 0  # Rreads that went file -> guest buffers directly
        self.zero_copy_writes = 0  # Twrites handed out with their data left in guest memory
        self._nowait = True  # try preadv2(RWF_NOWAIT) on the loop before a worker thread

    # -- fed by the back-end ------------------------------------------------------------------
    def deliver(self, chain: Chain) -> None:
        """Accepts a popped chain: checks its framing and queues it for `receive`."""
        if self._closed:
            self._complete(chain, 0)  # nobody serves this ring any more
            return
        request = chain.request
        size, mtype, tag = HEADER.unpack_from(request)  # caller guarantees >= 7 bytes
        if size < 7 or size > chain.readable or size > self._msize:
            log.warning("%s: request of %d bytes declares size %d; answered EMSGSIZE", self.peer, chain.readable, size)
            self._answer_error(chain, tag, EMSGSIZE)
            return
        message = self._split_write(chain, request, size, tag) if chain.split else memoryview(request)[:size]
        if mtype == TFLUSH and size >= 9:
            (oldtag,) = struct.unpack_from("<H", request, 7)
            self._flushes[tag] = oldtag
        self._inflight.setdefault(tag, deque()).append(chain)
        self._send_q.send_nowait(message)

    def _split_write(self, chain: Chain, head: bytes, size: int, tag: int) -> memoryview:
        """The message to hand out for a Twrite whose data stayed in guest memory: its header with
        count 0 (size 23), the data kept for `take_payload`. A Twrite whose count disagrees with
        its size is copied whole instead, so the codec rejects it as it would on any transport."""
        _, _, _, fid, offset, count = TWRITE_HEADER.unpack_from(head)
        if size != TWRITE_HEADER.size + count:
            return memoryview(head + chain.read(len(head), size - len(head)))
        self._payloads[tag] = GuestPayload(chain, TWRITE_HEADER.size, count)
        self.zero_copy_writes += 1
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
        try:
            return await self._recv_q.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.EndOfChannel from None

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
        self.zero_copy_reads += 1
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

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Ends `receive`; replies sent after this are dropped (the ring stopped)."""
        if not self._closed:
            self._closed = True
            self._send_q.close()
            self._inflight.clear()
            self._flushes.clear()
            self._payloads.clear()
