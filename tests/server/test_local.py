"""What only a host directory can show, over every transport: nothing outside the export is
reachable or changed through `..`, symlinks or attach names (checked against a canary directory
beside the export); EXDEV and distinct qids across a mount inside the export; locks visible to
host processes; no fd leaked by open/close churn."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from ninep.protocol import messages as m
from ninep.protocol.numbers import (
    GETATTR_ALL,
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_TRUNC,
    L_O_WRONLY,
    LOCK_BLOCKED,
    LOCK_SUCCESS,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_SET,
    SETATTR_SIZE,
    SETATTR_UID,
)
from tests.kits.e2e import fails, make_file, names_in, open_rw
from tests.kits.harness import client_for, open_fds


@pytest.fixture(params=["local"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    """This module runs on the local backend only (over every transport)."""
    pytest.importorskip("fs_backends.local", reason="local backend lands with its own branch")
    return "local"


def tree_digest(root: Path) -> str:
    """Names, types, modes, owners, sizes, mtimes, contents, link targets and xattrs of a tree."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames) + ["."]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            h.update(f"{p.relative_to(root)}|{st.st_mode}|{st.st_uid}|{st.st_gid}|{st.st_size}|{st.st_mtime_ns}|{st.st_nlink}".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            if not stat.S_ISLNK(st.st_mode):
                for x in sorted(os.listxattr(p)):
                    h.update(x.encode() + os.getxattr(p, x))
    return h.hexdigest()


@pytest.fixture
def canary(serve: Any) -> Path:
    export: Path = serve.export
    c = export.parent / "canary"
    c.mkdir()
    (c / "secret").write_bytes(b"top secret")
    (c / "dir").mkdir()
    (c / "dir" / "deep").write_bytes(b"deeper")
    os.chmod(c / "secret", 0o644)
    # Ways out, planted in the export by someone on the host.
    os.symlink(str(c), export / "abs")
    os.symlink("../canary", export / "rel")
    os.symlink(str(c / "secret"), export / "abs_file")
    os.symlink("../canary/secret", export / "rel_file")
    os.mkdir(export / "sub")
    os.symlink("../../canary", export / "sub" / "up2")
    os.symlink("/", export / "slash")
    os.symlink("/proc/self/root", export / "magic")
    return c


def test_nothing_outside_the_export_is_reachable_or_changed(serve, canary: Path) -> None:  # type: ignore[no-untyped-def]
    before = tree_digest(canary)
    outside_inodes = {os.lstat(p).st_ino for p in (canary, canary / "secret", canary / "dir", canary / "dir" / "deep", Path("/"), Path("/etc"))}
    links = ["abs", "rel", "abs_file", "rel_file", "slash", "magic"]

    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            root_qid = (await c.getattr(root)).qid
            seen_qids = []
            # '..' at the root stays at the root, however many.
            r = await c.call(m.Twalk(root, 100, [".."] * 16), m.Rwalk)
            assert all(q == root_qid for q in r.wqid) and (await c.getattr(100)).qid == root_qid
            await c.clunk(100)
            for path in (["..", "canary"], ["..", "..", "etc", "passwd"], ["sub", "..", "..", "canary", "secret"],
                         ["abs", "secret"], ["rel", "secret"], ["sub", "up2", "secret"], ["slash", "etc"],
                         ["magic", "etc"], ["abs", "dir", "deep"]):
                try:
                    r = await c.call(m.Twalk(root, 101, path), m.Rwalk)
                except OSError:
                    continue
                seen_qids += r.wqid
                if len(r.wqid) == len(path):
                    a = await c.getattr(101)
                    assert a.qid.path not in outside_inodes
                    await c.clunk(101)
            # Symlinks are walked to, never through: the qid is the link's own.
            for name in links:
                f, q = await c.walk(root, [name])
                assert q[0].type & 0x02, name
                a = await c.getattr(f, GETATTR_ALL)
                assert stat.S_ISLNK(a.mode), name
                # Opening, truncating, chmod/chown, retiming, xattrs through the link never reach the target.
                await fails((errno.ELOOP, errno.EINVAL, errno.ENXIO, errno.EPERM), c.lopen(f, L_O_RDWR | L_O_TRUNC))
                for change in (c.setattr(f, SETATTR_SIZE, size=0), c.setattr(f, SETATTR_MODE, mode=0o777),
                               c.xattr_set(f, "user.pwned", b"1")):
                    with contextlib.suppress(OSError):
                        await change
                for change in (c.setattr(f, SETATTR_UID, uid=4321), c.setattr(f, SETATTR_MTIME | SETATTR_MTIME_SET, mtime=(1, 0))):
                    with contextlib.suppress(OSError):
                        await change
                # Creating "inside" a symlink is refused.
                lc, _ = await c.walk(f, [])
                await fails((errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EPERM), c.lcreate(lc, "x", L_O_WRONLY | L_O_CREAT, 0o644))
                for create in (c.mkdir(f, "x"), c.symlink(f, "x", "y"), c.mknod(f, "x", stat.S_IFIFO | 0o644)):
                    await fails((errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EPERM), create)
                await fails((errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EPERM), c.renameat(root, "sub", f, "stolen"))
                await fails((errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EPERM), c.unlinkat(f, "secret"))
                await fails((errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EPERM, errno.EBADF), c.readdir(f, 0))
                await c.clunk(f)
            for q in seen_qids:
                assert q.path not in outside_inodes
            # Attach names cannot leave the export either.
            for aname in ("..", "../canary", "/../canary", "sub/../../canary", "abs", "rel", "slash", "sub/up2"):
                try:
                    a_root = await c.attach(aname)
                except OSError:
                    continue
                a = await c.getattr(a_root)
                assert a.qid.path not in outside_inodes, aname
                assert a.qid == root_qid, aname
            # Renaming the symlinks around and hard-linking them changes nothing outside.
            lf, _ = await c.walk(root, ["abs_file"])
            await c.link(root, lf, "hardlink_to_link")
            await c.renameat(root, "rel_file", root, "moved")
            await fails((errno.ELOOP, errno.EINVAL, errno.ENXIO, errno.EPERM), c.lopen(lf, L_O_RDONLY))

    serve(scenario)
    assert tree_digest(canary) == before
    assert sorted(os.listdir(canary)) == ["dir", "secret"]


