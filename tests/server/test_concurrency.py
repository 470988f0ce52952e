"""Many connections and many requests in flight: 64 concurrent clients, POSIX locks between
connections (conflicts, getlock, release on clunk and disconnect), a blocked lock cancelled by
Tflush, replies out of order, and a client vanishing mid-request without leaking fds or fids."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from ninep.client import Client
from ninep.protocol import messages as m
from ninep.protocol.codec import HEADER
from ninep.protocol.numbers import (
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_RDONLY,
    L_O_RDWR,
    LOCK_BLOCKED,
    LOCK_FLAGS_BLOCK,
    LOCK_SUCCESS,
    LOCK_TYPE_RDLCK,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
    V9P2000_L,
)
from tests.kits.e2e import fails, make_file, names_in, open_rw
from tests.kits.harness import client_for, open_fds


class Recording:
    """A client Channel that remembers (type, tag) of every message received."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[tuple[int, int]] = []
        self.peer = inner.peer
        self.max_message_size = inner.max_message_size

    async def receive(self) -> memoryview:
        buf = await self.inner.receive()
        _, msgtype, tag = HEADER.unpack_from(buf, 0)
        self.seen.append((msgtype, tag))
        return buf

    async def send(self, parts: Sequence[Any]) -> None:
        await self.inner.send(parts)

    def set_msize(self, msize: int) -> None:
        self.inner.set_msize(msize)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_64_concurrent_connections(serve) -> None:  # type: ignore[no-untyped-def]
    n = 64

    connecting = trio.Semaphore(4)  # vhost-user listens with a backlog of 4: no connect storms
    all_open = trio.Event()
    opened: list[int] = []

    async def one(connect: Any, i: int, done: list[int]) -> None:
        async with connecting:
            channel = await connect()
        async with Client.connect(channel, msize=65536) as c:
            root = await c.attach()
            # Every connection is open (and attached) before any starts working.
            opened.append(i)
            if len(opened) == n:
                all_open.set()
            await all_open.wait()
            # A metadata mix: mkdir, create, symlink, rename, unlink, chmod, xattr, list, read.
            await c.mkdir(root, f"c{i}")
            d, _ = await c.walk(root, [f"c{i}"])
            for j in range(3):
                await make_file(c, d, f"f{j}", f"{i}:{j}".encode())
            await c.symlink(d, "ln", "f0")
            await c.renameat(d, "f1", d, "renamed")
            await c.unlinkat(d, "f0")
            f, _ = await c.walk(d, ["f2"])
            await c.setattr(f, 1, mode=0o600)
            await c.xattr_set(f, "user.i", str(i).encode())
            a = await c.getattr(f)
            assert a.mode & 0o777 == 0o600
            assert await names_in(c, d) == {"renamed", "f2", "ln"}
            assert await c.read_file(d, "renamed") == f"{i}:1".encode()
            done.append(i)

    async def scenario(server: Any, connect: Any) -> None:
        done: list[int] = []
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, connect, i, done)
        assert sorted(done) == list(range(n))
        async with client_for(connect) as c:
            root = await c.attach()
            assert await names_in(c, root) == {f"c{i}" for i in range(n)}

    serve(scenario, timeout=120)


