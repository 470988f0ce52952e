"""9P2000 and 9P2000.u sessions end to end: attach, walk, open, create (files, directories, and on
.u symlinks, devices, pipes), read/write, stat/wstat, directory reads as Dir entries, ORCLOSE,
and errors as Rerror strings (with errno on .u)."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pytest

from ninep.client import Client
from ninep.protocol import messages as m
from ninep.protocol.numbers import (
    DMDEVICE,
    DMDIR,
    DMNAMEDPIPE,
    DMSYMLINK,
    ORCLOSE,
    ORDWR,
    OREAD,
    OTRUNC,
    OWRITE,
    QTDIR,
    QTSYMLINK,
    V9P2000,
    V9P2000_U,
)
from ninep.server.policy import OperationPolicy
from ninep.server.session import SessionOptions
from tests.kits.e2e import fails
from tests.kits.harness import client_for

U32, U64, U16 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFF
DIALECTS = [V9P2000, V9P2000_U]


def dont_touch(**kw: Any) -> m.Stat:
    """A wstat Dir whose fields all mean "leave unchanged", except those given."""
    base = dict(type=U16, dev=U32, qid=m.Qid(0xFF, U32, U64), mode=U32, atime=U32, mtime=U32, length=U64,
                name="", uid="", gid="", muid="", extension="", n_uid=U32, n_gid=U32, n_muid=U32)
    base.update(kw)
    return m.Stat(**base)


async def _create_file(c: Client, d: int, name: str, data: bytes, perm: int = 0o644) -> None:
    f, _ = await c.walk(d, [])
    await c.create(f, name, perm, OWRITE)
    if data:
        await c.write(f, 0, data)
    await c.clunk(f)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_open_create_read_write_stat(serve, dialect: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=dialect) as c:
            assert c.dialect == dialect
            root = await c.attach(uname="root")
            assert (await c.stat(root)).qid.type & QTDIR
            f, _ = await c.walk(root, [])
            qid, iounit = await c.create(f, "file", 0o640, ORDWR)
            assert qid.type == 0 and iounit > 0
            assert await c.write(f, 0, b"hello legacy") == 12
            assert await c.read(f, 6, 100) == b"legacy"
            st = await c.stat(f)
            assert (st.name, st.length, st.mode, st.qid.path, st.qid.type) == ("file", 12, 0o640, qid.path, 0)
            assert st.uid == "root" and st.gid == "root"
            if dialect == V9P2000_U:
                assert (st.n_uid, st.n_gid) == (0, 0)
            await c.clunk(f)
            # Topen modes: OREAD refuses writes, OTRUNC truncates.
            g, _ = await c.walk(root, ["file"])
            await c.open(g, OREAD)
            await fails((errno.EBADF, errno.EIO), c.write(g, 0, b"x"))
            await c.clunk(g)
            g, _ = await c.walk(root, ["file"])
            await c.open(g, OWRITE | OTRUNC)
            assert (await c.stat(g)).length == 0
            await c.write(g, 0, b"new")
            await c.clunk(g)
            # Create a directory: answered open for reading.
            d, _ = await c.walk(root, [])
            dq, _ = await c.create(d, "dir", DMDIR | 0o755, OREAD)
            assert dq.type & QTDIR
            assert await c.read(d, 0, 8192) == b""
            await c.clunk(d)
            dd, _ = await c.walk(root, ["dir"])
            dst = await c.stat(dd)
            assert dst.mode == DMDIR | 0o755 and dst.qid.type & QTDIR and dst.name == "dir"
            await fails((errno.EEXIST, errno.EIO), c.create((await c.walk(root, []))[0], "file", 0o644, OWRITE))
            if serve.kind == "local":
                assert (serve.export / "file").read_bytes() == b"new"
                assert stat.S_IMODE(os.stat(serve.export / "dir").st_mode) == 0o755

    serve(scenario)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_directory_reads_are_dir_entries(serve, dialect: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=dialect, msize=8192) as c:
            root = await c.attach(uname="root")
            names = {f"file-{i:03d}-{'x' * 30}" for i in range(90)}  # more than one 8 KiB read of Dirs
            for n in sorted(names):
                await _create_file(c, root, n, n.encode())
            d, _ = await c.walk(root, [])
            await c.create(d, "sub", DMDIR | 0o700, OREAD)
            await c.clunk(d)
            d, _ = await c.walk(root, [])
            await c.open(d, OREAD)
            stats = await c.read_dir_stats(d)
            assert sorted(s.name for s in stats) == sorted(names | {"sub"})  # no '.' or '..'
            for s in stats:
                if s.name == "sub":
                    assert s.mode == DMDIR | 0o700 and s.qid.type & QTDIR
                else:
                    assert s.length == len(s.name) and s.mode == 0o644
            # Reading again from offset 0 restarts the listing; other offsets must continue.
            first = await c.read(d, 0, 8192)
            assert c.codec.decode_stats(first)[0].name == stats[0].name
            await fails((errno.EINVAL, errno.EIO), c.read(d, 3, 8192))

    serve(scenario)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_wstat_renames_chmods_truncates_and_touches(serve, dialect: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=dialect) as c:
            root = await c.attach(uname="root")
            await _create_file(c, root, "f", b"0123456789")
            f, _ = await c.walk(root, ["f"])
            before = await c.stat(f)
            await c.wstat(f, dont_touch())  # all "don't touch": nothing changes
            after = await c.stat(f)
            assert (after.name, after.mode, after.length, after.mtime) == (before.name, before.mode, before.length, before.mtime)
            await c.wstat(f, dont_touch(mode=0o600, length=4, mtime=1_000_000_000))
            st = await c.stat(f)
            assert (st.mode, st.length, st.mtime) == (0o600, 4, 1_000_000_000)
            await fails((errno.EINVAL, errno.EIO), c.wstat(f, dont_touch(mode=DMDIR | 0o755)))
            if serve.kind == "local":
                s = os.stat(serve.export / "f")
                assert (stat.S_IMODE(s.st_mode), s.st_size, int(s.st_mtime)) == (0o600, 4, 1_000_000_000)

    serve(scenario)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_orclose_removes_on_clunk(serve, dialect: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=dialect) as c:
            root = await c.attach(uname="root")
            f, _ = await c.walk(root, [])
            await c.create(f, "tmp", 0o600, ORDWR | ORCLOSE)
            await c.write(f, 0, b"scratch")
            await c.walk(root, ["tmp"])  # still there while open
            await c.clunk(f)
            await fails((errno.ENOENT, errno.EIO), c.walk(root, ["tmp"]))

    serve(scenario)


def test_dotu_symlinks_devices_pipes(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=V9P2000_U) as c:
            root = await c.attach(uname="root")
            s, _ = await c.walk(root, [])
            q, _ = await c.create(s, "ln", DMSYMLINK | 0o777, OREAD, "target/of/link")
            assert q.type & QTSYMLINK
            ln, _ = await c.walk(root, ["ln"])
            st = await c.stat(ln)
            assert st.mode & DMSYMLINK and st.extension == "target/of/link"
            dv, _ = await c.walk(root, [])
            await c.create(dv, "null", DMDEVICE | 0o666, OREAD, "c 1 3")
            nd, _ = await c.walk(root, ["null"])
            st = await c.stat(nd)
            assert st.mode & DMDEVICE and st.extension == "c 1 3"
            p, _ = await c.walk(root, [])
            await c.create(p, "pipe", DMNAMEDPIPE | 0o600, OREAD)
            pd, _ = await c.walk(root, ["pipe"])
            assert (await c.stat(pd)).mode & DMNAMEDPIPE
            if serve.kind == "local":
                assert os.readlink(serve.export / "ln") == "target/of/link"
                ds = os.lstat(serve.export / "null")
                assert stat.S_ISCHR(ds.st_mode) and (os.major(ds.st_rdev), os.minor(ds.st_rdev)) == (1, 3)
                assert stat.S_ISFIFO(os.lstat(serve.export / "pipe").st_mode)

    # Device nodes on a host export need the policy's allow_devices (default-deny).
    serve(scenario, options=SessionOptions(policy=OperationPolicy(allow_devices=True)))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_errors_are_rerror_strings_with_errno_on_dotu(serve, dialect: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=dialect) as c:
            root = await c.attach(uname="root")
            for req, err in ((m.Twalk(root, 50, ["missing"]), errno.ENOENT), (m.Tstat(777), errno.EBADF),
                             (m.Tlopen(root, 0), errno.EOPNOTSUPP)):
                reply = None
                p_err = None
                try:
                    reply = await c.rpc(req)
                except OSError as e:
                    p_err = e
                assert reply is None and p_err is not None
                # The error string is the one every 9P client maps back to an errno.
                assert p_err.strerror == os.strerror(err), (req, p_err.strerror)
                if dialect == V9P2000_U:
                    assert p_err.errno == err

    serve(scenario)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_wstat_renames_within_the_directory(serve, dialect: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=dialect) as c:
            root = await c.attach(uname="root")
            await _create_file(c, root, "f", b"x")
            f, _ = await c.walk(root, ["f"])
            path = (await c.stat(f)).qid.path
            await c.wstat(f, dont_touch(name="g"))
            st = await c.stat(f)
            assert st.name == "g" and st.qid.path == path
            g, _ = await c.walk(root, ["g"])
            assert (await c.stat(g)).qid.path == path
            await fails((errno.ENOENT, errno.EIO), c.walk(root, ["f"]))
            await fails((errno.EINVAL, errno.EEXIST, errno.EIO), c.wstat(f, dont_touch(name="a/b")))
            if serve.kind == "local":
                assert os.listdir(serve.export) == ["g"]

    serve(scenario)
