"""security_model=mapped-xattr: the on-disk format QEMU's hw/9pfs/9p-local.c writes and reads
(user.virtfs.uid/gid/mode as little-endian u32, rdev as little-endian u64; special files and
symlinks stored as regular files), namespace hiding, and running without privilege."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fs_backends.base import Cred, SetAttr
from fs_backends.local import LocalBackend, backend_for_model
from fs_backends.security import Credentials, MappedFileCredentials, MappedXattrCredentials
from ninep.protocol import numbers as P

from .conftest import Sync

RW = P.L_O_RDWR
CLIENT = Cred(1234, 5678, "client")


def xattrs(p: Path) -> dict[str, bytes]:
    return {n: os.getxattr(p, n) for n in os.listxattr(p, follow_symlinks=False)}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


@pytest.fixture
def mfs(tmp_path: Path) -> Iterator[tuple[Sync, Path]]:
    export = tmp_path / "export"
    export.mkdir()
    b = Sync(LocalBackend(str(export), credentials=MappedXattrCredentials()))
    yield b, export
    b.aclose()


def test_on_disk_format_written(mfs: tuple[Sync, Path]) -> None:
    fs, export = mfs
    root = fs.attach("", CLIENT)
    n, f = fs.create(root, "file", RW, 0o644, CLIENT)
    fs.write(f, 0, b"data")
    fs.close(f)
    fs.mkdir(root, "dir", 0o755, CLIENT)
    fs.mknod(root, "chr", stat.S_IFCHR | 0o620, 4, 64, CLIENT)
    fs.mknod(root, "fifo", stat.S_IFIFO | 0o640, 0, 0, CLIENT)
    fs.symlink(root, "link", "../some/where", CLIENT)

    me = (os.geteuid(), os.getegid())
    for name, host_mode in (
        ("file", stat.S_IFREG | 0o600),
        ("dir", stat.S_IFDIR | 0o700),
        ("chr", stat.S_IFREG | 0o600),
        ("fifo", stat.S_IFREG | 0o600),
        ("link", stat.S_IFREG | 0o600),
    ):
        st = os.lstat(export / name)
        assert st.st_mode == host_mode, name
        assert (st.st_uid, st.st_gid) == me, name

    assert xattrs(export / "file") == {
        "user.virtfs.uid": u32(1234),
        "user.virtfs.gid": u32(5678),
        "user.virtfs.mode": u32(stat.S_IFREG | 0o644),
    }
    assert xattrs(export / "dir")["user.virtfs.mode"] == u32(stat.S_IFDIR | 0o755)
    x = xattrs(export / "chr")
    assert x["user.virtfs.mode"] == u32(stat.S_IFCHR | 0o620)
    assert x["user.virtfs.rdev"] == struct.pack("<Q", os.makedev(4, 64))
    assert xattrs(export / "fifo")["user.virtfs.mode"] == u32(stat.S_IFIFO | 0o640)
    assert xattrs(export / "link")["user.virtfs.mode"] == u32(stat.S_IFLNK | 0o777)
    assert (export / "link").read_bytes() == b"../some/where"
    assert (export / "file").read_bytes() == b"data"


def test_reads_an_export_written_by_qemu(tmp_path: Path) -> None:
    """Files laid out as QEMU leaves them read back as the client made them."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(b"x")
    os.setxattr(export / "f", "user.virtfs.uid", u32(1000))
    os.setxattr(export / "f", "user.virtfs.gid", u32(100))
    os.setxattr(export / "f", "user.virtfs.mode", u32(stat.S_IFREG | 0o4755))
    (export / "blk").write_bytes(b"")
    os.setxattr(export / "blk", "user.virtfs.mode", u32(stat.S_IFBLK | 0o660))
    os.setxattr(export / "blk", "user.virtfs.rdev", struct.pack("<Q", os.makedev(8, 1)))
    (export / "sym").write_bytes(b"/target/path")
    os.setxattr(export / "sym", "user.virtfs.mode", u32(stat.S_IFLNK | 0o777))
    (export / "plain").write_bytes(b"")  # no metadata: host values show through
    (export / "d").mkdir()
    os.setxattr(export / "d", "user.virtfs.mode", u32(stat.S_IFDIR | 0o1777))

    fs = Sync(LocalBackend(str(export), credentials=MappedXattrCredentials()))
    root = fs.attach("", CLIENT)
    f, blk, sym, plain, d = (fs.walk(root, [n])[0] for n in ("f", "blk", "sym", "plain", "d"))
    a = fs.getattr(f, P.GETATTR_ALL)
    assert (a.uid, a.gid, a.mode) == (1000, 100, stat.S_IFREG | 0o4755)
    a = fs.getattr(blk, P.GETATTR_ALL)
    assert a.mode == stat.S_IFBLK | 0o660 and a.rdev == os.makedev(8, 1)
    assert sym.qid.type == P.QTSYMLINK
    assert stat.S_ISLNK(fs.getattr(sym, P.GETATTR_ALL).mode)
    assert fs.readlink(sym) == "/target/path"
    st = os.stat(export / "plain")
    a = fs.getattr(plain, P.GETATTR_ALL)
    assert (a.uid, a.mode) == (st.st_uid, st.st_mode)
    assert stat.S_IMODE(fs.getattr(d, P.GETATTR_ALL).mode) == 0o1777
    # Special files are never opened, even though they are regular files on the host.
    for node in (blk, sym):
        with pytest.raises(OSError):
            fs.open(node, P.L_O_RDONLY, CLIENT)
    with pytest.raises(OSError) as ei:
        fs.readlink(f)
    assert ei.value.errno == errno.EINVAL
    # readdir reports the client's types.
    fd = fs.open(root, P.L_O_RDONLY, CLIENT)
    ents = {e.name: e for e in fs.readdir(fd, 0, 100)}
    fs.close(fd)
    assert ents["sym"].type == P.DT_LNK and ents["sym"].qid.type == P.QTSYMLINK
    assert ents["blk"].type == P.DT_BLK
    assert ents["d"].type == P.DT_DIR and ents["f"].type == P.DT_REG
    fs.aclose()


