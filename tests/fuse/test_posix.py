"""What POSIX tools expect from a mounted export, on every kind of mount (see conftest.py).

Every test works in its own directory of a module-wide mount. Where a kind behaves differently
the test says so next to the difference.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import Mount

Work = tuple[Path, "Path | None"]


def sh(*cmd: str, **kw: object) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return str(r.stdout)


def xattrs(p: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(p, n, follow_symlinks=False)
        for n in os.listxattr(p, follow_symlinks=False)
        if n.startswith("user.")
    }


def test_ls_l(work: Work) -> None:
    d, host = work
    (d / "file").write_bytes(b"x" * 1234)
    os.chmod(d / "file", 0o640)
    (d / "sub").mkdir(mode=0o750)
    os.symlink("file", d / "link")
    out = sh("ls", "-l", "--time-style=+", str(d))
    lines = {
        ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in out.splitlines()[1:]
    }
    assert lines["file"].startswith("-rw-r-----") and " 1234 " in lines["file"]
    assert lines["sub"].startswith("drwxr-x---")
    assert lines["link"].startswith("lrwxrwxrwx") and lines["link"].endswith("link -> file")
    assert sorted(os.listdir(d)) == ["file", "link", "sub"]
    if host is not None:  # the host directory shows the same thing
        assert sorted(os.listdir(host)) == ["file", "link", "sub"]
        assert (host / "file").stat().st_size == 1234


def _make_tree(src: Path) -> None:
    (src / "dir" / "deeper").mkdir(parents=True)
    (src / "plain").write_bytes(b"plain data\n")
    (src / "dir" / "exec").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src / "dir" / "exec", 0o751)
    (src / "dir" / "deeper" / "secret").write_bytes(b"s" * 70000)
    os.chmod(src / "dir" / "deeper" / "secret", 0o600)
    os.link(src / "plain", src / "dir" / "hardlink")
    os.symlink("../plain", src / "dir" / "rel-symlink")
    os.symlink("/nonexistent/target", src / "dangling")
    os.setxattr(src / "plain", "user.colour", b"blue")
    os.setxattr(src / "dir", "user.empty", b"")
    os.setxattr(src / "dir" / "exec", "user.bin", bytes(range(256)))
    os.chmod(src / "dir" / "deeper", 0o711)
    stamp = 981173106  # 2001-02-03
    for i, p in enumerate(sorted(src.rglob("*"))):
        os.utime(
            p,
            ns=((stamp + i) * 10**9 + 123456789, (stamp + 2 * i) * 10**9 + 987654321),
            follow_symlinks=False,
        )


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything cp -a should preserve, keyed by relative path; hard links by group."""
    snap: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        first = inodes.setdefault(st.st_ino, rel)
        content: object
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            content = p.read_bytes()
        else:
            content = None
        snap[rel] = (
            stat.filemode(st.st_mode),
            st.st_mtime_ns if not stat.S_ISLNK(st.st_mode) else None,
            content,
            first,  # same 'first' name == same inode (hard links)
            st.st_nlink if stat.S_ISREG(st.st_mode) else None,
            tuple(sorted(xattrs(p).items())) if not stat.S_ISLNK(st.st_mode) else (),
        )
    return snap


def test_cp_a_preserves_everything(work: Work, mount: Mount, tmp_path: Path) -> None:
    d, host = work
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src)
    if mount.kind == "diod":
        # diod (like QEMU) takes a zero-length Txattrcreate as "remove": 9P2000.L cannot
        # carry an empty xattr value to it, so that one attribute is not copied.
        os.removexattr(src / "dir", "user.empty")
    want = _snapshot(src)
    sh("cp", "-a", str(src), str(d / "copy"))
    assert _snapshot(d / "copy") == want
    # and back out of the mount
    sh("cp", "-a", str(d / "copy"), str(tmp_path / "back"))
    assert _snapshot(tmp_path / "back") == want
    if host is not None:
        assert _snapshot(host / "copy") == want


