"""A hostile 9P peer for fuzzing a whole Session, shared by the hypothesis and atheris fuzzers.

`run_script` serves one Backend with a real `Server` over a socketpair (the `fd:` transport, as
Linux `trans=fd` sees it) and plays a raw peer that sends a script of frames in batches: valid
and mutated T-messages of any dialect, pipelined, with fids and tags drawn from small pools so
that fid reuse, clunk-then-use, walks from open fids, flushes of unknown tags, duplicate tags in
flight, Tversion mid-stream and frames over msize all happen. It checks what a client relies on:

- every reply answers a request in flight with that tag, with the matching R-type or an error,
  decodes, and fits the negotiated msize;
- every request gets its reply, unless it was flushed or aborted by Tversion (the peer flushes
  whatever is still unanswered after a while; every flush must be answered: no hang);
- the server closes the connection only after a framing violation the peer really committed
  (bad size, duplicate tag in flight, malformed Tversion), and then logs it;
- nothing is logged at ERROR (an exception that escaped a handler), the connection task ends,
  the backend holds no node or open file afterwards and the process no extra fd;
- a fresh connection to the same server is served.

Failures raise AssertionError (or trio.TooSlowError for a hang) with the step that broke.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from fs_backends.base import Backend
from ninep.client import Client
from ninep.protocol import messages as m
from ninep.protocol.codec import DecodeError, codec_for
from ninep.protocol.numbers import DIALECTS, MIN_MSIZE, V9P2000, V9P2000_L, VERSION_UNKNOWN
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.stream import FdPairChannel

#: The server's msize cap in the fuzzers: small, so frames over it are easy to make.
MAX_MSIZE = 16384
#: Tags at or above this are the peer's own flushes; scripts use the ones below (and NOTAG).
FLUSH_TAG_BASE = 0xF000
RLERROR, RERROR, RVERSION, RFLUSH = 7, 107, 101, 109
TVERSION, TFLUSH = 100, 108


@dataclass
class Frame:
    """One thing the peer sends: an encoded (possibly mutated) frame."""

    wire: bytes


Batch = list[Frame]


@dataclass
class _Sent:
    seq: int
    tag: int
    msgtype: int
    #: For a well-formed Tflush: the tag it flushes (kept per request: a script may reuse the
    #: flush's own tag for other requests before the Rflush comes).
    oldtag: int | None = None


@dataclass
class _Peer:
    sock: trio.socket.SocketType
    replies: trio.MemoryReceiveChannel[bytes | None]
    pending: list[_Sent] = field(default_factory=list)
    seq: int = 0
    limit: int = MAX_MSIZE  # frames larger than this may be refused (channel limit or msize)
    msize: int | None = None  # reply size cap once an Rversion was seen
    may_close: list[str] = field(default_factory=list)
    #: A frame whose size field lies: what follows cannot be framed as the peer meant it.
    desynced: bool = False
    closed: bool = False
    log: list[str] = field(default_factory=list)

    def outstanding(self, tag: int) -> bool:
        return any(p.tag == tag for p in self.pending)


def _flush_tags() -> Callable[[], int]:
    counter = iter(range(FLUSH_TAG_BASE, 0xFFFF))
    return lambda: next(counter)


async def _reader(sock: trio.socket.SocketType, out: trio.MemorySendChannel[bytes | None]) -> None:
    buf = b""
    async with out:
        while True:
            while len(buf) >= 4:
                (size,) = struct.unpack_from("<I", buf)
                assert size >= 7, f"server sent a frame of size {size}"
                if len(buf) < size:
                    break
                await out.send(buf[:size])
                buf = buf[size:]
            try:
                data = await sock.recv(1 << 16)
            except (OSError, trio.ClosedResourceError):  # reset, or the peer closed its own end
                data = b""
            if not data:
                await out.send(None)
                return
            buf += data


def _note_sent(peer: _Peer, wire: bytes) -> None:
    """Updates the peer's model for a frame it is about to send."""
    peer.seq += 1
    size = len(wire)
    if size < 7 or struct.unpack_from("<I", wire)[0] != size:
        # The stream is framed by the size field: anything else desynchronises it.
        peer.may_close.append(f"frame #{peer.seq} has a bad size field")
        peer.desynced = True
        return
    _, msgtype, tag = struct.unpack_from("<IBH", wire)
    if size > peer.limit:
        peer.may_close.append(f"frame #{peer.seq} of {size} bytes over the limit {peer.limit}")
    if peer.outstanding(tag):
        peer.may_close.append(f"frame #{peer.seq} reuses tag {tag} in flight")
    if msgtype == TVERSION:
        try:
            tv = codec_for(V9P2000).decode(wire)
            assert isinstance(tv, m.Tversion)
            if tv.msize >= MIN_MSIZE:
                peer.limit = min(peer.limit, tv.msize)
        except DecodeError:
            peer.may_close.append(f"frame #{peer.seq} is a malformed Tversion")
    oldtag = struct.unpack_from("<H", wire, 7)[0] if msgtype == TFLUSH and size == 9 else None
    peer.pending.append(_Sent(peer.seq, tag, msgtype, oldtag))


