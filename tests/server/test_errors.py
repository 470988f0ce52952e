"""Error paths a client relies on: the right errno for unknown fids, missing and existing names,
non-empty directories, a read-only export, and names no create-like request may use — and that a
failed request changes nothing."""

from __future__ import annotations

import errno
import stat
from typing import Any

import pytest

from ninep.protocol import messages as m
from ninep.protocol.numbers import (
    AT_REMOVEDIR,
    L_O_APPEND,
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_TRUNC,
    L_O_WRONLY,
    LOCK_TYPE_RDLCK,
    LOCK_TYPE_UNLCK,
    SETATTR_MODE,
    SETATTR_SIZE,
    V9P2000_L,
)
from ninep.server.policy import OperationPolicy
from ninep.server.session import SessionOptions
from tests.kits.e2e import fails, make_file, names_in, open_rw
from tests.kits.harness import client_for

UNKNOWN = 4242

EBADF_REQUESTS = [
    m.Twalk(UNKNOWN, 9000, []), m.Tlopen(UNKNOWN, 0), m.Tlcreate(UNKNOWN, "x", 0, 0o644, 0),
    m.Tread(UNKNOWN, 0, 10), m.Twrite(UNKNOWN, 0, b"x"), m.Tclunk(UNKNOWN), m.Tremove(UNKNOWN),
    m.Tstatfs(UNKNOWN), m.Tsymlink(UNKNOWN, "x", "y", 0), m.Tmknod(UNKNOWN, "x", 0o10644, 0, 0, 0),
    m.Trename(UNKNOWN, 1, "x"), m.Treadlink(UNKNOWN), m.Tgetattr(UNKNOWN, 0x3FFF),
    m.Tsetattr(UNKNOWN, 1, 0o644, 0, 0, 0, 0, 0, 0, 0), m.Txattrwalk(UNKNOWN, 9000, ""),
    m.Txattrcreate(UNKNOWN, "user.x", 1, 0), m.Treaddir(UNKNOWN, 0, 100), m.Tfsync(UNKNOWN, 0),
    m.Tlock(UNKNOWN, 0, 0, 0, 0, 1, "c"), m.Tgetlock(UNKNOWN, 0, 0, 0, 1, "c"),
    m.Tlink(UNKNOWN, 1, "x"), m.Tlink(1, UNKNOWN, "x"), m.Tmkdir(UNKNOWN, "x", 0o755, 0),
    m.Trenameat(UNKNOWN, "a", 1, "b"), m.Trenameat(1, "a", UNKNOWN, "b"), m.Tunlinkat(UNKNOWN, "x", 0),
]