def test_mv_across_directories(work: Work) -> None:
    d, host = work
    (d / "a" / "inner").mkdir(parents=True)
    (d / "b").mkdir()
    (d / "a" / "f").write_bytes(b"moving")
    (d / "a" / "inner" / "g").write_bytes(b"deep")
    ino = (d / "a" / "f").stat().st_ino
    sh("mv", str(d / "a" / "f"), str(d / "b" / "f2"))
    sh("mv", str(d / "a" / "inner"), str(d / "b"))
    assert not (d / "a" / "f").exists() and not (d / "a" / "inner").exists()
    assert (d / "b" / "f2").read_bytes() == b"moving"
    assert (d / "b" / "f2").stat().st_ino == ino  # a rename keeps the inode
    assert (d / "b" / "inner" / "g").read_bytes() == b"deep"
    # replacing an existing file
    (d / "b" / "victim").write_bytes(b"old")
    sh("mv", str(d / "b" / "f2"), str(d / "b" / "victim"))
    assert (d / "b" / "victim").read_bytes() == b"moving"
    assert sorted(os.listdir(d / "b")) == ["inner", "victim"]
    if host is not None:
        assert (host / "b" / "victim").read_bytes() == b"moving"


def test_rename_flags(work: Work) -> None:
    """renameat2 flags: 9P has no RENAME_NOREPLACE/EXCHANGE, so the mount answers EINVAL (as
    Linux v9fs does; mv and gnulib fall back to rename). An existing target is refused with
    EEXIST by the kernel before the request reaches the mount."""
    d, _ = work
    (d / "x").write_bytes(b"x")
    (d / "y").write_bytes(b"y")
    libc = ctypes.CDLL(None, use_errno=True)
    RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
    for target, flags, err in (
        ("y", RENAME_NOREPLACE, errno.EEXIST),
        ("z", RENAME_NOREPLACE, errno.EINVAL),
        ("y", RENAME_EXCHANGE, errno.EINVAL),
    ):
        r = libc.renameat2(-100, bytes(d / "x"), -100, bytes(d / target), flags)
        assert (r, ctypes.get_errno()) == (-1, err), (target, flags)
    assert (d / "x").read_bytes() == b"x" and (d / "y").read_bytes() == b"y"
    assert sorted(os.listdir(d)) == ["x", "y"]


def test_rm_rf_deep_tree(work: Work) -> None:
    d, host = work
    p = d / "top"
    for i in range(40):
        p = p / f"level{i}"
    p.mkdir(parents=True)
    q = d / "top"
    for i in range(40):
        (q / f"file{i}").write_bytes(b"z" * i)
        os.symlink("nowhere", q / f"sym{i}")
        q = q / f"level{i}"
    sh("rm", "-rf", str(d / "top"))
    assert os.listdir(d) == []
    if host is not None:
        assert os.listdir(host) == []


def test_chmod_chown_touch(work: Work, mount: Mount) -> None:
    d, host = work
    f = d / "f"
    f.write_bytes(b"meta")
    sh("chmod", "4751", str(f))
    assert stat.S_IMODE(f.stat().st_mode) == 0o4751
    sh("chmod", "0644", str(f))
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    sh("chown", "1234:5678", str(f))
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    sh("touch", "-d", "2001-02-03 04:05:06.123456789", str(f))
    st = f.stat()
    want = int(time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))) * 10**9 + 123456789
    assert st.st_mtime_ns == want and st.st_atime_ns == want
    sh("touch", "-m", "-d", "2002-01-01 00:00:00", str(f))
    assert f.stat().st_atime_ns == want
    assert f.stat().st_mtime_ns == int(time.mktime((2002, 1, 1, 0, 0, 0, 0, 0, -1))) * 10**9
    before = time.time_ns()
    sh("touch", str(f))  # utimensat(UTIME_NOW)
    assert f.stat().st_mtime_ns >= before - 2 * 10**9
    os.utime(f, ns=(5 * 10**9, 6 * 10**9))
    assert (f.stat().st_atime_ns, f.stat().st_mtime_ns) == (5 * 10**9, 6 * 10**9)
    if host is not None:
        hs = (host / "f").stat()
        assert (hs.st_uid, hs.st_gid, hs.st_mtime_ns) == (1234, 5678, 6 * 10**9)