def test_exdev_and_distinct_qids_across_a_mount(serve) -> None:  # type: ignore[no-untyped-def]
    export: Path = serve.export
    mnt = export / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "ninep-test", str(mnt)], check=True)
    try:
        async def scenario(server: Any, connect: Any) -> None:
            async with client_for(connect) as c:
                root = await c.attach()
                await make_file(c, root, "f", b"here")
                mf, _ = await c.walk(root, ["mnt"])
                await make_file(c, mf, "g", b"there")
                f, _ = await c.walk(root, ["f"])
                await fails(errno.EXDEV, c.renameat(root, "f", mf, "f"))
                await fails(errno.EXDEV, c.rename(f, mf, "f"))
                await fails(errno.EXDEV, c.link(mf, f, "h"))
                assert await names_in(c, root) == {"f", "mnt"} and await names_in(c, mf) == {"g"}
                # Every file under the export has its own qid path, across devices too.
                qids = set()
                for i in range(30):
                    await make_file(c, root, f"a{i}")
                    await make_file(c, mf, f"a{i}")
                for d in (root, mf):
                    for name in await names_in(c, d):
                        g, _ = await c.walk(d, [name])
                        qids.add((await c.getattr(g)).qid.path)
                        await c.clunk(g)
                qids.add((await c.getattr(root)).qid.path)
                qids.add((await c.getattr(mf)).qid.path)
                assert len(qids) == 1 + 32 + 31  # the root, its 32 names (mnt among them), the 31 in mnt
                # '..' from the mount's root leads back to the export root.
                up, _ = await c.walk(mf, [".."])
                assert (await c.getattr(up)).qid == (await c.getattr(root)).qid

        serve(scenario)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""

TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("got")
except OSError:
    print("busy")
"""


def test_locks_are_visible_to_host_processes(serve) -> None:  # type: ignore[no-untyped-def]
    path = str(serve.export / "f")

    async def host_try() -> str:
        r = await trio.run_process([sys.executable, "-c", TRY_LOCK, path], capture_stdout=True)
        return r.stdout.decode().strip()

    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f", b"x")
            f = await open_rw(c, root, ["f"])
            assert await host_try() == "got"
            assert await c.lock(f, LOCK_TYPE_WRLCK) == LOCK_SUCCESS
            assert await host_try() == "busy"
            assert await c.lock(f, LOCK_TYPE_UNLCK) == LOCK_SUCCESS
            assert await host_try() == "got"
            # A host process holding a lock blocks 9P clients.
            proc = await trio.lowlevel.open_process([sys.executable, "-c", HOLD_LOCK, path],
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None and proc.stdin is not None
                assert (await proc.stdout.receive_some(100)).strip() == b"locked"
                assert await c.lock(f, LOCK_TYPE_WRLCK) == LOCK_BLOCKED
                g = await c.getlock(f, LOCK_TYPE_WRLCK)
                assert g.type == LOCK_TYPE_WRLCK
                await proc.stdin.send_all(b"\n")
                await proc.wait()
            finally:
                proc.kill()
            assert await c.lock(f, LOCK_TYPE_WRLCK) == LOCK_SUCCESS

    serve(scenario)


def test_open_close_churn_leaks_no_fds(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "warm", b"w")
            await c.read_file(root, "warm")
            base = open_fds()
            await c.mkdir(root, "d")
            d, _ = await c.walk(root, ["d"])
            for i in range(40):
                await c.write_file(d, f"f{i}", b"x" * i)
                f = await open_rw(c, d, [f"f{i}"], L_O_RDONLY)
                assert await c.read(f, 0, 1000) == b"x" * i
                await c.clunk(f)
            dd = await open_rw(c, d, [], L_O_RDONLY | L_O_DIRECTORY)
            assert len(await c.readdir_all(dd)) == 42
            await c.clunk(dd)
            for i in range(40):
                await c.unlinkat(d, f"f{i}")
            await c.clunk(d)
            assert open_fds() == base

    serve(scenario)


def test_a_directory_moved_out_of_the_export_does_not_lead_outside(serve, canary: Path) -> None:  # type: ignore[no-untyped-def]
    """A fid held inside a directory that the host moves out of the export: '..' from it must
    not climb into the outside tree."""
    export: Path = serve.export
    (export / "sub" / "inner").mkdir()
    outside = {os.lstat(p).st_ino for p in (canary, canary.parent, Path("/"))}

    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            inner, _ = await c.walk(root, ["sub", "inner"])
            os.rename(export / "sub", canary / "moved-out")
            outside.add(os.lstat(canary / "moved-out").st_ino)
            try:
                for ups in (1, 2, 3, 5):
                    try:
                        r = await c.call(m.Twalk(inner, 200, [".."] * ups), m.Rwalk)
                    except OSError:
                        continue
                    assert all(q.path not in outside for q in r.wqid)
                    if len(r.wqid) == ups:
                        a = await c.getattr(200)
                        assert a.qid.path not in outside
                        names = await names_in(c, 200)
                        assert "secret" not in names and "canary" not in names
                        await c.clunk(200)
            finally:
                os.rename(canary / "moved-out", export / "sub")

    serve(scenario)