def test_unknown_fid_is_ebadf_for_every_request(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            assert root == 1
            await make_file(c, root, "a")
            for req in EBADF_REQUESTS:
                await fails(errno.EBADF, c.rpc(req))
            assert await names_in(c, root) == {"a"}

    serve(scenario)


def test_enoent_eexist_enotempty(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f", b"data")
            await c.mkdir(root, "d")
            d, _ = await c.walk(root, ["d"])
            await make_file(c, d, "inner")
            f, _ = await c.walk(root, ["f"])
            # ENOENT
            await fails(errno.ENOENT, c.walk(root, ["missing"]))
            await fails(errno.ENOENT, c.unlinkat(root, "missing"))
            await fails(errno.ENOENT, c.renameat(root, "missing", root, "x"))
            await fails(errno.ENOENT, c.unlinkat(root, "missing", AT_REMOVEDIR))
            # EEXIST for every create-like request
            for what in (c.mkdir(root, "f"), c.mkdir(root, "d"), c.symlink(root, "f", "t"),
                         c.mknod(root, "d", stat.S_IFIFO | 0o644), c.link(root, f, "d"),
                         c.lcreate((await c.walk(root, []))[0], "f", L_O_RDWR | L_O_CREAT | 0o200, 0o644)):
                await fails(errno.EEXIST, what)
            # ENOTEMPTY
            await fails(errno.ENOTEMPTY, c.unlinkat(root, "d", AT_REMOVEDIR))
            await c.mkdir(root, "e")
            await fails((errno.ENOTEMPTY, errno.EEXIST), c.renameat(root, "e", root, "d"))
            # ENOTDIR / EISDIR
            assert len((await c.call(m.Twalk(root, 9000, ["f", "x"]), m.Rwalk)).wqid) == 1
            await fails(errno.ENOTDIR, c.mkdir(f, "x"))
            await fails((errno.ENOTDIR, errno.EISDIR), c.renameat(root, "f", root, "d"))
            await fails(errno.EISDIR, c.unlinkat(root, "d"))
            assert await names_in(c, root) == {"f", "d", "e"}
            assert await c.read_file(root, "f") == b"data"

    serve(scenario)


BAD_NAMES = ["a/b", "/abs", ".", "..", "", "nul\0byte"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["slash", "abs", "dot", "dotdot", "empty", "nul"])
def test_names_create_like_requests_refuse(serve, name: str) -> None:  # type: ignore[no-untyped-def]
    parent_before = {p.name for p in serve.export.parent.iterdir()}

    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await c.mkdir(root, "a")
            await make_file(c, root, "f")
            f, _ = await c.walk(root, ["f"])
            allowed = (errno.EINVAL, errno.EEXIST, errno.ENOENT, errno.EPERM, errno.EBUSY, errno.ENOTEMPTY, errno.EISDIR)
            lc, _ = await c.walk(root, [])
            for what in (c.lcreate(lc, name, L_O_RDWR | L_O_CREAT, 0o644), c.mkdir(root, name),
                         c.symlink(root, name, "target"), c.mknod(root, name, stat.S_IFIFO | 0o600),
                         c.link(root, f, name), c.rename(f, root, name), c.renameat(root, "f", root, name),
                         c.renameat(root, name, root, "moved"), c.unlinkat(root, name),
                         c.unlinkat(root, name, AT_REMOVEDIR)):
                await fails(allowed, what)
            # Nothing was created, moved or removed anywhere.
            assert await names_in(c, root) == {"a", "f"}
            assert await names_in(c, root, ["a"]) == set()
            if serve.kind == "local":
                assert sorted(p.name for p in serve.export.iterdir()) == ["a", "f"]
                # Beside the export only the transports' own sockets may have appeared.
                new = {p.name for p in serve.export.parent.iterdir() if p.name not in parent_before and not p.is_socket()}
                assert new == set()

    serve(scenario)


@pytest.mark.parametrize("how", ["session", "backend"])
def test_readonly_export_refuses_every_change_with_erofs(serve, how: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare the tree with a writable server, then serve the same export read-only.
    prepared: dict[str, Any] = {}

    async def prepare(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f", b"keep")
            await c.mkdir(root, "d")
            await c.xattr_set((await c.walk(root, ["f"]))[0], "user.k", b"v")
            prepared["backend"] = server.backend

    if serve.kind != "memory":  # a host directory (local or proxy)
        serve(prepare)

    async def scenario(server: Any, connect: Any) -> None:
        if serve.kind == "memory":
            # The memory tree lives in the backend object: fill it before serving read-only.
            from fs_backends.base import Cred

            b = server.backend
            if how == "session":
                root = await b.attach("", Cred(0, 0))
                node, fh = await b.create(root, "f", L_O_WRONLY | L_O_CREAT, 0o644, Cred(0, 0))
                await b.write(fh, 0, b"keep")
                await b.xattr_set(node, "user.k", b"v", 0)
                await b.close(fh)
                await b.mkdir(root, "d", 0o755, Cred(0, 0))
        async with client_for(connect) as c:
            root = await c.attach()
            if serve.kind == "memory" and how == "backend":
                # An empty read-only tree: only the root to try changes on.
                changes = [c.mkdir(root, "x"), c.symlink(root, "s", "t"), c.mknod(root, "n", stat.S_IFIFO | 0o600),
                           c.lcreate((await c.walk(root, []))[0], "new", L_O_RDWR | L_O_CREAT, 0o644),
                           c.setattr(root, SETATTR_MODE, mode=0o700), c.xattr_set(root, "user.x", b"1")]
                for what in changes:
                    await fails(errno.EROFS, what)
                return
            f, _ = await c.walk(root, ["f"])
            d, _ = await c.walk(root, ["d"])
            assert await c.read_file(root, "f") == b"keep"
            assert await c.xattr_get(f, "user.k") == b"v"
            assert await names_in(c, root) == {"f", "d"}
            changes = [
                c.mkdir(root, "x"), c.symlink(root, "s", "t"), c.mknod(root, "n", stat.S_IFIFO | 0o600),
                c.link(root, f, "h"), c.rename(f, d, "g"), c.renameat(root, "f", root, "g"),
                c.unlinkat(root, "f"), c.unlinkat(root, "d", AT_REMOVEDIR),
                c.setattr(f, SETATTR_MODE, mode=0o600), c.setattr(f, SETATTR_SIZE, size=0),
                c.xattr_set(f, "user.k", b"changed"), c.xattr_set(f, "user.k", b"", 2),
                c.lcreate((await c.walk(root, []))[0], "new", L_O_RDWR | L_O_CREAT, 0o644),
            ]
            for what in changes:
                await fails(errno.EROFS, what)
            for flags in (L_O_WRONLY, L_O_RDWR, L_O_RDONLY | L_O_TRUNC, L_O_WRONLY | L_O_APPEND):
                g, _ = await c.walk(root, ["f"])
                await fails(errno.EROFS, c.lopen(g, flags))
                await c.clunk(g)
            await fails(errno.EROFS, c.remove((await c.walk(root, ["f"]))[0]))
            # Reading, listing, locking for read still work.
            r = await open_rw(c, root, ["f"], L_O_RDONLY)
            assert await c.read(r, 0, 10) == b"keep"
            assert await c.lock(r, LOCK_TYPE_RDLCK) == 0
            assert await c.lock(r, LOCK_TYPE_UNLCK) == 0
            dd = await open_rw(c, root, ["d"], L_O_RDONLY | L_O_DIRECTORY)
            assert await c.readdir(dd) != []
            assert await c.read_file(root, "f") == b"keep"
            assert await names_in(c, root) == {"f", "d"}
            if serve.kind != "memory":  # a host directory (local or proxy)
                assert sorted(p.name for p in serve.export.iterdir()) == ["d", "f"]
                assert (serve.export / "f").read_bytes() == b"keep"

    if how == "session":
        serve(scenario, options=SessionOptions(policy=OperationPolicy(readonly=True), max_msize=1 << 20))
    else:
        serve(scenario, readonly=True)


def test_requests_of_another_dialect_are_refused(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, dialect=V9P2000_L) as c:
            root = await c.attach()
            for req in (m.Topen(root, 0), m.Tcreate(root, "x", 0o644, 0), m.Tstat(root),
                        m.Twstat(root, m.Stat())):
                await fails((errno.EOPNOTSUPP, errno.ENOSYS, errno.EPROTO), c.rpc(req))
            assert await names_in(c, root) == set()

    serve(scenario)
