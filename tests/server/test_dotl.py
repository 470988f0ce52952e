"""Every 9P2000.L message, end to end over every transport and backend, as the Linux client uses
them: what it sends and what it must get back."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

from ninep.protocol import messages as m
from ninep.protocol.numbers import (
    AT_REMOVEDIR,
    GETATTR_ALL,
    GETATTR_BASIC,
    GETATTR_BTIME,
    L_O_APPEND,
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_EXCL,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_TRUNC,
    L_O_WRONLY,
    NOFID,
    NOTAG,
    QTDIR,
    QTSYMLINK,
    SETATTR_ATIME,
    SETATTR_ATIME_SET,
    SETATTR_CTIME,
    SETATTR_GID,
    SETATTR_MODE,
    SETATTR_MTIME,
    SETATTR_MTIME_SET,
    SETATTR_SIZE,
    SETATTR_UID,
    V9P2000,
    V9P2000_L,
    V9P2000_U,
    VERSION_UNKNOWN,
    XATTR_CREATE,
    XATTR_REPLACE,
)
from ninep.server.policy import OperationPolicy
from ninep.server.session import SessionOptions
from tests.kits.e2e import fails, make_file, names_in, open_rw, raw_client
from tests.kits.harness import client_for

# --- version, auth, attach -------------------------------------------------------------------------


def test_version_negotiates_dialect_and_clamps_msize(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with raw_client(connect) as c:
            big = await c.rpc(m.Tversion(8 << 20, V9P2000_L), tag=NOTAG)
            assert isinstance(big, m.Rversion) and (big.msize, big.version) == (256 * 1024, V9P2000_L)
            small = await c.rpc(m.Tversion(8192, V9P2000_L), tag=NOTAG)
            assert (small.msize, small.version) == (8192, V9P2000_L)  # type: ignore[attr-defined]
            for asked, answered in ((V9P2000_U, V9P2000_U), (V9P2000, V9P2000), ("9P2000.x", V9P2000),
                                    ("9P3000", VERSION_UNKNOWN), ("", VERSION_UNKNOWN)):
                r = await c.rpc(m.Tversion(65536, asked), tag=NOTAG)
                assert r.version == answered, asked  # type: ignore[attr-defined]
            # After "unknown" the connection has no dialect: requests are refused until a good Tversion.
            await fails((errno.EPROTO, errno.EIO), c.rpc(m.Tattach(1, NOFID, "root", "")))
            await fails(errno.EMSGSIZE, c.rpc(m.Tversion(100, V9P2000_L), tag=NOTAG))

    serve(scenario, options=SessionOptions(max_msize=256 * 1024))


def test_large_messages_up_to_msize_and_iounit(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, msize=64 * 1024) as c:
            assert c.msize == 64 * 1024
            root = await c.attach()
            f, _ = await c.walk(root, [])
            _, iounit = await c.lcreate(f, "big", L_O_RDWR | L_O_CREAT, 0o644)
            assert 0 < iounit <= c.msize - 24
            data = os.urandom(c.msize - 23)  # the largest Twrite payload that fits msize
            assert await c.write(f, 0, data) == len(data)
            # A read asking for more than fits is answered with at most msize - 11 bytes.
            got = await c.call(m.Tread(f, 0, 1 << 30), m.Rread)
            assert bytes(got.data) == data[: c.msize - 11]

    serve(scenario)


def test_tversion_resets_the_session(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await c.version(65536, V9P2000_L)
            await fails(errno.EBADF, c.getattr(root))
            assert await c.attach() >= 1

    serve(scenario)


def test_auth_is_answered_with_an_error_and_attach_needs_no_afid(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            # ENOENT: "no authentication required", as diod answers and its client expects.
            await fails(errno.ENOENT, c.rpc(m.Tauth(7, "root", "", 0)))
            await fails(errno.EBADF, c.getattr(7))  # no afid was created
            await fails((errno.EINVAL, errno.EBADF), c.rpc(m.Tattach(1, 7, "root", "", 0)))
            root = await c.attach()
            a = await c.getattr(root)
            assert stat.S_ISDIR(a.mode) and a.qid.type & QTDIR
            await fails(errno.EBADF, c.rpc(m.Tattach(root, NOFID, "root", "", 0)))  # fid in use

    serve(scenario)


def test_attach_aname_selects_a_subdirectory(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await c.mkdir(root, "sub")
            sub, _ = await c.walk(root, ["sub"])
            await c.mkdir(sub, "inner")
            await make_file(c, sub, "f", b"in sub")
            await make_file(c, root, "top", b"top")
            for aname in ("sub", "/sub", "sub/"):
                r2 = await c.attach(aname)
                assert (await c.getattr(r2)).qid == (await c.getattr(sub)).qid
                assert await names_in(c, r2) == {"inner", "f"}
                assert await c.read_file(r2, "f") == b"in sub"
                await c.clunk(r2)
            deep = await c.attach("sub/inner")
            assert await names_in(c, deep) == set()
            await fails(errno.ENOENT, c.attach("missing"))
            await fails((errno.ENOTDIR, errno.ENOENT), c.attach("sub/f"))

    serve(scenario)


def test_attach_n_uname_owns_created_files(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            admin = await c.attach()
            await c.setattr(admin, SETATTR_MODE, mode=0o777)
            user = await c.attach(uname="", n_uname=1234)
            f, _ = await c.walk(user, [])
            await c.lcreate(f, "mine", L_O_WRONLY | L_O_CREAT, 0o600, gid=4321)
            a = await c.getattr(f)
            assert (a.uid, a.gid) == (1234, 4321)
            d = await c.mkdir(user, "dir", 0o700, gid=4321)
            dd, _ = await c.walk(user, ["dir"])
            a = await c.getattr(dd)
            assert (a.uid, a.gid) == (1234, 4321) and a.qid == d

    serve(scenario)


# --- walk ------------------------------------------------------------------------------------------


def test_walk_clone_zero_to_sixteen_names_and_limits(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            names = [f"d{i}" for i in range(17)]
            cur, _ = await c.walk(root, [])
            for n in names:
                await c.mkdir(cur, n)
                nxt, _ = await c.walk(cur, [n])
                await c.clunk(cur)
                cur = nxt
            deepest = (await c.getattr(cur)).qid
            # 0 names: a clone with the same qid, independent of the original.
            clone = c.new_fid()
            r = await c.call(m.Twalk(root, clone, []), m.Rwalk)
            assert r.wqid == [] and (await c.getattr(clone)).qid == (await c.getattr(root)).qid
            await c.clunk(clone)
            assert (await c.getattr(root)).qid.type & QTDIR
            # 16 names in one message, one qid per name.
            f16 = c.new_fid()
            r = await c.call(m.Twalk(root, f16, names[:16]), m.Rwalk)
            assert len(r.wqid) == 16 and all(q.type & QTDIR for q in r.wqid)
            # More than 16: EINVAL, newfid not created.
            f17 = c.new_fid()
            await fails(errno.EINVAL, c.rpc(m.Twalk(root, f17, names)))
            await fails(errno.EBADF, c.getattr(f17))
            # Walking a fid onto itself moves it.
            await c.call(m.Twalk(f16, f16, [names[16]]), m.Rwalk)
            assert (await c.getattr(f16)).qid == deepest
            # '..' goes up; '..' at the root stays at the root.
            up = c.new_fid()
            r = await c.call(m.Twalk(f16, up, [".."] * 3), m.Rwalk)
            assert r.wqid[-1] == (await c.getattr(up)).qid
            top = c.new_fid()
            r = await c.call(m.Twalk(root, top, [".."]), m.Rwalk)
            assert r.wqid == [(await c.getattr(root)).qid]
            # newfid already in use: refused.
            await fails(errno.EBADF, c.rpc(m.Twalk(root, up, ["d0"])))

    serve(scenario)


def test_partial_walk_reports_prefix_and_leaves_newfid_untouched(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await c.mkdir(root, "a")
            a, _ = await c.walk(root, ["a"])
            await c.mkdir(a, "b")
            await make_file(c, a, "file")
            newfid = 5000  # outside the client's allocator, which would recycle it after a clunk
            r = await c.call(m.Twalk(root, newfid, ["a", "b", "nope", "x"]), m.Rwalk)
            assert len(r.wqid) == 2 and r.wqid[0] == (await c.getattr(a)).qid
            await fails(errno.EBADF, c.getattr(newfid))
            await fails(errno.EBADF, c.rpc(m.Tclunk(newfid)))
            # Walking on through a regular file stops there as well.
            r = await c.call(m.Twalk(root, newfid, ["a", "file", "x"]), m.Rwalk)
            assert len(r.wqid) == 2
            await fails(errno.EBADF, c.getattr(newfid))
            # A first name that fails is an error, not an empty Rwalk.
            await fails(errno.ENOENT, c.rpc(m.Twalk(root, newfid, ["nope", "a"])))
            await fails(errno.EBADF, c.getattr(newfid))
            # A partial walk of a fid onto itself leaves the fid where it was.
            same, _ = await c.walk(root, [])
            r = await c.call(m.Twalk(same, same, ["a", "nope"]), m.Rwalk)
            assert len(r.wqid) == 1 and (await c.getattr(same)).qid == (await c.getattr(root)).qid
            # "." stays in place (diod's clients walk it), one qid per name as usual.
            r = await c.call(m.Twalk(root, newfid, [".", "a", ".", "b", "."]), m.Rwalk)
            qa, qb = (await c.getattr(a)).qid, r.wqid[3]
            assert r.wqid == [(await c.getattr(root)).qid, qa, qa, qb, qb] and (await c.getattr(newfid)).qid == qb
            await c.rpc(m.Tclunk(newfid))
            r = await c.call(m.Twalk(root, newfid, [".", "nope"]), m.Rwalk)
            assert len(r.wqid) == 1
            await fails(errno.EBADF, c.getattr(newfid))
            # Names a walk never accepts.
            for bad in ("a/b", ""):
                await fails((errno.EINVAL, errno.ENOENT), c.rpc(m.Twalk(root, newfid, [bad])))
            await fails(errno.EBADF, c.rpc(m.Twalk(999, newfid, ["a"])))

    serve(scenario)


# --- files -----------------------------------------------------------------------------------------


def test_lcreate_lopen_read_write_clunk(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            f, _ = await c.walk(root, [])
            qid, iounit = await c.lcreate(f, "file", L_O_RDWR | L_O_CREAT | L_O_EXCL, 0o640)
            assert qid.type == 0 and iounit > 0
            assert (await c.getattr(f)).mode == stat.S_IFREG | 0o640
            assert await c.write(f, 0, b"hello world") == 11
            assert await c.write(f, 20, b"!") == 1  # a hole reads as zeros
            assert await c.read(f, 0, 100) == b"hello world" + bytes(9) + b"!"
            assert await c.read(f, 6, 5) == b"world"
            assert await c.read(f, 21, 10) == b""
            assert await c.read(f, 1 << 40, 10) == b""
            await c.clunk(f)
            await fails(errno.EBADF, c.rpc(m.Tclunk(f)))
            await fails(errno.EEXIST, c.lcreate((await c.walk(root, []))[0], "file", L_O_RDWR | L_O_CREAT | L_O_EXCL, 0o644))
            # Read-only open refuses writes; write-only refuses reads.
            ro = await open_rw(c, root, ["file"], L_O_RDONLY)
            await fails(errno.EBADF, c.write(ro, 0, b"x"))
            wo = await open_rw(c, root, ["file"], L_O_WRONLY)
            await fails(errno.EBADF, c.read(wo, 0, 1))
            # Opening twice, reading an unopened fid.
            await fails((errno.EBUSY, errno.EINVAL, errno.EBADF), c.lopen(ro, L_O_RDONLY))
            plain, _ = await c.walk(root, ["file"])
            await fails(errno.EBADF, c.read(plain, 0, 1))
            await fails(errno.EBADF, c.write(plain, 0, b"x"))
            # O_TRUNC empties, O_APPEND appends.
            t = await open_rw(c, root, ["file"], L_O_WRONLY | L_O_TRUNC)
            assert (await c.getattr(t)).size == 0
            await c.write(t, 0, b"abc")
            ap = await open_rw(c, root, ["file"], L_O_WRONLY | L_O_APPEND)
            await c.write(ap, 0, b"def")
            assert await c.read_file(root, "file") == b"abcdef"
            # Directories open read-only only, and read through Treaddir, not Tread.
            d, _ = await c.walk(root, [])
            await fails(errno.EISDIR, c.lopen(d, L_O_WRONLY))
            await c.lopen(d, L_O_RDONLY | L_O_DIRECTORY)
            await fails(errno.EISDIR, c.read(d, 0, 10))
            fd_, _ = await c.walk(root, ["file"])
            await fails(errno.ENOTDIR, c.lopen(fd_, L_O_RDONLY | L_O_DIRECTORY))

    serve(scenario)


def test_remove_always_clunks(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f")
            await c.mkdir(root, "d")
            dfid, _ = await c.walk(root, ["d"])
            await make_file(c, dfid, "inside")
            f, _ = await c.walk(root, ["f"])
            await c.remove(f)
            await fails(errno.EBADF, c.getattr(f))
            assert await names_in(c, root) == {"d"}
            await fails(errno.ENOTEMPTY, c.remove(dfid))
            await fails(errno.EBADF, c.getattr(dfid))  # clunked even though the remove failed
            assert await names_in(c, root) == {"d"}

    serve(scenario)


def test_an_open_file_survives_unlink(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f", b"still here")
            f = await open_rw(c, root, ["f"])
            await c.unlinkat(root, "f")
            assert await c.read(f, 0, 100) == b"still here"
            await c.write(f, 0, b"STILL")
            assert await c.read(f, 0, 100) == b"STILL here"
            assert (await c.getattr(f)).nlink == 0

    serve(scenario)


def test_statfs(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            s = await c.statfs(root)
            assert s.bsize > 0 and s.namelen >= 255 and s.blocks >= s.bfree >= s.bavail
            if serve.kind == "local":
                v = os.statvfs(serve.export)
                assert (s.blocks, s.files, s.namelen) == (v.f_blocks, v.f_files, v.f_namemax)
            await fails(errno.EBADF, c.statfs(4242))

    serve(scenario)


def test_symlink_readlink_mknod_link_mkdir(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            q = await c.symlink(root, "ln", "some/where/../else")
            assert q.type & QTSYMLINK
            ln, _ = await c.walk(root, ["ln"])
            assert await c.readlink(ln) == "some/where/../else"
            assert stat.S_ISLNK((await c.getattr(ln)).mode)
            await fails((errno.ELOOP, errno.EINVAL, errno.ENXIO), c.lopen(ln, L_O_RDONLY))
            await fails(errno.EEXIST, c.symlink(root, "ln", "x"))
            await make_file(c, root, "plain", b"x")
            pf, _ = await c.walk(root, ["plain"])
            await fails(errno.EINVAL, c.readlink(pf))
            # mknod: a fifo, and a character device (root may create device nodes).
            await c.mknod(root, "fifo", stat.S_IFIFO | 0o600)
            ff, _ = await c.walk(root, ["fifo"])
            assert stat.S_ISFIFO((await c.getattr(ff)).mode)
            await c.mknod(root, "null", stat.S_IFCHR | 0o666, 1, 3)
            nf, _ = await c.walk(root, ["null"])
            a = await c.getattr(nf)
            assert stat.S_ISCHR(a.mode) and (os.major(a.rdev), os.minor(a.rdev)) == (1, 3)
            await fails(errno.EEXIST, c.mknod(root, "fifo", stat.S_IFIFO | 0o600))
            if serve.kind == "local":
                assert stat.S_ISFIFO(os.lstat(serve.export / "fifo").st_mode)
                assert os.readlink(serve.export / "ln") == "some/where/../else"
            # link: one inode, two names.
            await c.link(root, pf, "hard")
            hf, _ = await c.walk(root, ["hard"])
            ah, ap = await c.getattr(hf), await c.getattr(pf)
            assert ah.qid.path == ap.qid.path and ah.nlink == ap.nlink == 2
            await fails(errno.EEXIST, c.link(root, pf, "hard"))
            d, _ = await c.walk(root, [])
            await c.mkdir(root, "sub")
            sub, _ = await c.walk(root, ["sub"])
            await fails((errno.EPERM, errno.EISDIR), c.link(root, sub, "dirlink"))
            # mkdir: mode and qid.
            q = await c.mkdir(root, "made", 0o751)
            assert q.type & QTDIR
            md, _ = await c.walk(root, ["made"])
            a = await c.getattr(md)
            assert a.mode == stat.S_IFDIR | 0o751 and a.qid == q
            await fails(errno.EEXIST, c.mkdir(root, "made"))
            await fails(errno.ENOTDIR, c.mkdir(pf, "x"))

    # Device nodes on a host export need the policy's allow_devices (default-deny).
    serve(scenario, options=SessionOptions(policy=OperationPolicy(allow_devices=True)))


def test_rename_renameat_unlinkat(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await c.mkdir(root, "a")
            await c.mkdir(root, "b")
            a, _ = await c.walk(root, ["a"])
            b, _ = await c.walk(root, ["b"])
            await make_file(c, a, "f", b"payload")
            f, _ = await c.walk(a, ["f"])
            qid = (await c.getattr(f)).qid
            # Trename moves the file the fid refers to; the fid keeps referring to it.
            await c.rename(f, b, "g")
            assert await names_in(c, a) == set() and await names_in(c, b) == {"g"}
            assert (await c.getattr(f)).qid.path == qid.path
            await c.rename(f, b, "h")  # again, from its new place
            assert await names_in(c, b) == {"h"}
            # Trenameat by names; replaces an existing target file.
            await make_file(c, a, "other", b"old")
            await c.renameat(b, "h", a, "other")
            assert await names_in(c, a) == {"other"} and await names_in(c, b) == set()
            assert await c.read_file(a, "other") == b"payload"
            await fails(errno.ENOENT, c.renameat(b, "missing", a, "x"))
            # A directory cannot move into itself, and cannot replace a non-empty directory.
            await c.mkdir(a, "sub")
            await fails(errno.EINVAL, c.renameat(root, "a", a, "inside"))
            await c.mkdir(b, "full")
            bf, _ = await c.walk(b, ["full"])
            await make_file(c, bf, "x")
            await fails((errno.ENOTEMPTY, errno.EEXIST), c.renameat(a, "sub", b, "full"))
            # Tunlinkat: files; directories only with AT_REMOVEDIR and only when empty.
            await fails(errno.EISDIR, c.unlinkat(a, "sub"))
            await fails(errno.ENOTDIR, c.unlinkat(a, "other", AT_REMOVEDIR))
            await fails(errno.ENOTEMPTY, c.unlinkat(b, "full", AT_REMOVEDIR))
            await c.unlinkat(a, "sub", AT_REMOVEDIR)
            await c.unlinkat(a, "other")
            await fails(errno.ENOENT, c.unlinkat(a, "other"))
            assert await names_in(c, a) == set()
            if serve.kind == "local":
                assert sorted(os.listdir(serve.export)) == ["a", "b"]
                assert os.listdir(serve.export / "b" / "full") == ["x"]

    serve(scenario)


# --- attributes ------------------------------------------------------------------------------------


def test_getattr_every_mask_bit(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            before = time.time()
            await make_file(c, root, "f", b"x" * 5000, 0o604)
            f, _ = await c.walk(root, ["f"])
            a = await c.getattr(f, GETATTR_ALL)
            assert a.valid & GETATTR_BASIC == GETATTR_BASIC
            assert a.mode == stat.S_IFREG | 0o604 and a.size == 5000 and a.nlink == 1
            assert a.blksize > 0 and a.qid.type == 0
            for sec in (a.atime_sec, a.mtime_sec, a.ctime_sec):
                assert before - 5 <= sec <= time.time() + 5
            for nsec in (a.atime_nsec, a.mtime_nsec, a.ctime_nsec, a.btime_nsec):
                assert 0 <= nsec < 10**9
            if serve.kind == "local":
                st = os.stat(serve.export / "f")
                assert (a.mode, a.uid, a.gid, a.nlink, a.size, a.blocks) == (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_blocks)
                assert (a.mtime_sec, a.mtime_nsec) == (int(st.st_mtime), st.st_mtime_ns % 10**9)
                # btime where the host has it (statx; every filesystem these tests run on has it).
                assert a.valid & GETATTR_BTIME and before - 5 <= a.btime_sec <= time.time() + 5
            # Each single bit asked alone is answered (the server may answer more).
            for bit in range(14):
                r = await c.getattr(f, 1 << bit)
                assert r.qid == a.qid
                if (1 << bit) & GETATTR_BASIC:
                    assert r.valid & (1 << bit)
            await fails(errno.EBADF, c.getattr(31337))

    serve(scenario)


def test_setattr_mode_owner_size_times(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f", b"0123456789")
            f, _ = await c.walk(root, ["f"])
            await c.setattr(f, SETATTR_UID | SETATTR_GID, uid=1001, gid=1002)
            a = await c.getattr(f)
            assert (a.uid, a.gid) == (1001, 1002)
            # ctime alone: accepted, moves ctime to now (the local backend does it with a no-op
            # chown, as QEMU does, which also clears set-id bits: hence before the chmod).
            await c.setattr(f, SETATTR_CTIME)
            assert abs((await c.getattr(f)).ctime_sec - time.time()) < 5
            await c.setattr(f, SETATTR_MODE, mode=0o4751)  # after chown, which clears set-id bits
            assert (await c.getattr(f)).mode == stat.S_IFREG | 0o4751
            await c.setattr(f, SETATTR_SIZE, size=4)
            assert await c.read_file(root, "f") == b"0123"
            await c.setattr(f, SETATTR_SIZE, size=8)
            assert await c.read_file(root, "f") == b"0123" + bytes(4)
            await c.setattr(f, SETATTR_ATIME | SETATTR_ATIME_SET | SETATTR_MTIME | SETATTR_MTIME_SET,
                            atime=(1_000_000_000, 5), mtime=(1_100_000_000, 123456789))
            a = await c.getattr(f)
            assert (a.atime_sec, a.atime_nsec, a.mtime_sec, a.mtime_nsec) == (1_000_000_000, 5, 1_100_000_000, 123456789)
            await c.setattr(f, SETATTR_ATIME | SETATTR_MTIME)  # "now"
            a = await c.getattr(f)
            now = time.time()
            assert abs(a.atime_sec - now) < 5 and abs(a.mtime_sec - now) < 5
            if serve.kind == "local":
                st = os.stat(serve.export / "f")
                assert (st.st_size, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (8, 1001, 1002, 0o4751)
            d, _ = await c.walk(root, [])
            await fails(errno.EISDIR, c.setattr(d, SETATTR_SIZE, size=0))

    # A setuid mode on a host export needs the policy's allow_setid (default-deny).
    serve(scenario, options=SessionOptions(policy=OperationPolicy(allow_setid=True)))


# --- xattrs ----------------------------------------------------------------------------------------


def test_xattrs_list_get_set_flags_remove(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect, msize=8192) as c:
            root = await c.attach()
            await make_file(c, root, "f")
            f, _ = await c.walk(root, ["f"])
            await fails(errno.ENODATA, c.xattr_get(f, "user.none"))
            # A value written in several Twrites and read in several Treads (ext4 keeps xattrs
            # within one 4 KiB block, so the value stays below that).
            big = os.urandom(3500)
            x, _ = await c.walk(f, [])
            await c.call(m.Txattrcreate(x, "user.big", len(big), 0), m.Rxattrcreate)
            for off in range(0, len(big), 1000):
                assert await c.write(x, off, big[off:off + 1000]) == len(big[off:off + 1000])
            await fails(errno.EINVAL, c.write(x, 0, b"out of order"))
            await c.clunk(x)
            x = c.new_fid()
            assert (await c.call(m.Txattrwalk(f, x, "user.big"), m.Rxattrwalk)).size == len(big)
            assert b"".join([await c.read(x, off, 700) for off in range(0, len(big), 700)]) == big
            await c.clunk(x)
            await c.xattr_set(f, "user.small", b"v1", XATTR_CREATE)
            assert await c.xattr_get(f, "user.big") == big
            assert await c.xattr_get(f, "user.small") == b"v1"
            assert {"user.big", "user.small"} <= set(await c.xattr_list(f))
            # Flags are checked when the value is committed (at clunk), as Linux expects.
            await fails(errno.EEXIST, c.xattr_set(f, "user.small", b"v2", XATTR_CREATE))
            await fails(errno.ENODATA, c.xattr_set(f, "user.missing", b"v", XATTR_REPLACE))
            await c.xattr_set(f, "user.small", b"v3", XATTR_REPLACE)
            assert await c.xattr_get(f, "user.small") == b"v3"
            await c.xattr_set(f, "user.empty", b"")
            assert await c.xattr_get(f, "user.empty") == b""
            # removexattr: a zero-size create with XATTR_REPLACE.
            await c.xattr_set(f, "user.small", b"", XATTR_REPLACE)
            await fails(errno.ENODATA, c.xattr_get(f, "user.small"))
            assert "user.small" not in await c.xattr_list(f)
            if serve.kind == "local":
                assert os.getxattr(serve.export / "f", "user.big") == big
                assert "user.small" not in os.listxattr(serve.export / "f")
            # A value shorter than announced is refused at clunk and nothing is set.
            x, _ = await c.walk(f, [])
            await c.call(m.Txattrcreate(x, "user.short", 10, 0), m.Rxattrcreate)
            await c.write(x, 0, b"abc")
            await fails(errno.EINVAL, c.clunk(x))
            await fails(errno.ENODATA, c.xattr_get(f, "user.short"))
            # The xattrwalk fid is only for reading the value.
            xf = c.new_fid()
            r = await c.call(m.Txattrwalk(f, xf, "user.big"), m.Rxattrwalk)
            assert r.size == len(big)
            assert await c.read(xf, 100, 10) == big[100:110]
            await fails((errno.EINVAL, errno.EBADF), c.getattr(xf))
            await fails((errno.EINVAL, errno.EBADF), c.rpc(m.Twalk(xf, c.new_fid(), [])))
            await c.clunk(xf)

    serve(scenario)


# --- readdir ---------------------------------------------------------------------------------------


def test_readdir_offsets_are_cookies(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            await c.mkdir(root, "d")
            d, _ = await c.walk(root, ["d"])
            names = {f"entry-{i:03d}-{'x' * (i % 17)}" for i in range(60)}
            for n in sorted(names):
                await make_file(c, d, n)
            await c.mkdir(d, "subdir")
            await c.symlink(d, "link", "entry-000-")
            names |= {"subdir", "link"}
            await c.lopen(d, L_O_RDONLY | L_O_DIRECTORY)
            # Small counts force many calls; every entry comes exactly once, with its qid and type.
            seen: list[str] = []
            offset, calls = 0, 0
            while True:
                batch = await c.readdir(d, offset, 200)
                if not batch:
                    break
                assert sum(24 + len(e[3].encode()) for e in batch) <= 200
                calls += 1
                for qid, _off, dtype, name in batch:
                    seen.append(name)
                    if name == "subdir":
                        assert dtype == 4 and qid.type & QTDIR
                    elif name == "link":
                        assert dtype == 10
                    elif name.startswith("entry"):
                        assert dtype == 8
                offset = batch[-1][1]
            assert calls > 5
            assert sorted(seen) == sorted(names | {".", ".."})
            # A cookie can be used again, from another fid too, and gives the same continuation.
            first = await c.readdir(d, 0, 300)
            mid = first[len(first) // 2][1]
            again = await c.readdir(d, mid, 300)
            d2 = await open_rw(c, root, ["d"], L_O_RDONLY | L_O_DIRECTORY)
            assert [e[3] for e in await c.readdir(d2, mid, 300)] == [e[3] for e in again]
            # Entries removed after a cookie was handed out: the listing continues after it with
            # the remaining entries, none repeated, none of the survivors lost.
            head = []
            offset = 0
            while len(head) < 20:
                batch = await c.readdir(d, offset, 150)
                head += batch
                offset = batch[-1][1]
            head_names = {e[3] for e in head}
            rest_before = {e[3] for e in await c.readdir_all(d)} - head_names
            removed = set(sorted(rest_before - {".", ".."})[::3]) | set(sorted(head_names - {".", ".."})[:5])
            for n in removed:
                await c.unlinkat(d, n, AT_REMOVEDIR if n == "subdir" else 0)
            tail: list[str] = []
            while True:
                batch = await c.readdir(d, offset, 150)
                if not batch:
                    break
                tail += [e[3] for e in batch]
                offset = batch[-1][1]
            assert len(tail) == len(set(tail))
            assert set(tail) == rest_before - removed
            # A count too small for one entry is an error, not an endless empty answer.
            await fails(errno.EINVAL, c.readdir(d, 0, 10))
            nd, _ = await c.walk(root, ["d"])
            await fails(errno.EBADF, c.readdir(nd, 0, 100))  # not open

    serve(scenario)


def test_fsync_and_datasync(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            f, _ = await c.walk(root, [])
            await c.lcreate(f, "f", L_O_RDWR | L_O_CREAT, 0o644)
            await c.write(f, 0, b"durable")
            await c.fsync(f)
            await c.fsync(f, datasync=True)
            if serve.kind == "local":
                assert (serve.export / "f").read_bytes() == b"durable"
            d = await open_rw(c, root, [], L_O_RDONLY | L_O_DIRECTORY)
            await c.fsync(d)
            unopened, _ = await c.walk(root, ["f"])
            await fails(errno.EBADF, c.fsync(unopened))

    serve(scenario)


def test_flush_of_an_unknown_or_finished_tag_is_answered(serve) -> None:  # type: ignore[no-untyped-def]
    async def scenario(server: Any, connect: Any) -> None:
        async with client_for(connect) as c:
            root = await c.attach()
            for oldtag in (0, 17, 0xFFFE):
                assert isinstance(await c.rpc(m.Tflush(oldtag)), m.Rflush)
            assert (await c.getattr(root)).qid.type & QTDIR

    serve(scenario)