def test_setattr_records_in_xattrs(mfs: tuple[Sync, Path]) -> None:
    fs, export = mfs
    root = fs.attach("", CLIENT)
    fs.mknod(root, "p", stat.S_IFIFO | 0o644, 0, 0, CLIENT)
    p = fs.walk(root, ["p"])[0]
    fs.setattr(p, SetAttr(P.SETATTR_MODE, mode=0o600), CLIENT)
    fs.setattr(p, SetAttr(P.SETATTR_UID, uid=42), CLIENT)
    fs.setattr(p, SetAttr(P.SETATTR_GID, gid=43), CLIENT)
    a = fs.getattr(p, P.GETATTR_ALL)
    assert (a.mode, a.uid, a.gid) == (stat.S_IFIFO | 0o600, 42, 43)
    x = xattrs(export / "p")
    assert x["user.virtfs.mode"] == u32(stat.S_IFIFO | 0o600)
    assert (x["user.virtfs.uid"], x["user.virtfs.gid"]) == (u32(42), u32(43))
    st = os.lstat(export / "p")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


def test_virtfs_names_hidden_and_refused(mfs: tuple[Sync, Path]) -> None:
    fs, export = mfs
    root = fs.attach("", CLIENT)
    n, f = fs.create(root, "f", RW, 0o644, CLIENT)
    fs.close(f)
    fs.xattr_set(n, "user.mine", b"1", 0)
    assert fs.xattr_list(n) == ["user.mine"]
    with pytest.raises(OSError) as ei:
        fs.xattr_get(n, "user.virtfs.uid")
    assert ei.value.errno == errno.ENODATA
    for op in (
        lambda: fs.xattr_set(n, "user.virtfs.uid", u32(0), 0),
        lambda: fs.xattr_remove(n, "user.virtfs.mode"),
    ):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.EACCES
    for name in ("trusted.x", "security.x"):
        with pytest.raises(OSError) as ei:
            fs.xattr_set(n, name, b"1", 0)
        assert ei.value.errno == errno.EOPNOTSUPP
    assert xattrs(export / "f")["user.virtfs.uid"] == u32(1234)


def test_posix_acls_are_mapped(mfs: tuple[Sync, Path]) -> None:
    fs, export = mfs
    root = fs.attach("", CLIENT)
    n, f = fs.create(root, "f", RW, 0o644, CLIENT)
    fs.close(f)
    acl = b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
    fs.xattr_set(n, "system.posix_acl_access", acl, 0)
    assert os.getxattr(export / "f", "user.virtfs.system.posix_acl_access") == acl
    assert "system.posix_acl_access" not in os.listxattr(export / "f")
    assert fs.xattr_get(n, "system.posix_acl_access") == acl
    assert "system.posix_acl_access" in fs.xattr_list(n)
    fs.xattr_remove(n, "system.posix_acl_access")
    fs.xattr_remove(n, "system.posix_acl_default")  # never set: still succeeds


