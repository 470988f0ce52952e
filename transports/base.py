"""The transport interface: a `Listener` hands out `Channel`s, a `Channel` carries whole messages.

A Channel moves complete 9P messages (size[4] type[1] tag[2] body) in both directions; it knows
nothing of their meaning beyond the 7-byte header. The server receives T-messages and sends
R-messages on it; `ninep.client` does the opposite on the same interface, so every transport has
a client end (for tests, FUSE and benchmarks) and a server end.

Rules every Channel keeps:
- `receive` returns one whole message as a private buffer (never a view into shared memory the
  peer can still write). The one exception is opt-in (`ZeroCopyWrites`): a large Twrite may come
  with count 0 and its data left in the peer's memory, to be written to a file from there. It raises `trio.EndOfChannel` on a clean close and `FramingError` when the
  byte stream can no longer be trusted (size < 7 or > the negotiated msize); the server then logs
  and drops the connection.
- `send` writes one whole message given as parts (header and payload may be separate buffers, so
  Rread data is not copied); concurrent `send` calls never interleave.
- `aclose` is idempotent and wakes a pending `receive`.

This module must never import the codec, the session or any backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

Buffer = bytes | bytearray | memoryview


class FramingError(Exception):
    """The peer sent something that breaks message framing; the channel must be closed."""


class Channel(Protocol):
    #: Largest message this transport can carry; the session clamps msize to it.
    max_message_size: int
    #: A human-readable peer identity for logs ("tcp:127.0.0.1:40122", "fd:3,4", ...).
    peer: str

    async def receive(self) -> memoryview: ...

    async def send(self, parts: Sequence[Buffer]) -> None: ...

    def set_msize(self, msize: int) -> None:
        """Called after Tversion: messages larger than `msize` are framing errors from now on."""
        ...

    async def aclose(self) -> None: ...


ChannelHandler = Callable[[Channel], Awaitable[None]]


class Listener(Protocol):
    #: The address as given on the command line ("tcp:127.0.0.1:5640", "unix:/run/x.sock").
    address: str

    async def serve(
        self,
        handler: ChannelHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until cancelled, running `handler(channel)` for each in its own task
        (the listener closes the channel when the handler returns). Calls `task_status.started()`
        once it is accepting."""
        ...


class Authenticated(Protocol):
    """Optional Channel attribute (TLS, `transports.tls`): the peer's verified identity, the
    client certificate subject as an RFC 4514 string, or None when the peer showed none. Read it
    with `getattr(channel, "identity", None)`; other transports do not authenticate."""

    identity: str | None


class ZeroCopyReads(Protocol):
    """Optional Channel capability (ring transports): answer a Tread by reading the file straight
    into the reply buffer the peer provided, with no intermediate copy.

    The session calls it instead of `send` when the channel has it and the open file has a host
    fd. It reads at most `count` bytes at `offset` from `fd` into the reply area and sends an
    Rread carrying exactly the bytes read, returning that number. If the read fails it raises the
    OSError before anything was sent, so the session can answer Rlerror."""

    async def send_rread(self, tag: int, fd: int, offset: int, count: int) -> int: ...


class Payload(Protocol):
    """Message data a transport left in the peer's memory: its length and address were read and
    checked once; the bytes are read only by `pwrite` or `copy`."""

    def __len__(self) -> int: ...

    def pwrite(self, fd: int, offset: int) -> int:
        """Blocking (GIL released, run it in a worker thread): write the data to `fd` at `offset`
        straight from the peer's memory; bytes written, OSError if none."""
        ...

    def copy(self) -> bytes:
        """A private copy of the data."""
        ...


class ZeroCopyWrites(Protocol):
    """Optional Channel capability (ring transports): a Twrite whose data is large arrives from
    `receive` as its header with count 0 and size 23; `take_payload(tag)` then returns its real
    data (once; None for any other message). Only a Twrite whose count matches its size is handed
    out this way, so the header is otherwise a valid Twrite. Data never taken is dropped when the
    reply for the tag is sent."""

    def take_payload(self, tag: int) -> Payload | None: ...


#: Running totals of the requests of one type a channel served itself: (count, payload bytes,
#: nanoseconds, latency buckets as in ninep.metrics.counters).
DirectTotals = tuple[int, int, int, list[int]]


class DirectIO(Protocol):
    """Optional Channel capability (virtqueues): the channel answers Tread and Twrite on an open
    fid itself, from the file straight to the peer's buffers and back, and the session never sees
    those requests (transports/ring/direct.c). For a peer that sends one request at a time, that
    is most of a read's or write's turnaround.

    The session decides what is allowed: `direct_open` registers an open fid with a new fd on its
    open file, which the channel owns from then on (it closes it at once when it cannot take the
    fid: False), and the access granted. Before it handles anything that ends the fid (Tclunk,
    Tremove, Tversion...) the session calls `direct_close`, with no checkpoint in between, so a
    request received after that is the session's again. Only requests that succeed are answered by
    the channel; any other (an error, a read that would wait for storage) reaches the session as
    usual. `direct_stats` gives running totals by message type, for the metrics."""

    def direct_open(self, fid: int, fd: int, readable: bool, writable: bool) -> bool: ...

    def direct_close(self, fid: int) -> None: ...

    def direct_stats(self) -> dict[int, DirectTotals]: ...