def _check_reply(peer: _Peer, r: bytes) -> None:
    size, rtype, tag = struct.unpack_from("<IBH", r)
    assert size == len(r)
    match = next((p for p in peer.pending if p.tag == tag), None)
    assert match is not None, f"reply type {rtype} for tag {tag}, which is not in flight"
    assert rtype in (match.msgtype + 1, RLERROR, RERROR), (
        f"reply type {rtype} to request type {match.msgtype} (tag {tag})"
    )
    if peer.msize is not None:
        assert size <= peer.msize, f"reply of {size} bytes over msize {peer.msize}"
    decoded = False
    for d in DIALECTS:
        try:
            codec_for(d).decode(r)
            decoded = True
            break
        except DecodeError:
            pass
    assert decoded, f"undecodable reply {r[:32]!r}"
    peer.pending.remove(match)
    if rtype == RVERSION:
        rv = codec_for(V9P2000).decode(r)
        assert isinstance(rv, m.Rversion)
        if rv.version != VERSION_UNKNOWN:  # "unknown" leaves the session without a dialect
            peer.msize = rv.msize
            peer.limit = min(peer.limit, rv.msize)
        # Tversion aborts everything that was in flight before it.
        peer.pending = [p for p in peer.pending if p.seq > match.seq]
    if rtype == RFLUSH and match.oldtag is not None:
        # Requests with the flushed tag sent before this flush get no reply from now on.
        peer.pending = [p for p in peer.pending if not (p.tag == match.oldtag and p.seq < match.seq)]


async def _collect(peer: _Peer, timeout: float) -> bool:
    """Takes replies until nothing is pending; False on timeout. Sets peer.closed on EOF."""
    with trio.move_on_after(timeout):
        while peer.pending and not peer.closed:
            r = await peer.replies.receive()
            if r is None:
                peer.closed = True
                break
            _check_reply(peer, r)
        return True
    return False


async def _send(peer: _Peer, wire: bytes) -> None:
    if peer.closed:
        return
    _note_sent(peer, wire)
    try:
        await peer.sock.send(wire)
    except OSError:
        peer.closed = True


async def _play(peer: _Peer, batches: list[Batch], settle: float) -> None:
    flush_tag = _flush_tags()
    for n, batch in enumerate(batches):
        for fr in batch:
            await _send(peer, fr.wire)
        if peer.desynced:
            # The server now frames our bytes differently from us: it may wait for the rest of
            # a frame that never comes, or answer tags we never sent. Whatever it does, it must
            # end the connection cleanly when we go away (checked by the caller).
            with trio.move_on_after(0.2):
                while await peer.replies.receive() is not None:
                    pass
                peer.closed = True
            peer.log.append(f"batch {n}: desynchronised the stream")
            return
        if await _collect(peer, settle):
            if peer.closed:
                break
            continue
        # Something waits (a blocking lock, say): flush everything unanswered. Each flush is
        # answered, so this must finish.
        for p in list(peer.pending):
            if p.tag < FLUSH_TAG_BASE:
                await _send(peer, struct.pack("<IBHH", 9, TFLUSH, flush_tag(), p.tag))
        with trio.fail_after(30):
            while not await _collect(peer, 30):
                pass
        peer.log.append(f"batch {n}: flushed the stragglers")
        if peer.closed:
            break
    if not peer.closed and peer.pending:
        with trio.fail_after(30):
            await _collect(peer, 30)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def backend_is_idle(backend: Backend) -> None:
    """Asserts the backend holds no node and no open file (its own tables)."""
    nodes = getattr(backend, "_nodes", None)
    if nodes is None:
        nodes = backend._live  # type: ignore[attr-defined]
    assert not nodes, f"{len(nodes)} nodes still held after the connection ended"
    opened = getattr(backend, "open_files", None)
    if opened is None:
        opened = len(backend._open)  # type: ignore[attr-defined]
    assert opened == 0, f"{opened} files still open after the connection ended"


