"""The project's client against a server it did not write: diod (9P2000.L) serving a host
directory on loopback TCP. Everything the FUSE mount and the remote backend rely on."""

from __future__ import annotations

import errno
import os
import stat

import trio

from ninep.client import Client, ClientError
from ninep.protocol.numbers import (
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_WRONLY,
    LOCK_SUCCESS,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
    QTDIR,
    SETATTR_MODE,
    SETATTR_SIZE,
)
from tests.interop.conftest import Served


def test_client_against_diod(diod_server: Served) -> None:
    export = diod_server.export

    async def main() -> None:
        with trio.fail_after(30):
            async with Client.connect(f"tcp:{diod_server.address}", msize=1 << 20) as c:
                assert c.msize <= 65536 + 24  # diod negotiates its own maximum down
                root = await c.attach(str(export), "root", 0)
                a = await c.getattr(root)
                assert a.qid.type & QTDIR and stat.S_ISDIR(a.mode)
                # walk: several names at once, partial walks, errors.
                big, qids = await c.walk(root, ["sub", "deeper", "big.bin"])
                assert len(qids) == 3 and qids[0].type & QTDIR and not qids[2].type & QTDIR
                try:
                    await c.walk(root, ["sub", "missing"])
                    raise AssertionError("walk of a missing name succeeded")
                except ClientError as e:
                    assert e.errno == errno.ENOENT
                # read: a file larger than msize, in pieces.
                await c.lopen(big, L_O_RDONLY)
                assert await c.read_all(big) == (export / "sub" / "deeper" / "big.bin").read_bytes()
                assert await c.read_file(root, "hello.txt") == b"hello, 9P world\n"
                # write: create, write more than one message, read back; the host sees it.
                payload = os.urandom(200_000)
                await c.write_file(root, "written.bin", payload)
                assert await c.read_file(root, "written.bin") == payload
                assert (export / "written.bin").read_bytes() == payload
                # readdir: every entry, over several calls with small counts too.
                d, _ = await c.walk(root, [])
                await c.lopen(d, L_O_RDONLY | L_O_DIRECTORY)
                names = {e[3] for e in await c.readdir_all(d)}
                assert names == {".", "..", "hello.txt", "sub", "link", "written.bin"}
                small, offset = [], 0
                while batch := await c.readdir(d, offset, 64):
                    small += [e[3] for e in batch]
                    offset = batch[-1][1]
                assert set(small) == names and len(small) == len(names)
                # getattr/setattr, mkdir, symlink/readlink, statfs, xattrs.
                w, _ = await c.walk(root, ["written.bin"])
                await c.setattr(w, SETATTR_MODE | SETATTR_SIZE, mode=0o600, size=10)
                a = await c.getattr(w)
                assert (a.size, a.mode) == (10, stat.S_IFREG | 0o600)
                assert os.stat(export / "written.bin").st_size == 10
                q = await c.mkdir(root, "newdir", 0o750)
                assert q.type & QTDIR and (export / "newdir").is_dir()
                await c.symlink(root, "ln2", "hello.txt")
                ln, _ = await c.walk(root, ["ln2"])
                assert await c.readlink(ln) == "hello.txt" == os.readlink(export / "ln2")
                assert (await c.statfs(root)).bsize > 0
                await c.xattr_set(w, "user.k", b"value")
                assert await c.xattr_get(w, "user.k") == b"value"
                assert "user.k" in await c.xattr_list(w)
                # lcreate through open_file, rename and remove (diod has no renameat/unlinkat).
                f = await c.open_file(root, "newdir/made.txt", L_O_WRONLY | L_O_CREAT)
                await f.write(b"made")
                await f.close()
                m_, _ = await c.walk(root, ["newdir", "made.txt"])
                nd, _ = await c.walk(root, ["newdir"])
                await c.rename(m_, nd, "renamed.txt")
                assert sorted(os.listdir(export / "newdir")) == ["renamed.txt"]
                await c.remove(m_)
                assert os.listdir(export / "newdir") == []
                # locks
                lf = await c.open_file(root, "hello.txt", L_O_RDWR)
                assert await c.lock(lf.fid, LOCK_TYPE_WRLCK) == LOCK_SUCCESS
                assert (await c.getlock(lf.fid, LOCK_TYPE_WRLCK)).type == LOCK_TYPE_UNLCK
                assert await c.lock(lf.fid, LOCK_TYPE_UNLCK) == LOCK_SUCCESS
                # many requests in flight at once over one connection.
                async with trio.open_nursery() as n:
                    for _ in range(50):
                        n.start_soon(c.getattr, root)
                        n.start_soon(c.read_file, root, "hello.txt")

    trio.run(main)