def test_files_belong_to_their_creator(work: Work) -> None:
    """A user other than the one who mounted creates files, directories, symlinks and fifos:
    they are theirs (locally through the passthrough model; over 9P, where the attach user
    creates, by a chown that follows)."""
    d, host = work
    os.chmod(d, 0o1777)
    as_user = ["setpriv", "--reuid=1234", "--regid=5678", "--clear-groups"]
    # started in the directory: the user cannot search pytest's 0700 parents
    sh(*as_user, "sh", "-c", "echo x > f && mkdir sub && ln -s f sym && mkfifo p", cwd=d)
    for name in ("f", "sub", "sym", "p"):
        st = (d / name).lstat()
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
        if host is not None:
            hst = (host / name).lstat()
            assert (hst.st_uid, hst.st_gid) == (1234, 5678), name
    with pytest.raises(subprocess.CalledProcessError):  # and the kernel checks modes for them
        subprocess.run([*as_user, "chmod", "0777", "."], cwd=d, check=True, capture_output=True)


def test_truncate(work: Work) -> None:
    d, _ = work
    f = d / "t"
    f.write_bytes(b"0123456789")
    sh("truncate", "-s", "4", str(f))
    assert f.read_bytes() == b"0123"
    sh("truncate", "-s", "8", str(f))
    assert f.read_bytes() == b"0123\0\0\0\0"
    with open(f, "r+b") as fp:
        os.ftruncate(fp.fileno(), 2)
        assert os.fstat(fp.fileno()).st_size == 2
        fp.seek(0)
        assert fp.read() == b"01"
    with open(f, "wb") as fp:  # O_TRUNC
        fp.write(b"new")
    assert f.read_bytes() == b"new"


def test_links(work: Work) -> None:
    d, host = work
    (d / "orig").write_bytes(b"linked")
    sh("ln", str(d / "orig"), str(d / "hard"))
    sh("ln", "-s", "orig", str(d / "soft"))
    (d / "sub").mkdir()
    sh("ln", "-s", "sub", str(d / "dirlink"))
    a, b = (d / "orig").stat(), (d / "hard").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    assert os.readlink(d / "soft") == "orig"
    assert (d / "soft").read_bytes() == b"linked"
    (d / "dirlink" / "inside").write_bytes(b"i")
    assert (d / "sub" / "inside").read_bytes() == b"i"
    os.unlink(d / "orig")
    assert (d / "hard").stat().st_nlink == 1
    assert (d / "hard").read_bytes() == b"linked"
    assert not (d / "soft").exists() and (d / "soft").is_symlink()
    if host is not None:
        assert os.readlink(host / "soft") == "orig"