def _serve_socketpair(server: Server, nursery: trio.Nursery) -> tuple[socket.socket, trio.Event]:
    """One connection of `server` over an `fd:` channel on a socketpair: the peer's socket, and an
    event set once the server has handled the connection and closed its side."""
    a, b = socket.socketpair()
    server_side = FdPairChannel(a.fileno(), a.fileno())
    a.close()
    done = trio.Event()

    async def serve() -> None:
        try:
            await server.handle(server_side)
        finally:
            with trio.CancelScope(shield=True):
                await server_side.aclose()
            done.set()

    nursery.start_soon(serve)
    return b, done


async def _fresh_connection_works(server: Server, nursery: trio.Nursery) -> None:
    b, done = _serve_socketpair(server, nursery)
    client_side = FdPairChannel(b.fileno(), b.fileno())
    b.close()
    with trio.fail_after(30):
        async with Client.connect(client_side, dialect=V9P2000_L, msize=8192) as c:
            root = await c.attach()
            f, _ = await c.walk(root, [])
            await c.clunk(f)
            await c.clunk(root)
        await done.wait()


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []
        self.framing: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(f"{record.name}: {msg}")
        if "framing lost" in msg:
            self.framing.append(msg)


def run_script(make_backend: Callable[[], Backend], batches: list[Batch], *, settle: float = 2.0,
               max_inflight: int = 32) -> list[str]:
    """Plays `batches` against a fresh server; returns notes on what happened (for debugging)."""
    records = _ErrorRecords()
    ninep_log = logging.getLogger("ninep")
    ninep_log.addHandler(records)
    old_level = ninep_log.level
    if ninep_log.getEffectiveLevel() > logging.INFO:
        ninep_log.setLevel(logging.INFO)
    try:
        return trio.run(_run, make_backend, batches, settle, records, max_inflight)
    finally:
        ninep_log.removeHandler(records)
        ninep_log.setLevel(old_level)


async def _run(make_backend: Callable[[], Backend], batches: list[Batch], settle: float,
               records: _ErrorRecords, max_inflight: int) -> list[str]:
    fds_before = _open_fds()
    backend = make_backend()
    server = Server(backend, SessionOptions(max_msize=MAX_MSIZE, drain_seconds=1.0, max_inflight=max_inflight))
    notes: list[str] = []
    async with trio.open_nursery() as nursery:
        b, handled = _serve_socketpair(server, nursery)
        sock = trio.socket.from_stdlib_socket(b)
        send, recv = trio.open_memory_channel[Any](1 << 12)
        nursery.start_soon(_reader, sock, send)
        peer = _Peer(sock, recv)
        try:
            await _play(peer, batches, settle)
        finally:
            sock.close()
        notes += peer.log
        if peer.closed:
            assert peer.may_close, f"the server closed the connection for no reason; {peer.log}"
            notes.append(f"closed: {peer.may_close[0]}")
        with trio.fail_after(30):
            await handled.wait()
        if peer.closed:
            assert records.framing, "the connection was dropped without a log line"
        assert not records.errors, f"errors logged: {records.errors}"
        backend_is_idle(backend)
        await _fresh_connection_works(server, nursery)
        backend_is_idle(backend)
        assert not records.errors, f"errors logged: {records.errors}"
        nursery.cancel_scope.cancel()
    await backend.aclose()
    fds_after = _open_fds()
    assert fds_after == fds_before, f"{fds_after - fds_before} fds leaked"
    return notes