def test_locks_conflict_between_connections_and_vanish_on_clunk_and_disconnect(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as a, client_for(connect) as b:
            ra, rb = await a.attach(), await b.attach()
            await make_file(a, ra, "f", b"x" * 100)
            fa = await open_rw(a, ra, ["f"])
            fb = await open_rw(b, rb, ["f"])
            assert await a.lock(fa, LOCK_TYPE_WRLCK, 10, 20, proc_id=11, client_id="hostA") == LOCK_SUCCESS
            # Non-blocking conflicting requests answer LOCK_BLOCKED (what Linux's F_SETLK maps to EAGAIN).
            assert await b.lock(fb, LOCK_TYPE_WRLCK, 0, 0, proc_id=22, client_id="hostB") == LOCK_BLOCKED
            assert await b.lock(fb, LOCK_TYPE_RDLCK, 15, 1, proc_id=22, client_id="hostB") == LOCK_BLOCKED
            # Outside the locked range there is no conflict.
            assert await b.lock(fb, LOCK_TYPE_WRLCK, 30, 5, proc_id=22, client_id="hostB") == LOCK_SUCCESS
            assert await b.lock(fb, LOCK_TYPE_UNLCK, 30, 5, proc_id=22, client_id="hostB") == LOCK_SUCCESS
            # Getlock reports the conflicting lock and its owner.
            g = await b.getlock(fb, LOCK_TYPE_RDLCK, 0, 0, proc_id=22, client_id="hostB")
            assert (g.type, g.start, g.length, g.proc_id, g.client_id) == (LOCK_TYPE_WRLCK, 10, 20, 11, "hostA")
            g = await b.getlock(fb, LOCK_TYPE_WRLCK, 0, 5, proc_id=22, client_id="hostB")
            assert g.type == LOCK_TYPE_UNLCK
            # The holder itself sees no conflict with its own lock.
            assert (await a.getlock(fa, LOCK_TYPE_WRLCK, 0, 0, proc_id=11, client_id="hostA")).type == LOCK_TYPE_UNLCK
            # Clunking the fid the lock was taken through releases it.
            await a.clunk(fa)
            assert await b.lock(fb, LOCK_TYPE_WRLCK, 0, 0, proc_id=22, client_id="hostB") == LOCK_SUCCESS
            assert await b.lock(fb, LOCK_TYPE_UNLCK, 0, 0, proc_id=22, client_id="hostB") == LOCK_SUCCESS
            # Read locks share.
            fa = await open_rw(a, ra, ["f"])
            assert await a.lock(fa, LOCK_TYPE_RDLCK, proc_id=11, client_id="hostA") == LOCK_SUCCESS
            assert await b.lock(fb, LOCK_TYPE_RDLCK, proc_id=22, client_id="hostB") == LOCK_SUCCESS
            assert await b.lock(fb, LOCK_TYPE_UNLCK, proc_id=22, client_id="hostB") == LOCK_SUCCESS
            # Locks need an open fid.
            plain, _ = await b.walk(rb, ["f"])
            await fails(errno.EBADF, b.lock(plain, LOCK_TYPE_RDLCK))
        # Connection A went away holding a read lock: a new connection can write-lock (once the
        # server has seen the disconnect).
        await _settle(server)
        async with client_for(connect) as c:
            f = await open_rw(c, await c.attach(), ["f"])
            assert await c.lock(f, LOCK_TYPE_WRLCK, proc_id=33, client_id="hostC") == LOCK_SUCCESS
            async with client_for(connect) as d:
                g = await open_rw(d, await d.attach(), ["f"])
                assert await d.lock(g, LOCK_TYPE_WRLCK, proc_id=44, client_id="hostD") == LOCK_BLOCKED
        # ...and C's lock vanished when C disconnected without unlocking.
        await _settle(server)
        async with client_for(connect) as e:
            f = await open_rw(e, await e.attach(), ["f"])
            assert await e.lock(f, LOCK_TYPE_WRLCK, proc_id=55, client_id="hostE") == LOCK_SUCCESS

    serve(scenario)


_HOST_LOCKER = """
import fcntl, os, struct, sys
# argv: PATH TYPE START LEN ...: one classic POSIX lock each (the way a host program locks)
fds = []
args = sys.argv[1:]
for i in range(0, len(args), 4):
    path, kind, start, length = args[i], args[i + 1], int(args[i + 2]), int(args[i + 3])
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_SH if kind == "r" else fcntl.LOCK_EX, length, start)
    fds.append(fd)
print("locked", flush=True)
sys.stdin.read()  # hold the locks until the test closes our stdin
"""


@contextlib.contextmanager
def host_locks(*specs: tuple[Path, str, int, int]) -> Iterator[int]:
    """A host process (not the server) holding fcntl locks (path, "r"|"w", start, length) until
    the block ends; yields its pid."""
    args = [str(a) for spec in specs for a in spec]
    proc = subprocess.Popen([sys.executable, "-c", _HOST_LOCKER, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def test_getlock_unlck_asks_for_any_conflicting_lock(serve) -> None:  # type: ignore[no-untyped-def]
    """A Tgetlock of type UNLCK is what Linux's client sends for every F_GETLK (fs/9p/vfs_file.c
    v9fs_file_getlock): "is there a conflicting lock on this range", i.e. a write-lock test.
    It reports read and write locks of other owners (other connections, host processes) with
    their range and owner, never the asker's own, and UNLCK with the asked range when free."""
    host = serve.kind != "memory"  # the memory backend has no host file to lock
    if host:
        for name in ("rd", "wr"):
            (serve.export / name).write_bytes(b"x" * 200)

    def me(c: Client, f: int, start: int = 0, length: int = 0) -> Any:
        return c.getlock(f, LOCK_TYPE_UNLCK, start, length, proc_id=7, client_id="guest")

    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as a, client_for(connect) as b:
            ra, rb = await a.attach(), await b.attach()
            await make_file(a, ra, "f", b"x" * 100)
            fa = await open_rw(a, ra, ["f"])
            fb = await open_rw(b, rb, ["f"], L_O_RDONLY)
            # No lock at all: UNLCK, echoing the request.
            g = await me(b, fb, 5, 10)
            assert (g.type, g.start, g.length, g.proc_id, g.client_id) == (LOCK_TYPE_UNLCK, 5, 10, 7, "guest")
            # A read lock of another connection conflicts with the write test: reported with its owner.
            assert await a.lock(fa, LOCK_TYPE_RDLCK, 10, 20, proc_id=11, client_id="hostA") == LOCK_SUCCESS
            g = await me(b, fb)
            assert (g.type, g.start, g.length, g.proc_id, g.client_id) == (LOCK_TYPE_RDLCK, 10, 20, 11, "hostA")
            assert (await me(b, fb, 30, 5)).type == LOCK_TYPE_UNLCK  # outside its range
            # ...a write lock too (to end of file: length 0).
            assert await a.lock(fa, LOCK_TYPE_WRLCK, 50, 0, proc_id=11, client_id="hostA") == LOCK_SUCCESS
            g = await me(b, fb, 60, 1)
            assert (g.type, g.start, g.length, g.proc_id, g.client_id) == (LOCK_TYPE_WRLCK, 50, 0, 11, "hostA")
            # The owner's own locks are not reported to it (same connection, proc_id, client_id)...
            g = await a.getlock(fa, LOCK_TYPE_UNLCK, 0, 0, proc_id=11, client_id="hostA")
            assert (g.type, g.start, g.length) == (LOCK_TYPE_UNLCK, 0, 0)
            # ...but another process on that connection sees them.
            g = await a.getlock(fa, LOCK_TYPE_UNLCK, 0, 0, proc_id=12, client_id="hostA")
            assert (g.type, g.proc_id) == (LOCK_TYPE_RDLCK, 11)
            # Truly invalid types and ranges are still refused.
            await fails(errno.EINVAL, b.getlock(fb, 3, 0, 0))
            await fails(errno.EINVAL, b.getlock(fb, LOCK_TYPE_UNLCK, 2**63, 1))
            if not host:
                return
            # Host processes' fcntl locks: type, range and pid; no client_id.
            with host_locks((serve.export / "rd", "r", 10, 20), (serve.export / "wr", "w", 100, 0)) as pid:
                frd = await open_rw(b, rb, ["rd"], L_O_RDONLY)
                fwr = await open_rw(b, rb, ["wr"], L_O_RDONLY)
                g = await me(b, frd)
                assert (g.type, g.start, g.length, g.proc_id, g.client_id) == (LOCK_TYPE_RDLCK, 10, 20, pid, "")
                assert (await me(b, frd, 0, 10)).type == LOCK_TYPE_UNLCK
                g = await me(b, fwr, 150, 1)
                assert (g.type, g.start, g.length, g.proc_id, g.client_id) == (LOCK_TYPE_WRLCK, 100, 0, pid, "")
                # A read-lock test still passes a host read lock by (the type asked is honoured).
                assert (await b.getlock(frd, LOCK_TYPE_RDLCK, 0, 0)).type == LOCK_TYPE_UNLCK

    serve(scenario)


def test_flush_cancels_a_blocked_lock(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as a:
            ra = await a.attach()
            await make_file(a, ra, "f")
            fa = await open_rw(a, ra, ["f"])
            assert await a.lock(fa, LOCK_TYPE_WRLCK, proc_id=1, client_id="A") == LOCK_SUCCESS
            rec = Recording(await connect())
            async with Client.connect(rec, dialect=V9P2000_L) as b:
                fb = await open_rw(b, await b.attach(), ["f"])
                # A blocking request waits on the server (sent raw so we know its tag).
                lock_tag = 77
                p_done = trio.Event()

                async def blocked() -> None:
                    try:
                        await b.rpc(m.Tlock(fb, LOCK_TYPE_WRLCK, LOCK_FLAGS_BLOCK, 0, 0, 2, "B"), tag=lock_tag)
                    finally:
                        p_done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(blocked)
                    await trio.sleep(0.2)
                    assert not p_done.is_set()  # still blocked
                    # Meanwhile the same connection is served: a blocked lock delays nothing.
                    with trio.fail_after(10):
                        assert (await b.getattr(fb)).size == 0
                    flush = await b.rpc(m.Tflush(lock_tag))
                    assert isinstance(flush, m.Rflush)
                    nursery.cancel_scope.cancel()
                await trio.sleep(0.1)
                assert (53, lock_tag) not in rec.seen  # no Rlock for the flushed request
                assert (109, flush.tag) in rec.seen
                flushed_at = rec.seen.index((109, flush.tag))
                assert all(tag != lock_tag for _, tag in rec.seen[flushed_at:])
                # The flushed request did not take the lock later: once A unlocks, a third
                # connection gets it at once.
                assert await a.lock(fa, LOCK_TYPE_UNLCK, proc_id=1, client_id="A") == LOCK_SUCCESS
                await trio.sleep(0.3)
                async with client_for(connect) as c:
                    fc = await open_rw(c, await c.attach(), ["f"])
                    assert await c.lock(fc, LOCK_TYPE_WRLCK, proc_id=3, client_id="C") == LOCK_SUCCESS
                # The tag is free again after Rflush: reusing it works.
                r = await b.rpc(m.Tgetattr(fb, 0x7FF), tag=lock_tag)
                assert isinstance(r, m.Rgetattr)

    serve(scenario)


def test_blocking_lock_is_granted_when_released_and_replies_come_out_of_order(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with a_holds_a_lock_b_has_the_file(connect) as (a, fa, b, fb):
            order: list[str] = []

            async def lock_b() -> None:
                status = await b.lock(fb, LOCK_TYPE_WRLCK, flags=LOCK_FLAGS_BLOCK, proc_id=2, client_id="B")
                order.append(f"lock:{status}")

            async def others() -> None:
                await trio.sleep(0.1)
                # Many requests after the blocked one, all answered while it still waits.
                async with trio.open_nursery() as n:
                    for _ in range(20):
                        n.start_soon(b.getattr, fb)
                    n.start_soon(b.read, fb, 0, 4)
                    n.start_soon(b.statfs, fb)
                order.append("others")
                await a.lock(fa, LOCK_TYPE_UNLCK, proc_id=1, client_id="A")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lock_b)
                nursery.start_soon(others)
            assert order == ["others", f"lock:{LOCK_SUCCESS}"]
            assert await a.lock(fa, LOCK_TYPE_WRLCK, proc_id=1, client_id="A") == LOCK_BLOCKED

    serve(scenario)


def test_requests_beyond_the_inflight_limit_wait_for_a_free_slot(serve) -> None:  # type: ignore[no-untyped-def]
    from ninep.server.session import SessionOptions

    async def scenario(server: Any, connect: Any) -> None:
        async with a_holds_a_lock_b_has_the_file(connect) as (a, fa, b, fb):
            granted: list[int] = []

            async def lock_b(proc: int, start: int) -> None:
                await b.lock(fb, LOCK_TYPE_WRLCK, start, 1, flags=LOCK_FLAGS_BLOCK, proc_id=proc, client_id="B")
                granted.append(proc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lock_b, 2, 0)
                nursery.start_soon(lock_b, 3, 1)
                await trio.sleep(0.3)
                answered = trio.Event()

                async def third() -> None:
                    assert (await b.getattr(fb)).size == 4
                    answered.set()

                nursery.start_soon(third)
                # Both of B's slots wait on the lock: B's third request is not even started...
                await trio.sleep(0.5)
                assert not answered.is_set(), "a third request ran with max_inflight=2"
                # ...while another connection is served, and the lock's release frees B.
                assert await a.lock(fa, LOCK_TYPE_UNLCK, proc_id=1, client_id="A") == LOCK_SUCCESS
                with trio.fail_after(10):
                    await answered.wait()
            assert sorted(granted) == [2, 3]

    serve(scenario, options=SessionOptions(max_msize=1 << 20, max_inflight=2))


def test_many_requests_in_flight_on_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, msize=65536) as c:
            root = await c.attach()
            for i in range(20):
                await make_file(c, root, f"f{i}", bytes([i]) * 5000)
            results: dict[int, bytes] = {}

            async def read_one(i: int) -> None:
                f = await open_rw(c, root, [f"f{i}"], L_O_RDONLY)
                results[i] = await c.read_all(f)
                await c.clunk(f)

            async with trio.open_nursery() as n:
                for _rep in range(5):
                    for i in range(20):
                        n.start_soon(read_one, i)
            assert all(results[i] == bytes([i]) * 5000 for i in range(20))

    serve(scenario)


def test_client_vanishing_mid_request_leaks_nothing(serve) -> None:  # type: ignore[no-untyped-def]
    async def busy_then_vanish(connect: Any, hold: bool) -> None:
        channel = await connect()
        c = Client(channel)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c._reader)
            await c.version(65536, V9P2000_L)
            root = await c.attach()
            opened = []
            for i in range(10):
                f, _ = await c.walk(root, [])
                await c.lcreate(f, f"v{i}-{id(c)}", L_O_RDWR | L_O_CREAT, 0o644)
                opened.append(f)
            d = await open_rw(c, root, [], L_O_RDONLY | L_O_DIRECTORY)
            await c.xattr_set(opened[0], "user.x", b"1")
            if hold:
                await c.lock(opened[1], LOCK_TYPE_WRLCK, proc_id=9, client_id="gone")
            else:
                # A blocking lock in flight, plus requests queued behind it, when the peer vanishes.
                for i in range(5):
                    nursery.start_soon(_quietly, c.rpc(m.Tlock(opened[1], LOCK_TYPE_WRLCK, LOCK_FLAGS_BLOCK, 0, 0, 10 + i, "gone")))
                    nursery.start_soon(_quietly, c.readdir(d, 0))
                await trio.sleep(0.2)
            # A half-sent message, then the connection just drops.
            await channel.send([b"\x40\x00\x00\x00\x76\x01\x00"])
            await channel.aclose()
            nursery.cancel_scope.cancel()

    async def scenario(server: Any, connect: Any) -> None:
        # Warm up (threads, lazily opened fds) before taking the baseline.
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "warm")
            await names_in(c, root)
        await _settle(server)
        base = open_fds()
        base_files = file_fds()
        await busy_then_vanish(connect, hold=True)
        await busy_then_vanish(connect, hold=False)
        await _settle(server)
        # Files and directories the backend opened: none may survive the connection.
        assert file_fds() == base_files
        # Sockets, eventfds, memfds: the connection's own. The harness's xen entry starts one
        # backend per guest domain, which (like a real Xen backend) outlives the connection.
        if serve.transport != "xen":
            assert open_fds() == base
        if hasattr(server.backend, "_nodes"):
            assert not server.backend._nodes  # every fid's node released
        # The lock the vanished client held is gone, the server still serves.
        async with client_for(connect) as c:
            root = await c.attach()
            names = await names_in(c, root)
            assert len(names) == 21
            f = await open_rw(c, root, [sorted(names)[1]])
            assert await c.lock(f, LOCK_TYPE_WRLCK, proc_id=1, client_id="new") == LOCK_SUCCESS

    serve(scenario)


@contextlib.asynccontextmanager
async def a_holds_a_lock_b_has_the_file(connect: Any) -> Any:
    """Two connections with file "f" open read-write; A holds a write lock on all of it
    (proc 1, client "A")."""
    async with client_for(connect) as a, client_for(connect) as b:
        ra, rb = await a.attach(), await b.attach()
        await make_file(a, ra, "f", b"data")
        fa = await open_rw(a, ra, ["f"])
        fb = await open_rw(b, rb, ["f"])
        assert await a.lock(fa, LOCK_TYPE_WRLCK, proc_id=1, client_id="A") == LOCK_SUCCESS
        yield a, fa, b, fb


def file_fds() -> list[str]:
    """What the process's fds on files and directories point at."""
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{f}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            out.append(target)
    return sorted(out)


async def _quietly(coro: Any) -> None:
    """Runs a request whose connection is about to vanish: its failure is expected."""
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await coro


async def _settle(server: Any) -> None:
    with trio.fail_after(20):
        while server.sessions:
            await trio.sleep(0.02)
    await trio.sleep(0.05)