def test_mkfifo(work: Work) -> None:
    d, host = work
    sh("mkfifo", "-m", "0600", str(d / "pipe"))
    st = (d / "pipe").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    got: list[bytes] = []

    def reader() -> None:
        with open(d / "pipe", "rb") as r:
            got.append(r.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(d / "pipe", "wb") as w:  # the kernel's pipe, not the FUSE server, carries it
        w.write(b"through the fifo")
    t.join(10)
    assert got == [b"through the fifo"]
    if host is not None:
        assert stat.S_ISFIFO((host / "pipe").lstat().st_mode)


def test_xattrs(work: Work) -> None:
    d, host = work
    f = d / "x"
    f.write_bytes(b"")
    sh("setfattr", "-n", "user.one", "-v", "first", str(f))
    sh("setfattr", "-n", "user.two", "-v", "0x00ff10", str(f))
    out = sh("getfattr", "-d", "-e", "hex", str(f))
    assert "user.one=0x6669727374" in out and "user.two=0x00ff10" in out
    assert sorted(n for n in os.listxattr(f) if n.startswith("user.")) == ["user.one", "user.two"]
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.one", b"again", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.none", b"v", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(f, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.one") == b"replaced"
    big = os.urandom(4000)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    sh("setfattr", "-x", "user.two", str(f))
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.two")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.removexattr(f, "user.two")
    assert e.value.errno == errno.ENODATA
    if host is not None:
        assert os.getxattr(host / "x", "user.one") == b"replaced"


LOCKER = r"""
import fcntl, sys, time
kind, path = sys.argv[1], sys.argv[2]
f = open(path, "r+b")
if kind == "flock":
    fcntl.flock(f, fcntl.LOCK_EX)
else:
    fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks(work: Work, kind: str) -> None:
    """flock and fcntl locks: pyfuse3 has no lock handlers, so the kernel keeps them for the
    mount (they exclude processes on this machine, not other 9P clients)."""
    d, _ = work
    f = d / "lockme"
    f.write_bytes(b"\0" * 100)
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, kind, str(f)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with open(f, "r+b") as fp:
            with pytest.raises(BlockingIOError):
                if kind == "flock":
                    fcntl.flock(fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.lockf(fp, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 2)
            if kind == "fcntl":  # outside the held range is free
                fcntl.lockf(fp, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
                fcntl.lockf(fp, fcntl.LOCK_UN, 10, 50)
        assert holder.stdin is not None
        holder.stdin.write(b"\n")
        holder.stdin.flush()
        holder.wait(10)
        with open(f, "r+b") as fp:
            if kind == "flock":
                fcntl.flock(fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(fp, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    finally:
        holder.kill()
        holder.wait()


def test_df(work: Work, mount: Mount) -> None:
    d, host = work
    out = sh("df", "-P", str(d)).splitlines()
    assert len(out) == 2 and out[1].split()[-1] == str(mount.path)
    vfs = os.statvfs(d)
    assert vfs.f_blocks > 0 and vfs.f_bsize > 0 and 0 <= vfs.f_bavail <= vfs.f_blocks
    assert vfs.f_namemax >= 255
    if host is not None:
        h = os.statvfs(host)
        # the same filesystem seen through the mount (sizes within what the tests write)
        assert abs(vfs.f_blocks * vfs.f_frsize - h.f_blocks * h.f_frsize) <= 1 << 30


def test_sparse_file_over_4gib(work: Work) -> None:
    d, host = work
    f = d / "sparse"
    off = 5 * 1024**3 + 12345
    with open(f, "wb") as fp:
        fp.write(b"start")
        fp.seek(off)
        fp.write(b"the end")
    st = f.stat()
    assert st.st_size == off + 7
    assert st.st_blocks * 512 < 64 * 1024**2  # still sparse
    with open(f, "rb") as fp:
        assert fp.read(5) == b"start"
        fp.seek(4 * 1024**3 - 3)
        assert fp.read(6) == b"\0" * 6
        fp.seek(off - 2)
        assert fp.read() == b"\0\0the end"
    os.truncate(f, 6 * 1024**3)
    assert f.stat().st_size == 6 * 1024**3
    if host is not None:
        assert (host / "sparse").stat().st_size == 6 * 1024**3


def test_mmap_read_write(work: Work) -> None:
    d, host = work
    f = d / "mapped"
    size = 3 * mmap.PAGESIZE + 100
    f.write_bytes(bytes(i % 251 for i in range(size)))
    with open(f, "r+b") as fp:
        m = mmap.mmap(fp.fileno(), 0)
        assert m[:5] == bytes(range(5)) and m[size - 1] == (size - 1) % 251
        m[10:20] = b"ABCDEFGHIJ"
        m[2 * mmap.PAGESIZE : 2 * mmap.PAGESIZE + 4] = b"page"
        m.flush()
        m.close()
    data = f.read_bytes()
    assert data[10:20] == b"ABCDEFGHIJ"
    assert data[2 * mmap.PAGESIZE : 2 * mmap.PAGESIZE + 4] == b"page"
    with open(f, "r+b") as fp:  # a write() is seen by a later read-only mapping
        os.pwrite(fp.fileno(), b"XY", 1)
        m = mmap.mmap(fp.fileno(), 0, prot=mmap.PROT_READ)
        assert m[0:4] == bytes([0]) + b"XY" + bytes([3])
        m.close()
    if host is not None:
        assert (host / "mapped").read_bytes()[10:20] == b"ABCDEFGHIJ"


def test_o_append(work: Work, mount: Mount) -> None:
    d, host = work
    f = d / "log"
    f.write_bytes(b"start\n")
    a = os.open(f, os.O_WRONLY | os.O_APPEND)
    b = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 == 0 else b, f"line {i}\n".encode())
        os.pwrite(a, b"pwrite\n", 0)  # Linux: pwrite on O_APPEND appends too
    finally:
        os.close(a)
        os.close(b)
    want = b"start\n" + b"".join(f"line {i}\n".encode() for i in range(20)) + b"pwrite\n"
    assert f.read_bytes() == want
    if host is not None:
        # a writer on the host extends the file; an O_APPEND write through the mount still
        # lands at the real end (the server's file is opened O_APPEND)
        with open(host / "log", "ab") as h:
            h.write(b"host\n")
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"after\n")
        os.close(fd)
        assert (host / "log").read_bytes() == want + b"host\nafter\n"


def test_unlinked_open_file(work: Work, mount: Mount) -> None:
    """An open file stays readable and writable after its name is gone.

    diod's fids are paths, so the server cannot stat an unlinked file any more (not even
    through the open fid); the mount then answers fstat from the last attributes it saw (with
    nlink 0 and the size its own writes reached), so tools behave the same on all kinds."""
    d, _ = work
    f = d / "doomed"
    f.write_bytes(b"before unlink|")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists() and os.listdir(d) == []
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, b"after unlink")
        assert os.pread(fd, 100, 0) == b"before unlink|after unlink"
        os.pwrite(fd, b"B", 0)
        assert os.pread(fd, 3, 0) == b"Bef"
        st = os.fstat(fd)
        assert st.st_size == len(b"before unlink|after unlink") and st.st_nlink == 0
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, b"!")
        assert os.pread(fd, 100, 0) == b"Before unlink|after unlink!"
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_listing_while_entries_change(work: Work) -> None:
    """Entries removed and added during a listing never make another entry vanish or appear
    twice (readdir resumes at the backend's cookies, which survive removals)."""
    d, host = work
    n = 2000
    made = host if host is not None else d
    for i in range(n):
        os.close(os.open(made / f"n{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    seen: list[str] = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            if len(seen) == 300:
                # remove every third entry not seen yet and a few seen ones; add new ones
                unseen = sorted({f"n{i:05d}" for i in range(n)} - set(seen))
                for name in unseen[::3]:
                    os.unlink(d / name)
                for name in seen[:50]:
                    os.unlink(d / name)
                for i in range(100):
                    os.close(os.open(d / f"new{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    removed = set(unseen[::3]) | set(seen[:50])
    stayed = {f"n{i:05d}" for i in range(n)} - removed
    assert stayed <= set(seen), f"{len(stayed - set(seen))} entries were skipped"


def test_big_directory_listing(mount: Mount, big_dir: str) -> None:
    """A directory with 100 000 entries lists completely and exactly once each, in bounded
    batches (the backend is asked for a few hundred at a time) and without a handle per entry."""
    from ninep.fuse.readdir import FULL_ENTRIES, RESOLVE_CHUNK

    from .conftest import BIG_ENTRIES

    before = mount.stats()["inodes"]
    t0 = time.monotonic()
    names = os.listdir(mount.path / big_dir)
    elapsed = time.monotonic() - t0
    assert len(names) == BIG_ENTRIES and len(set(names)) == BIG_ENTRIES
    assert set(names) == {f"entry-{i:06d}" for i in range(BIG_ENTRIES)}
    print(f"listed {BIG_ENTRIES} entries through {mount.kind} in {elapsed:.1f}s")
    # only the first entries of a listing come with kernel lookups: the table stays small
    assert mount.stats()["inodes"] - before <= FULL_ENTRIES + RESOLVE_CHUNK + 2
