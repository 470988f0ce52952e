"""RemoteBackend on its own (no FUSE): the Backend contract over a ninep server in this process.

A small msize makes reads and writes split into several pipelined messages."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from fs_backends.base import Cred, Lock, LockOwner, SetAttr
from fs_backends.memory import MemoryBackend
from fs_backends.remote import RemoteBackend
from ninep.client import Client
from ninep.protocol import numbers as P
from tests.kits.harness import served

ROOT = Cred(0, 0, "root")


def run(
    tmp_path: Path, scenario: Callable[[RemoteBackend], Awaitable[None]], msize: int = 8192
) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with served(MemoryBackend(), "unix", tmp_path) as (_, connect):
                channel = await connect()
                async with Client.connect(channel, msize=msize) as client:
                    await scenario(RemoteBackend(client, uname="root", n_uname=0))

    trio.run(main)


def test_tree_operations(tmp_path: Path) -> None:
    async def scenario(b: RemoteBackend) -> None:
        root = await b.attach("", ROOT)
        await b.mkdir(root, "a", 0o755, ROOT)
        a = (await b.walk(root, ["a"]))[0]
        await b.mkdir(a, "b", 0o700, ROOT)
        node, f = await b.create(a, "file", P.L_O_RDWR, 0o640, ROOT)
        data = bytes(range(256)) * 200  # 51 200 bytes: several messages at msize 8192
        assert await b.write(f, 0, data) == len(data)
        assert await b.read(f, 0, len(data) + 100) == data
        assert await b.read(f, 1000, 20000) == data[1000:21000]
        await b.close(f)
        # a walk of several names gives one node per name
        nodes = await b.walk(root, ["a", "b"])
        assert [n.qid.type for n in nodes] == [P.QTDIR, P.QTDIR]
        # a walk stopping short returns what it reached; none reached raises
        part = await b.walk(root, ["a", "missing", "x"])
        assert len(part) == 1
        with pytest.raises(OSError) as e:
            await b.walk(root, ["missing"])
        assert e.value.errno == errno.ENOENT
        for n in nodes + part:
            await b.release(n)
        attr = await b.getattr(node, P.GETATTR_ALL)
        assert attr.size == len(data) and attr.mode & 0o777 == 0o640
        await b.setattr(node, SetAttr(P.SETATTR_SIZE | P.SETATTR_MODE, mode=0o600, size=10), ROOT)
        attr = await b.getattr(node, P.GETATTR_ALL)
        assert (attr.size, attr.mode & 0o777) == (10, 0o600)
        # rename in place (newdir None), link, symlink, readlink, unlink, remove
        await b.rename(node, None, "renamed")
        await b.link(a, "hard", node)
        assert (await b.getattr(node, P.GETATTR_ALL)).nlink == 2
        await b.symlink(a, "sym", "renamed", ROOT)
        sym = (await b.walk(a, ["sym"]))[0]
        assert await b.readlink(sym) == "renamed"
        await b.release(sym)
        await b.renameat(a, "hard", root, "moved")
        await b.unlinkat(root, "moved", 0)
        d = await b.open(a, P.L_O_RDONLY | P.L_O_DIRECTORY, ROOT)
        names = {e.name for e in await b.readdir(d, 0, 100)}
        assert names == {".", "..", "b", "renamed", "sym"}
        await b.close(d)
        await b.remove(node)
        await b.release(node)  # after remove: nothing left to clunk, must not fail
        with pytest.raises(OSError):
            await b.walk(a, ["renamed"])
        s = await b.statfs(root)
        assert s.namelen > 0

    run(tmp_path, scenario)


def test_xattrs_and_locks(tmp_path: Path) -> None:
    async def scenario(b: RemoteBackend) -> None:
        root = await b.attach("", ROOT)
        node, f = await b.create(root, "x", P.L_O_RDWR, 0o644, ROOT)
        await b.xattr_set(node, "user.k", b"v" * 5000, 0)
        assert await b.xattr_get(node, "user.k") == b"v" * 5000
        assert "user.k" in await b.xattr_list(node)
        await b.xattr_remove(node, "user.k")
        with pytest.raises(OSError) as e:
            await b.xattr_get(node, "user.k")
        assert e.value.errno == errno.ENODATA
        one = LockOwner(1, "c1", 100)
        two = LockOwner(1, "c2", 200)
        wr = Lock(P.LOCK_TYPE_WRLCK, 0, 10)
        assert await b.lock(f, wr, one) == P.LOCK_SUCCESS
        assert await b.lock(f, Lock(P.LOCK_TYPE_WRLCK, 5, 10), two) == P.LOCK_BLOCKED
        held = await b.getlock(f, Lock(P.LOCK_TYPE_WRLCK, 0, 0), two)
        assert held.type == P.LOCK_TYPE_WRLCK and held.proc_id == 100
        await b.release_locks(f, one)
        assert await b.lock(f, Lock(P.LOCK_TYPE_WRLCK, 5, 10), two) == P.LOCK_SUCCESS
        await b.close(f)
        await b.release(node)

    run(tmp_path, scenario)


def test_tgetlock_unlck_served_through_a_remote_backend(tmp_path: Path) -> None:
    """A ninep server whose backend is RemoteBackend (front) over another ninep server (back):
    Linux's Tgetlock of type UNLCK reaches the back as a write test, and the front answers the
    back's conflicting lock with its owner, or UNLCK with the asked range."""
    (tmp_path / "back").mkdir()
    (tmp_path / "front").mkdir()

    async def main() -> None:
        with trio.fail_after(60):
            async with AsyncExitStack() as stack:
                _, back = await stack.enter_async_context(served(MemoryBackend(), "unix", tmp_path / "back"))
                direct = await stack.enter_async_context(Client.connect(await back(), msize=8192))
                relay = await stack.enter_async_context(Client.connect(await back(), msize=8192))
                remote = RemoteBackend(relay, uname="root", n_uname=0)
                _, front = await stack.enter_async_context(served(remote, "unix", tmp_path / "front"))
                c = await stack.enter_async_context(Client.connect(await front(), msize=8192))
                root = await direct.attach()
                f, _ = await direct.walk(root, [])
                await direct.lcreate(f, "x", P.L_O_RDWR | P.L_O_CREAT, 0o644)
                g, _ = await c.walk(await c.attach(), ["x"])
                await c.lopen(g, P.L_O_RDONLY)
                r = await c.getlock(g, P.LOCK_TYPE_UNLCK, 3, 4, proc_id=7, client_id="guest")
                assert (r.type, r.start, r.length, r.proc_id, r.client_id) == (P.LOCK_TYPE_UNLCK, 3, 4, 7, "guest")
                assert await direct.lock(f, P.LOCK_TYPE_RDLCK, 10, 20, proc_id=11, client_id="other") == P.LOCK_SUCCESS
                r = await c.getlock(g, P.LOCK_TYPE_UNLCK, 0, 0, proc_id=7, client_id="guest")
                assert (r.type, r.start, r.length, r.proc_id, r.client_id) == (P.LOCK_TYPE_RDLCK, 10, 20, 11, "other")
                r = await c.getlock(g, P.LOCK_TYPE_UNLCK, 0, 10, proc_id=7, client_id="guest")
                assert r.type == P.LOCK_TYPE_UNLCK

    trio.run(main)


def test_append_writes_land_in_order(tmp_path: Path) -> None:
    async def scenario(b: RemoteBackend) -> None:
        root = await b.attach("", ROOT)
        node, f = await b.create(root, "log", P.L_O_WRONLY | P.L_O_APPEND, 0o644, ROOT)
        big = b"".join(b"%06d\n" % i for i in range(5000))  # 35 000 bytes, several chunks
        assert await b.write(f, 0, b"head\n") == 5
        assert await b.write(f, 0, big) == len(big)
        await b.close(f)
        r = await b.open(node, P.L_O_RDONLY, ROOT)
        assert await b.read(r, 0, 100_000) == b"head\n" + big
        await b.close(r)
        await b.release(node)

    run(tmp_path, scenario)