def test_backend_for_model() -> None:
    d = tempfile.mkdtemp()
    try:
        b = backend_for_model(d, model="mapped-xattr")
        assert b.info.extra["security_model"] == "mapped-xattr"
        trio.run(b.aclose)

        class Opts:
            fmode = 0o640
            dmode = 0o750

        b = backend_for_model(d, model="mapped", options=Opts())
        assert isinstance(b.creds, MappedXattrCredentials) and b.creds.fmode == 0o640
        trio.run(b.aclose)
        with pytest.raises(ValueError):
            backend_for_model(d, model="none", options=Opts())
        b = backend_for_model(d, model="mapped-file")
        assert b.info.extra["security_model"] == "mapped-file"
        trio.run(b.aclose)
        with pytest.raises(ValueError):
            backend_for_model(d, model="proxy")
    finally:
        shutil.rmtree(d)


NOBODY = 65534


def _fresh_offload_pool() -> None:
    """A forked child has none of the parent's worker threads: give it a pool of its own."""
    from fs_backends import offload

    offload._pool = offload._Pool(offload._WORKERS)


@pytest.mark.parametrize("model", [MappedXattrCredentials, MappedFileCredentials])
def test_mapped_works_unprivileged(model: type[Credentials]) -> None:
    """The point of the mapped models: an unprivileged server still gives clients their owners,
    modes and device nodes."""
    d = tempfile.mkdtemp()
    export = Path(d) / "export"
    export.mkdir()
    os.chmod(d, 0o755)
    os.chown(export, NOBODY, NOBODY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody and serves
        code = 1
        try:
            os.close(r)
            _fresh_offload_pool()
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)

            async def work() -> dict[str, object]:
                b = LocalBackend(str(export), credentials=model())
                c = Cred(0, 0, "root")
                root = await b.attach("", c)
                await b.mknod(root, "dev", stat.S_IFCHR | 0o600, 1, 3, c)
                n, f = await b.create(root, "f", RW, 0o4755, c)
                await b.close(f)
                await b.setattr(n, SetAttr(P.SETATTR_UID | P.SETATTR_GID, uid=0, gid=0), c)
                dev = (await b.walk(root, ["dev"]))[0]
                a1 = await b.getattr(dev, P.GETATTR_ALL)
                a2 = await b.getattr(n, P.GETATTR_ALL)
                await b.aclose()
                return {
                    "dev": [a1.mode, a1.uid, a1.rdev],
                    "f": [a2.mode, a2.uid, a2.gid],
                }

            os.write(w, json.dumps(trio.run(work)).encode())
            code = 0
        except BaseException as e:  # report, never return into pytest
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        out = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out["dev"] == [stat.S_IFCHR | 0o600, 0, os.makedev(1, 3)]
        assert out["f"] == [stat.S_IFREG | 0o4755, 0, 0]
        st = os.lstat(export / "dev")
        assert stat.S_ISREG(st.st_mode) and st.st_uid == NOBODY
    finally:
        shutil.rmtree(d)


def test_none_model_unprivileged() -> None:
    """security_model=none run by an ordinary user: files are created as that user with the
    exact mode asked for; changing the owner later is refused (EPERM), not faked."""
    from fs_backends.security import NoneCredentials

    d = tempfile.mkdtemp()
    export = Path(d) / "export"
    export.mkdir()
    os.chmod(d, 0o755)
    os.chown(export, NOBODY, NOBODY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            _fresh_offload_pool()
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.umask(0o077)

            async def work() -> dict[str, object]:
                b = LocalBackend(str(export), credentials=NoneCredentials())
                root = await b.attach("", CLIENT)
                n, f = await b.create(root, "f", RW, 0o664, CLIENT)
                await b.close(f)
                await b.mkdir(root, "d", 0o775, CLIENT)
                try:
                    await b.setattr(n, SetAttr(P.SETATTR_UID, uid=0), CLIENT)
                    chown = "allowed"
                except OSError as e:
                    chown = errno.errorcode[e.errno]
                try:
                    await b.mknod(root, "dev", stat.S_IFCHR | 0o600, 1, 3, CLIENT)
                    mknod = "allowed"
                except OSError as e:
                    mknod = errno.errorcode[e.errno]
                await b.mknod(root, "fifo", stat.S_IFIFO | 0o600, 0, 0, CLIENT)
                # Without CAP_DAC_READ_SEARCH nothing can be reopened by handle: reclaimed fds
                # are reopened by name below their parent instead.
                reclaim = "by name" if b._pool.by_path else "by handle"
                await b.aclose()
                return {"chown": chown, "mknod": mknod, "reclaim": reclaim}

            os.write(w, json.dumps(trio.run(work)).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        out = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out == {"chown": "EPERM", "mknod": "EPERM", "reclaim": "by name"}
        for name, mode in (("f", 0o664), ("d", 0o775)):
            st = os.lstat(export / name)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, mode), name
        assert stat.S_ISFIFO(os.lstat(export / "fifo").st_mode)
    finally:
        shutil.rmtree(d)
