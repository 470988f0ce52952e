"""Per-connection and per-server resource limits: what a connection may hold, what the server
does when a limit is reached.

- `MemoryBudget`: the bytes of request and reply buffers one connection may hold in flight
  (`SessionOptions.max_conn_memory`). Past it the session stops *reading* from the connection
  until replies drain: backpressure, not refusal. A 9P client (Linux v9fs above all) has no way to
  act on a refused well-formed request except to fail the application's syscall with EIO/ENOMEM,
  whereas a connection that is simply not read fills its socket buffer or ring and the client
  waits, which every transport already handles. The connection stays correct, just slower, and
  its memory stays bounded (the rest waits in the kernel's buffers, not ours).
- `request_cost`: what one request is charged: its own size plus the largest reply it can produce.
- `refuse`: the answer to a connection past `max_connections`: its Tversion gets an error
  (EUSERS, "Too many users") so the client reports something clearer than a reset, then the
  transport closes it.

This module must never touch files or decide protocol semantics beyond the 7-byte header and the
count field of Tread/Treaddir.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Sequence

import trio

from ninep.protocol import messages as m
from ninep.protocol.codec import HEADER, codec_for
from ninep.protocol.numbers import IOHDRSZ, V9P2000, V9P2000_L, V9P2000_U, T
from transports.base import Buffer, Channel

log = logging.getLogger("ninep.limits")

#: Charged for the reply of a request whose reply size does not depend on the request
#: (Rgetattr, Rwalk with 16 qids, Rstatfs ... all fit well within it).
SMALL_REPLY = 512
#: How long a refused connection may take to send its Tversion before it is simply closed.
REFUSE_WAIT = 1.0

# Tread and Treaddir share the layout size[4] type[1] tag[2] fid[4] offset[8] count[4].
_COUNT = struct.Struct("<I")
_COUNT_AT = HEADER.size + 4 + 8
_SIZED_REPLIES = frozenset({T.Tread, T.Treaddir})


def request_cost(buf: memoryview, msgtype: int, msize: int) -> int:
    """Bytes a request holds while in flight: the request buffer and its largest possible reply
    (for reads, the count asked for, capped by msize; a malformed count costs msize)."""
    reply = SMALL_REPLY
    if msgtype in _SIZED_REPLIES:
        if len(buf) >= _COUNT_AT + 4:
            (count,) = _COUNT.unpack_from(buf, _COUNT_AT)
            reply = min(count + IOHDRSZ, msize) if msize else count + IOHDRSZ
        else:
            reply = msize or SMALL_REPLY
    return len(buf) + reply


class MemoryBudget:
    """A byte budget one task charges before reading the next message and request tasks give
    back when their reply has gone out. One request is always admitted when nothing is charged,
    so a budget smaller than one message slows a connection down but never wedges it."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits = 0
        self._what = what
        #: Made only while the reader waits for room: most releases have nobody to wake.
        self._freed: trio.Event | None = None

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            if not self.waits:
                log.warning("%s: %d bytes in flight, max-conn-memory %d reached: not reading more "
                            "until replies drain", self._what, self.used, self.limit)
            self.waits += 1
            if self._freed is None:
                self._freed = trio.Event()
            await self._freed.wait()
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        if self._freed is not None:
            self._freed.set()
            self._freed = None


async def refuse(channel: Channel, reason: str, encode_error: Callable[[int, int, str], Sequence[Buffer]]) -> None:
    """Answers the connection's Tversion (if it sends one within REFUSE_WAIT) with EUSERS and
    returns; the caller's transport then closes it. `encode_error(tag, errno, dialect)` builds the
    error reply in the dialect the client asked for."""
    with trio.move_on_after(REFUSE_WAIT):
        try:
            buf = await channel.receive()
            _, msgtype, tag = HEADER.unpack_from(buf, 0)
            dialect = V9P2000
            if msgtype == T.Tversion:
                tv = codec_for(V9P2000).decode(buf)
                if isinstance(tv, m.Tversion) and tv.version in (V9P2000_L, V9P2000_U):
                    dialect = tv.version
            await channel.send(encode_error(tag, errno.EUSERS, dialect))
        except Exception as e:  # whatever the refused peer did, it is closed next
            log.debug("refused connection: %s (%s)", e, reason)
