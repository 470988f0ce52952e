"""One 9P connection: dialect and msize negotiation, the fid table, requests in flight, flush.

The session reads whole messages from a Channel and hands decoded T-messages to the handler table
of the negotiated dialect, which the server gives it (`ninep.server.handlers.tables`; this module
never imports a handler). The task reading a connection runs each request itself, so a request that completes
without waiting (most do) costs no task switch; when one has to wait (a worker thread, a lock, a
full socket) another task of the connection takes over reading at that moment
(`ninep.server.suspension`) and this one finishes the request, then parks until it is needed to read
again. So many requests are in flight at once, answered as they finish.
Tflush interrupts the request where it waits (a blocking lock: `Session.interruptible`) and is
answered after it; a request interrupted that way gets no reply. Backend calls are never abandoned
half-way — their results (fds, new fids) would leak — so a request flushed while in one completes
and replies, which the protocol allows (a client must honour a reply that arrives before Rflush).
When the connection ends every waiting request is interrupted, the rest finish, and every fid is
clunked, so a client dying mid-request leaks nothing.

Files are reached through the exports table the server shares with every session: an attach
picks an Export by aname and the fid carries it (see ninep.server.exports).

This module must never touch the host filesystem or a socket directly: files go through the
Backend, bytes through the Channel.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import outcome
import trio

from fs_backends.base import Backend, Cred
from ninep.metrics.counters import ConnStats
from ninep.protocol import messages as m
from ninep.protocol.codec import HEADER, Codec, DecodeError, codec_for
from ninep.protocol.numbers import (
    IOHDRSZ,
    L_O_ACCMODE,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_WRONLY,
    MIN_MSIZE,
    QTDIR,
    V9P2000,
    V9P2000_L,
    V9P2000_U,
    VERSION_UNKNOWN,
    T,
)
from ninep.server.exports import ExportTable
from ninep.server.fids import Fid, FidTable, policy_of
from ninep.server.identity import IdentityRule
from ninep.server.limits import MemoryBudget, request_cost
from ninep.server.policy import DEFAULT_POLICY, OperationPolicy, Refused
from ninep.server.release import release_fid
from ninep.server.request import Flushed, Request, Sent
from ninep.server.suspension import await_noting_suspension
from transports.base import Buffer, Channel, DirectIO, FramingError, Payload

log = logging.getLogger("ninep.session")
trace_log = logging.getLogger("ninep.trace")

_connection_ids = itertools.count(1)


Handler = Callable[["Session", Any], Awaitable[m.Message | Sent]]
#: A handler table per dialect (V9P2000, V9P2000_U, V9P2000_L): built once by the server.
HandlerTables = Mapping[str, Mapping[int, Handler]]


@dataclass(slots=True)
class SessionOptions:
    """Per-connection behaviour and the server's limits (field names are what an exports file
    or the command line set: `--max-fids` is `max_fids`)."""

    #: What clients may do (read-only, devices, setid bits, privileged xattrs): `policy_of`.
    policy: OperationPolicy = DEFAULT_POLICY
    max_msize: int = 512 * 1024
    #: Fids one connection may hold; past it Tattach/Twalk/... answer EMFILE (and a log line).
    max_fids: int = 65536
    #: Requests one connection may have in flight; past it the session stops reading (backpressure).
    max_inflight: int = 256
    #: Bytes of request and reply buffers one connection may hold in flight (see ninep.server.limits);
    #: past it the session stops reading until replies drain.
    max_conn_memory: int = 64 * 1024 * 1024
    #: Connections the server serves at once; more are refused (EUSERS to their Tversion).
    max_connections: int = 1024
    trace: bool = False
    #: Let a channel that can (virtqueues: transports.base.DirectIO) answer Tread/Twrite on open
    #: files itself. Off with trace (every request must reach the session to be logged).
    direct_io: bool = True
    #: Grace period for in-flight requests at shutdown.
    drain_seconds: float = 3.0
    #: TLS client subject (RFC 4514) → the export and uid it is held to (ninep.server.identity).
    tls_identities: dict[str, IdentityRule] = field(default_factory=dict)


class Session:
    def __init__(self, exports: ExportTable | Backend, channel: Channel, handlers: HandlerTables,
                 options: SessionOptions | None = None, listener: str = "") -> None:
        #: Shared with the server (and replaced in place on reload); a bare Backend is one export.
        self.exports = exports if isinstance(exports, ExportTable) else ExportTable.single(exports)
        #: The name of the listener this connection came in on (export access rules use it).
        self.listener = listener
        self.channel = channel
        self.options = options or SessionOptions()
        self.conn_id = next(_connection_ids)
        self.dialect: str | None = None
        self.codec: Codec = codec_for(V9P2000_L)
        self.msize = 0
        self.fids = FidTable()
        self.inflight: dict[int, Request] = {}
        #: Tasks parked until a request makes them the reader (`_hand_over`); the connection's
        #: nursery (set by `run`) starts more when none is parked; `_ended` is set when it ends.
        self._parked: list[trio.lowlevel.Task] = []
        self._nursery: trio.Nursery
        self._ended = trio.Event()
        #: Set when a request finishes while `_admit` waits for `max_inflight` to allow another.
        self._slot_freed: trio.Event | None = None
        self._parking = True  # False once the connection ends: tasks exit after their request
        self._memory = MemoryBudget(self.options.max_conn_memory, f"connection {self.conn_id}")
        self._slots_warned = False
        self._tables = handlers
        self._handlers: Mapping[int, Handler] = {}
        self._closing = False
        #: `ZeroCopyWrites` channels: large Twrite data stays in the peer's memory.
        self._take_payload: Callable[[int], Payload | None] | None = getattr(channel, "take_payload", None)
        #: `DirectIO` channels answer Tread/Twrite on registered open fids themselves.
        self._direct_io: DirectIO | None = channel if hasattr(channel, "direct_open") else None  # type: ignore[assignment]
        self.stats = ConnStats(self.conn_id, channel.peer)

    # --- public --------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """Who the client is, for logs: its peer address and TLS subject if it has one."""
        tls = getattr(self.channel, "identity", None)
        return f"{self.channel.peer} ({tls})" if tls else self.channel.peer

    def iounit(self, fid: Fid) -> int:
        bs = max(fid.export.backend.info.block_size, 512)
        unit = self.msize - IOHDRSZ
        return unit - unit % bs if unit >= bs else unit

    async def run(self) -> None:
        """Serve the channel until the peer goes away; then cancel what is in flight and clunk
        every fid."""
        log.info("connection %d from %s%s", self.conn_id, self.identity, f" on {self.listener}" if self.listener else "")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if not await self._lead():
                        await self._ended.wait()  # another task reads now, until the end
                finally:
                    await self._end()
        finally:
            with trio.CancelScope(shield=True):
                await self.clunk_all()

    async def drain(self) -> None:
        """Graceful shutdown: stop taking requests, let in-flight ones finish for a while, then
        cancel them."""
        self._closing = True
        self.fids.withdraw_direct()  # the channel must not go on serving reads and writes
        with trio.move_on_after(self.options.drain_seconds):
            for req in list(self.inflight.values()):
                await req.done.wait()
        self.interrupt_all()

    async def _reap(self, grace: float) -> None:
        with trio.move_on_after(grace) as waiting:
            waiting.shield = True
            for req in list(self.inflight.values()):
                await req.done.wait()
        for req in list(self.inflight.values()):
            if req.scope is not None:
                log.warning("connection %d: abandoning %s (tag %d) after %.1f s", self.conn_id,
                            T(req.msgtype).name if req.msgtype in T._value2member_map_ else req.msgtype, req.tag, grace)
                req.scope.shield = False
                req.scope.cancel()

    def interrupt(self, req: Request) -> None:
        req.flushed = True
        if req.wait_scope is not None:
            req.wait_scope.cancel()

    def interrupt_all(self) -> None:
        for req in list(self.inflight.values()):
            self.interrupt(req)

    async def interruptible(self, tag: int, wait: Callable[[], Awaitable[object]]) -> None:
        """Runs `wait()` so that Tflush of `tag` (or the connection ending) interrupts it, in
        which case the request ends with no reply. Only for waits with no side effects."""
        req = self.inflight.get(tag)
        if req is None or req.flushed:
            raise Flushed
        with trio.CancelScope() as scope:
            req.wait_scope = scope
            try:
                await wait()
            finally:
                req.wait_scope = None
        if scope.cancelled_caught or req.flushed:
            raise Flushed

    async def clunk_all(self) -> None:
        for fid in self.fids.clear():
            await release_fid(fid, self.conn_id)

    # --- fids ---------------------------------------------------------------------------------

    def fid(self, number: int) -> Fid:
        f = self.fids.get(number)
        if f is None:
            raise OSError(errno.EBADF, f"unknown fid {number}")
        return f

    def new_fid(self, number: int, fid: Fid) -> None:
        if number in self.fids:
            raise OSError(errno.EBADF, f"fid {number} already in use")
        if len(self.fids) >= self.options.max_fids:
            log.warning("connection %d: fid limit %d reached", self.conn_id, self.options.max_fids)
            raise OSError(errno.EMFILE, "too many fids on this connection")
        self.fids.add(number, fid)

    def take_fid(self, number: int) -> Fid:
        """Takes fid `number` out of the table (EBADF if unknown), its direct I/O withdrawn; the
        caller ends it on the backend (`ninep.server.release.release_fid`)."""
        self.fid(number)
        return self.fids.remove(number)

    def cred_for(self, fid: Fid, gid: int | None = None) -> Cred:
        return fid.cred if gid is None else Cred(fid.cred.uid, gid, fid.cred.uname)

    def mark_answered(self, tag: int) -> None:
        req = self.inflight.get(tag)
        if req is not None:
            req.answered = True

    def offer_direct(self, number: int, fid: Fid) -> None:
        """Lets a DirectIO channel answer Tread/Twrite on the fid `number`, just opened, itself,
        with the access its open granted. Nothing happens when the channel or the backend cannot
        (the backend has no `direct_fd`, or the file's fd is parked), for directories, or when
        every request must reach the session (trace)."""
        channel, f = self._direct_io, fid.open
        if channel is None or f is None or not self.options.direct_io or self.options.trace:
            return
        if self.fids.get(number) is not fid or fid.direct is not None or fid.node.qid.type & QTDIR:
            return
        backend = fid.export.backend
        lend = getattr(backend, "direct_fd", None)
        got = lend(f) if lend is not None else None
        if got is None:
            return
        fd, inline_writes = got
        access = fid.open_flags & L_O_ACCMODE
        readable = access in (L_O_RDONLY, L_O_RDWR)
        # Direct writes run on the event loop's thread: only where the backend runs its own there.
        writable = (access in (L_O_WRONLY, L_O_RDWR) and inline_writes
                    and not (policy_of(fid).readonly or backend.info.readonly))
        if channel.direct_open(number, fd, readable, writable):
            # The fid table runs it when the fid leaves (ninep.server.fids.FidTable).
            fid.direct = partial(channel.direct_close, number)

    def load(self) -> tuple[int, int, int]:
        """Fids held, how many of them are open, requests in flight (the metrics' gauges)."""
        return len(self.fids), sum(1 for f in self.fids if f.open is not None), len(self.inflight)

    def sync_stats(self) -> ConnStats:
        """`stats` with the requests a DirectIO channel answered itself counted in."""
        if self._direct_io is not None:
            self.stats.absorb(self._direct_io.direct_stats())
        return self.stats

    def write_payload(self, msg: m.Twrite) -> Payload | None:
        """The data of a Twrite that the channel left in the peer's memory (it arrived with count
        0; see `transports.base.ZeroCopyWrites`), once; None for an ordinary Twrite."""
        if self._take_payload is None or len(msg.data):
            return None
        return self._take_payload(msg.tag)


    # --- dispatch -----------------------------------------------------------------------------

    async def _lead(self) -> bool:
        """Reads requests and runs each in this task until one has to wait; then another task
        takes over reading (`_hand_over`) and this one returns False once its request is done.
        True when the connection ended (the end is logged here, once)."""
        peer = self.identity
        # Once set, another task reads and the end of the connection is not this task's to handle.
        handed_over = False

        def hand_over() -> None:
            nonlocal handed_over
            handed_over = True
            self._hand_over()

        try:
            while True:
                buf = await self.channel.receive()
                req = await self._admit(buf)
                if req is None:
                    continue
                # Shielded: only `interruptible` waits inside may be cut short (see the module
                # docstring); `_reap` cancelling it as a last resort ends the request.
                with trio.CancelScope(shield=True) as scope:
                    req.scope = scope
                    await await_noting_suspension(self._run_request(buf, req), hand_over)
                if handed_over:
                    return False
        except trio.EndOfChannel:
            log.info("connection %d from %s closed", self.conn_id, peer)
        except FramingError as e:
            log.warning("connection %d from %s: dropping, framing lost: %s", self.conn_id, peer, e)
        except trio.BrokenResourceError as e:
            log.info("connection %d from %s broken: %s", self.conn_id, peer, e)
        finally:
            if not handed_over:  # also when cancelled (the server shutting down)
                await self._end()
        return True

    async def _end(self) -> None:
        """The connection is over. Done by the reading task, which is the one task sure not to
        be inside a request: waiting requests are interrupted, parked tasks dismissed, and the
        others may finish their backend call within a grace period — a backend that never
        answers (a wedged remote or proxy helper) must not keep a dead connection, or the
        server, alive. Once."""
        if self._ended.is_set():
            return
        self._ended.set()
        self.interrupt_all()
        self._dismiss_parked()
        await self._reap(self.options.drain_seconds)

    #: Parked tasks kept per connection; more finish instead of parking.
    MAX_PARKED = 16

    def _hand_over(self) -> None:
        """Makes another task the reader: a parked one, or a new one."""
        if self._parked:
            trio.lowlevel.reschedule(self._parked.pop(), outcome.Value(True))
        elif self._parking:
            self._nursery.start_soon(self._spare)

    async def _spare(self) -> None:
        """An extra task of the connection: reads while it is the reader, parks in between."""
        while not await self._lead():
            if not await self._park():
                return

    async def _park(self) -> bool:
        """Waits to be made the reader (True), or for the connection to end (False)."""
        if not self._parking or len(self._parked) >= self.MAX_PARKED:
            return False
        task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked.remove(task)  # cancelled while parked: nothing was handed to it
            return trio.lowlevel.Abort.SUCCEEDED

        self._parked.append(task)
        promoted: bool = await trio.lowlevel.wait_task_rescheduled(abort)
        return promoted

    def _dismiss_parked(self) -> None:
        self._parking = False
        parked, self._parked = self._parked, []
        for task in parked:
            trio.lowlevel.reschedule(task, outcome.Value(False))

    async def _admit(self, buf: memoryview) -> Request | None:
        """The request `buf` carries, registered as in flight once the limits allow; None when
        it was answered here (Tversion, errors before any version, shutting down)."""
        _, msgtype, tag = HEADER.unpack_from(buf, 0)
        if msgtype == T.Tversion:
            await self._version(buf, tag)
            return None
        if self.dialect is None:
            await self._send_error_raw(tag, errno.EPROTO, "Tversion must come first", V9P2000)
            return None
        if self._closing:
            await self.send_error(tag, errno.ESHUTDOWN)
            return None
        old = self.inflight.get(tag)
        if old is not None:
            if not old.answered:
                raise FramingError(f"tag {tag} reused while still in flight")
            await old.done.wait()
        if len(self.inflight) >= self.options.max_inflight and not self._slots_warned:
            self._slots_warned = True
            log.info("connection %d: max-inflight %d reached: not reading more until replies drain",
                     self.conn_id, self.options.max_inflight)
        # Tflush waits neither for a slot nor for memory: it is what frees the slots of requests
        # that wait (a connection whose every slot holds a blocking lock must still read the
        # flushes). Flushes in flight are bounded by the tag space.
        flush = msgtype == T.Tflush
        while not flush and len(self.inflight) >= self.options.max_inflight:
            self._slot_freed = trio.Event()
            await self._slot_freed.wait()
        cost = 0 if flush else request_cost(buf, msgtype, self.msize)
        if not flush:
            await self._memory.acquire(cost)
        req = Request(tag, msgtype, started=time.perf_counter(), cost=cost)
        self.inflight[tag] = req
        return req

    async def _run_request(self, buf: memoryview, req: Request) -> None:
        reply: m.Message | Sent | None = None
        err: tuple[int, str] | None = None
        try:
            # In a shielded scope (`_lead`): only `interruptible` waits may be cut short.
            try:
                msg = self.codec.decode(buf)
                if self.options.trace:
                    trace_log.info("%d <- %s", self.conn_id, msg)
                handler = self._handlers.get(req.msgtype)
                if handler is None:
                    name = T(req.msgtype).name if req.msgtype in T._value2member_map_ else str(req.msgtype)
                    raise OSError(errno.EOPNOTSUPP, f"{name} not supported in {self.dialect}")
                reply = await handler(self, msg)
            except Flushed:
                pass
            except Refused as e:
                name = T(req.msgtype).name if req.msgtype in T._value2member_map_ else str(req.msgtype)
                e.log(f"connection {self.conn_id} from {self.identity}", name)
                err = (e.errno or errno.EPERM, e.reason)
            except DecodeError as e:
                log.info("connection %d: malformed message (type %s tag %s): %s", self.conn_id, req.msgtype, req.tag, e)
                err = (e.errno, str(e))
            except OSError as e:
                err = (e.errno or errno.EIO, e.strerror or os.strerror(e.errno or errno.EIO))
            except (ValueError, OverflowError) as e:
                # Values a backend refused outright (a name with NUL, an out-of-range number).
                err = (errno.EINVAL, str(e))
            except Exception:
                log.exception("connection %d: request %s failed", self.conn_id, T(req.msgtype).name)
                err = (errno.EIO, "internal error")
            req.answered = reply is not None or err is not None
            if isinstance(reply, m.Message):
                reply.tag = req.tag
                await self.send(reply)
            elif err is not None:
                await self.send_error(req.tag, err[0], err[1])
            if self.options.trace:
                ms = (time.perf_counter() - req.started) * 1000
                what = reply if reply is not None else (f"error {err[0]} {err[1]}" if err else "flushed, no reply")
                trace_log.info("%d -> %s (%.3f ms)", self.conn_id, what, ms)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is going away; run() cleans up
        finally:
            self.stats.done(req.msgtype, err[0] if err else 0, reply, req.started)
            if self.inflight.get(req.tag) is req:
                del self.inflight[req.tag]
            req.finish()
            self._memory.release(req.cost)
            if self._slot_freed is not None:
                self._slot_freed.set()
                self._slot_freed = None

    # --- replies ------------------------------------------------------------------------------

    async def send(self, msg: m.Message) -> None:
        await self.channel.send(self.codec.encode(msg))

    async def send_error(self, tag: int, err: int, text: str | None = None) -> None:
        await self._send_error_raw(tag, err, text or os.strerror(err), self.dialect or V9P2000)

    async def _send_error_raw(self, tag: int, err: int, text: str, dialect: str) -> None:
        await self.channel.send(encode_error(tag, err, dialect))

    # --- version ------------------------------------------------------------------------------

    async def _version(self, buf: memoryview, tag: int) -> None:
        try:
            tv = codec_for(V9P2000).decode(buf)
            assert isinstance(tv, m.Tversion)
        except DecodeError as e:
            raise FramingError(f"malformed Tversion: {e}") from None
        # Tversion aborts everything outstanding and resets the fid table.
        self.interrupt_all()
        for req in list(self.inflight.values()):
            await req.done.wait()
        await self.clunk_all()
        requested = tv.version
        if requested in (V9P2000, V9P2000_U, V9P2000_L):
            version = requested
        elif requested.startswith(V9P2000):
            version = V9P2000
        else:
            version = VERSION_UNKNOWN
        if self.options.trace:
            trace_log.info("%d <- %s", self.conn_id, tv)
        if version != VERSION_UNKNOWN and tv.msize < MIN_MSIZE:
            log.info("connection %d: msize %d below the minimum %d", self.conn_id, tv.msize, MIN_MSIZE)
            await self._send_error_raw(tag, errno.EMSGSIZE, "msize too small", version)
            return
        msize = min(tv.msize, self.options.max_msize, self.channel.max_message_size)
        reply = m.Rversion(msize, version, tag=tag)
        await self.channel.send(codec_for(V9P2000).encode(reply))
        if self.options.trace:
            trace_log.info("%d -> %s", self.conn_id, reply)
        if version == VERSION_UNKNOWN:
            self.dialect = None
            return
        self.dialect = version
        self.codec = codec_for(version)
        self.msize = msize
        self.channel.set_msize(msize)
        self._handlers = self._tables[version]
        log.info("connection %d: %s, msize %d", self.conn_id, version, msize)


def encode_error(tag: int, err: int, dialect: str) -> list[Buffer]:
    """The error reply for `tag` in `dialect`: Rlerror for 9P2000.L, else Rerror."""
    if dialect == V9P2000_L:
        msg: m.Message = m.Rlerror(err, tag=tag)
    else:
        # Always the standard strerror text: 9P2000 clients (Linux, plan9port) map the string
        # back to an errno with a table of exactly these strings; the detail stays in the logs.
        msg = m.Rerror(os.strerror(err), err, tag=tag)
    return codec_for(dialect).encode(msg)
