"""LocalBackend-only behaviour: confinement under hostile trees and races, host-visible locks,
qids across mounts, btime, fd hygiene, credentials."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fs_backends.base import Cred, Lock, LockOwner, SetAttr
from fs_backends.local import LOCAL_FS_TYPES, LocalBackend
from fs_backends.security import Credentials, NoneCredentials, PassthroughCredentials
from ninep.protocol import numbers as P
from ninep.protocol.openflags import dotl_to_host

from .conftest import ROOT, Sync

RW = P.L_O_RDWR
SECRET = b"canary secret"


def tree_digest(p: Path) -> str:
    """Hash of names, types, modes, owners, times, xattrs and contents under p (no following)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in sorted(dirnames + filenames + [""]):
            q = os.path.join(dirpath, name)
            st = os.lstat(q)
            h.update(
                repr(
                    (q, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink)
                ).encode()
            )
            h.update(repr(sorted(os.listxattr(q, follow_symlinks=False))).encode())
            if stat.S_ISREG(st.st_mode):
                h.update(Path(q).read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(q).encode())
    return h.hexdigest()


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """export/ and, beside it, canary/ with a secret file; the canary must never change."""
    export = tmp_path / "export"
    canary = tmp_path / "canary"
    export.mkdir()
    canary.mkdir()
    (canary / "secret").write_bytes(SECRET)
    (canary / "dir").mkdir()
    (canary / "dir" / "secret").write_bytes(SECRET)
    before = tree_digest(canary)
    yield export, canary
    assert tree_digest(canary) == before, "something outside the export changed"


@pytest.fixture(params=[None, 4], ids=["fds", "reclaim"])
def lfs(layout: tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[Sync]:
    """The local backend, also with a tiny fd budget (idle node fds reclaimed constantly)."""
    b = Sync(LocalBackend(str(layout[0]), max_path_fds=request.param))
    yield b
    b.aclose()


def try_everything(fs: Sync, node, tag: str) -> list[bytes]:
    """Every operation a hostile client could aim at `node`; returns whatever data it read."""
    got: list[bytes] = []
    for flags in (P.L_O_RDONLY, RW, RW | P.L_O_TRUNC, P.L_O_WRONLY | P.L_O_APPEND):
        try:
            f = fs.open(node, flags, ROOT)
        except OSError:
            continue
        try:
            if not f.is_dir:
                got.append(fs.read(f, 0, 100))
                fs.write(f, 0, b"pwned")
            else:
                got += [e.name.encode() for e in fs.readdir(f, 0, 100)]
        except OSError:
            pass
        fs.close(f)
    ops = [
        lambda: fs.create(node, f"c{tag}", RW, 0o644, ROOT),
        lambda: fs.mkdir(node, f"m{tag}", 0o755, ROOT),
        lambda: fs.symlink(node, f"s{tag}", "x", ROOT),
        lambda: fs.mknod(node, f"n{tag}", stat.S_IFIFO | 0o644, 0, 0, ROOT),
        lambda: fs.setattr(node, SetAttr(P.SETATTR_MODE, mode=0o777), ROOT),
        lambda: fs.setattr(node, SetAttr(P.SETATTR_SIZE, size=0), ROOT),
        lambda: fs.setattr(node, SetAttr(P.SETATTR_UID, uid=4242), ROOT),
        lambda: fs.setattr(node, SetAttr(P.SETATTR_MTIME | P.SETATTR_MTIME_SET), ROOT),
        lambda: fs.xattr_set(node, "user.pwn", b"1", 0),
        lambda: fs.xattr_set(node, "trusted.pwn", b"1", 0),
        lambda: fs.unlinkat(node, "secret", 0),
        lambda: fs.unlinkat(node, "dir", P.AT_REMOVEDIR),
        lambda: fs.renameat(node, "secret", node, f"r{tag}"),
        lambda: fs.link(node, f"l{tag}", node),
    ]
    for op in ops:
        try:
            r = op()
        except OSError:
            continue
        if isinstance(r, tuple):
            fs.close(r[1])
            fs.release(r[0])
    return got


def test_dotdot_never_leaves(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "a" / "b").mkdir(parents=True)
    root = lfs.attach("", ROOT)
    nodes = lfs.walk(root, ["a", "b", "..", "..", "..", "..", "canary"])
    assert len(nodes) == 6
    assert nodes[-1].qid.path == root.qid.path
    assert lfs.walk(root, ["..", "canary"]) and len(lfs.walk(root, ["..", "canary"])) == 1
    sub = lfs.attach("a", ROOT)
    up = lfs.walk(sub, [".."] * 5)
    assert up[-1].qid.path == root.qid.path


def test_symlinks_pointing_out(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, canary = layout
    os.symlink(str(canary), export / "abs")
    os.symlink("../canary", export / "rel")
    os.symlink(str(canary / "secret"), export / "absfile")
    os.symlink("../canary/secret", export / "relfile")
    os.symlink("/proc/self/root" + str(canary), export / "magic")
    (export / "d").mkdir()
    os.symlink("../../canary", export / "d" / "up")
    root = lfs.attach("", ROOT)
    for name in ("abs", "rel", "absfile", "relfile", "magic"):
        nodes = lfs.walk(root, [name, "secret"])
        assert len(nodes) == 1 and nodes[0].qid.type == P.QTSYMLINK
        assert SECRET not in try_everything(lfs, nodes[0], name)
        a = lfs.getattr(nodes[0], P.GETATTR_ALL)
        assert stat.S_ISLNK(a.mode)
    # Symlink in the middle of a walk.
    nodes = lfs.walk(root, ["d", "up", "secret"])
    assert len(nodes) == 2 and nodes[-1].qid.type == P.QTSYMLINK
    assert SECRET not in try_everything(lfs, nodes[-1], "mid")
    # aname through a symlink is refused.
    with pytest.raises(OSError):
        lfs.attach("abs", ROOT)
    with pytest.raises(OSError):
        lfs.attach("d/up", ROOT)


def test_hard_link_of_symlink_links_the_symlink(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, canary = layout
    os.symlink(str(canary / "secret"), export / "out")
    root = lfs.attach("", ROOT)
    out = lfs.walk(root, ["out"])[0]
    lfs.link(root, "hl", out)
    assert stat.S_ISLNK(os.lstat(export / "hl").st_mode)
    assert os.lstat(export / "hl").st_ino == os.lstat(export / "out").st_ino
    d = lfs.walk(root, [])[0]
    with pytest.raises(OSError) as ei:
        lfs.link(root, "dirlink", d)
    assert ei.value.errno == errno.EPERM


def test_dir_swapped_for_symlink_race(lfs: Sync, layout: tuple[Path, Path]) -> None:
    """A host process flips export/d between a directory and a symlink to the canary while the
    client walks, opens, creates and reads through it for about a second."""
    export, canary = layout
    d = export / "d"
    d.mkdir()
    (d / "secret").write_bytes(b"inside")
    stop = threading.Event()
    flips = 0

    def flipper() -> None:
        nonlocal flips
        while not stop.is_set():
            os.rename(d, export / "d.real")
            os.symlink(str(canary), d)
            os.unlink(d)
            os.symlink("../canary", d)
            os.unlink(d)
            os.rename(export / "d.real", d)
            flips += 1
            time.sleep(0.0002)  # leave the real directory in place for a moment too

    t = threading.Thread(target=flipper)
    t.start()
    root = lfs.attach("", ROOT)
    reads: list[bytes] = []
    t0 = time.monotonic()
    n = saw_symlink = 0

    def go_on() -> bool:
        # About a second, longer (up to 8 s) until both states were actually met.
        t = time.monotonic() - t0
        return t < 1.0 or (t < 8.0 and not (saw_symlink and b"inside" in reads))

    try:
        while go_on():
            n += 1
            try:
                nodes = lfs.walk(root, ["d", "secret"])
            except OSError:
                continue
            if nodes[0].qid.type == P.QTSYMLINK:
                saw_symlink += 1
            if len(nodes) == 2:
                try:
                    f = lfs.open(nodes[1], P.L_O_RDONLY, ROOT)
                    reads.append(lfs.read(f, 0, 100))
                    lfs.close(f)
                except OSError:
                    pass
            if nodes[0].qid.type == P.QTDIR:
                try:
                    node, f = lfs.create(nodes[0], f"new{n}", RW, 0o644, ROOT)
                    lfs.close(f)
                    lfs.release(node)
                except OSError:
                    pass
                try:
                    lfs.unlinkat(nodes[0], "secret", 0)
                    # Put it back through the backend (a host write could follow the symlink).
                    node, f = lfs.create(nodes[0], "secret", RW, 0o644, ROOT)
                    lfs.write(f, 0, b"inside")
                    lfs.close(f)
                    lfs.release(node)
                except OSError:
                    pass
            for x in nodes:
                lfs.release(x)
    finally:
        stop.set()
        t.join()
    assert flips > 10 and n > 10
    assert saw_symlink > 0 and b"inside" in reads, "the race was not exercised"
    assert SECRET not in reads
    assert not list(canary.glob("new*"))


def test_renamed_out_of_export_then_dotdot(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, canary = layout
    (export / "a" / "b").mkdir(parents=True)
    root = lfs.attach("", ROOT)
    b = lfs.walk(root, ["a", "b"])[1]
    elsewhere = export.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_bytes(SECRET)
    os.rename(export / "a", elsewhere / "moved")  # a host action, not a client one
    with pytest.raises(OSError):
        lfs.walk(b, [".."])
    with pytest.raises(OSError):
        lfs.walk(b, ["..", "..", "secret"])
    os.rename(elsewhere / "moved", export / "a")
    assert lfs.walk(b, [".."])[0].qid.path == os.stat(export / "a").st_ino


def test_renames_racing_walks(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "x" / "y" / "z").mkdir(parents=True)
    (export / "x" / "y" / "z" / "f").write_bytes(b"f")
    stop = threading.Event()

    def renamer() -> None:
        while not stop.is_set():
            os.rename(export / "x" / "y", export / "y2")
            os.rename(export / "y2", export / "x" / "y")

    t = threading.Thread(target=renamer)
    t.start()
    root = lfs.attach("", ROOT)
    deadline = time.monotonic() + 0.5
    ok = 0
    try:
        while time.monotonic() < deadline:
            try:
                nodes = lfs.walk(root, ["x", "y", "z", "..", "..", "..", "..", "x"])
            except OSError:
                continue
            for n in nodes:
                if n.qid.path == root.qid.path:
                    ok += 1
                lfs.release(n)
    finally:
        stop.set()
        t.join()
    assert ok > 0


def test_remove_with_stale_location(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "a").write_bytes(b"a")
    root = lfs.attach("", ROOT)
    n = lfs.walk(root, ["a"])[0]
    os.rename(export / "a", export / "b")  # behind the backend's back
    (export / "a").write_bytes(b"new")
    with pytest.raises(OSError):
        lfs.remove(n)
    assert (export / "a").read_bytes() == b"new"
    assert (export / "b").read_bytes() == b"a"
    with pytest.raises(OSError):
        lfs.rename(n, root, "c")
    assert (export / "a").read_bytes() == b"new"
    # A directory is found again through '..' and the right one is removed.
    (export / "d").mkdir()
    dn = lfs.walk(root, ["d"])[0]
    os.rename(export / "d", export / "d2")
    (export / "d").mkdir()
    lfs.remove(dn)
    assert (export / "d").is_dir() and not (export / "d2").exists()


def test_remove_after_dir_renamed_through_backend(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "p" / "q").mkdir(parents=True)
    (export / "p" / "q" / "f").write_bytes(b"f")
    root = lfs.attach("", ROOT)
    p, q, f = lfs.walk(root, ["p", "q", "f"])
    lfs.renameat(root, "p", root, "p2")
    lfs.rename(q, root, "q2")
    lfs.remove(f)
    assert not (export / "q2" / "f").exists()
    lfs.remove(q)
    lfs.remove(p)
    assert os.listdir(export) == []


def test_special_files_never_opened(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    os.mkfifo(export / "fifo")
    os.mknod(export / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(export / "zero", stat.S_IFBLK | 0o666, os.makedev(7, 250))
    root = lfs.attach("", ROOT)
    t = time.monotonic()
    for name in ("fifo", "null", "zero"):
        node = lfs.walk(root, [name])[0]
        for flags in (P.L_O_RDONLY, P.L_O_WRONLY, RW, P.L_O_RDONLY | P.L_O_NONBLOCK):
            with pytest.raises(OSError) as ei:
                lfs.open(node, flags, ROOT)
            assert ei.value.errno == errno.ENXIO
        # Tlcreate on an existing special file must not open it either.
        with pytest.raises(OSError):
            lfs.create(root, name, P.L_O_RDONLY, 0o644, ROOT)
    assert time.monotonic() - t < 2


def test_open_flag_translation() -> None:
    assert dotl_to_host(P.L_O_RDWR | P.L_O_TRUNC | P.L_O_APPEND) == (
        os.O_RDWR | os.O_TRUNC | os.O_APPEND
    )
    dropped = P.L_O_NOCTTY | P.L_O_FASYNC | P.L_O_CREAT | P.L_O_DIRECT | P.L_O_CLOEXEC
    assert dotl_to_host(P.L_O_WRONLY | dropped) == os.O_WRONLY
    with pytest.raises(OSError):
        dotl_to_host(3)


def test_locks_visible_to_host_processes(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    path = export / "f"
    path.write_bytes(b"x" * 100)
    root = lfs.attach("", ROOT)
    n = lfs.walk(root, ["f"])[0]
    f = lfs.open(n, RW, ROOT)
    owner = LockOwner(1, "c", 10)
    probe = (
        "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n fcntl.lockf(fd, fcntl.LOCK_EX|fcntl.LOCK_NB, 10, 0); print('free')\n"
        "except OSError: print('held')\n"
    )

    def host_probe() -> str:
        return subprocess.run(
            [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()

    assert host_probe() == "free"
    assert lfs.lock(f, Lock(P.LOCK_TYPE_WRLCK, 0, 10), owner) == P.LOCK_SUCCESS
    assert host_probe() == "held"
    lfs.release_locks(f, owner)
    assert host_probe() == "free"
    # The other way round: a host process holds a lock, the client is blocked and told who.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR);"
            "fcntl.lockf(fd, fcntl.LOCK_EX, 5, 50); print('ok', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        assert lfs.lock(f, Lock(P.LOCK_TYPE_RDLCK, 52, 1), owner) == P.LOCK_BLOCKED
        assert lfs.lock(f, Lock(P.LOCK_TYPE_RDLCK, 0, 50), owner) == P.LOCK_SUCCESS
        g = lfs.getlock(f, Lock(P.LOCK_TYPE_WRLCK, 0, 0), LockOwner(1, "c", 11))
        # Our own owner 10's read lock on [0, 50) comes first.
        assert (g.type, g.start, g.length, g.proc_id) == (P.LOCK_TYPE_RDLCK, 0, 50, 10)
        g = lfs.getlock(f, Lock(P.LOCK_TYPE_RDLCK, 50, 10), owner)
        assert (g.type, g.start, g.length, g.proc_id) == (P.LOCK_TYPE_WRLCK, 50, 5, holder.pid)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    assert lfs.lock(f, Lock(P.LOCK_TYPE_WRLCK, 52, 1), owner) == P.LOCK_SUCCESS
    lfs.close(f)
    assert host_probe() == "free"


def test_qids_stable_and_unique_across_mounts(tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "m1").mkdir(parents=True)
    (export / "m2").mkdir()
    mounts = [export / "m1", export / "m2"]
    for m in mounts:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(m)], check=True)
    try:
        for m in mounts:
            (m / "f").write_bytes(b"x")
            (m / "sub").mkdir()
        inos = {(os.lstat(m / "f").st_dev, os.lstat(m / "f").st_ino) for m in mounts}
        assert len({i for _, i in inos}) == 1, "tmpfs mounts should collide on inode numbers"
        fs = Sync(LocalBackend(str(export)))
        root = fs.attach("", ROOT)
        qs: dict[str, int] = {"": root.qid.path}
        for m in ("m1", "m2"):
            for name in ("", "f", "sub"):
                path = [m, name] if name else [m]
                nodes = fs.walk(root, path)
                assert len(nodes) == len(path)
                q = nodes[-1].qid
                assert fs.walk(root, path)[-1].qid.path == q.path  # stable
                assert fs.getattr(nodes[-1], P.GETATTR_ALL).qid.path == q.path
                qs[f"{m}/{name}"] = q.path
        assert len(set(qs.values())) == len(qs), qs
        # readdir qids agree with walk qids, mount points included.
        f = fs.open(root, P.L_O_RDONLY, ROOT)
        ents = {e.name: e.qid.path for e in fs.readdir(f, 0, 100)}
        fs.close(f)
        assert ents["m1"] == qs["m1/"] and ents["m2"] == qs["m2/"]
        m1 = fs.walk(root, ["m1"])[0]
        f = fs.open(m1, P.L_O_RDONLY, ROOT)
        ents = {e.name: e.qid.path for e in fs.readdir(f, 0, 100)}
        fs.close(f)
        assert ents["f"] == qs["m1/f"] and ents["sub"] == qs["m1/sub"]
        assert ents[".."] == root.qid.path
        fs.aclose()
        # multidevs=forbid refuses other devices.
        fb = Sync(LocalBackend(str(export), multidevs="forbid"))
        r = fb.attach("", ROOT)
        with pytest.raises(OSError) as ei:
            fb.walk(r, ["m1"])
        assert ei.value.errno == errno.ENODEV
        fb.aclose()
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], check=False)


def test_btime_and_getattr_fields(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "f").write_bytes(b"12345")
    root = lfs.attach("", ROOT)
    n = lfs.walk(root, ["f"])[0]
    a = lfs.getattr(n, P.GETATTR_ALL)
    st = os.lstat(export / "f")
    assert a.valid & P.GETATTR_BTIME
    assert a.btime_sec > 0 and abs(a.btime_sec - time.time()) < 600
    assert (a.mode, a.uid, a.gid, a.nlink, a.size) == (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_nlink,
        st.st_size,
    )
    assert a.mtime_sec * 10**9 + a.mtime_nsec == st.st_mtime_ns
    assert a.blocks == st.st_blocks and a.blksize == st.st_blksize
    assert a.qid.path == st.st_ino
    # The inode generation, where the filesystem keeps one (ext4 does; tmpfs does not).
    lsattr = subprocess.run(["lsattr", "-v", str(export / "f")], capture_output=True, text=True)
    if lsattr.returncode == 0:
        assert a.valid & P.GETATTR_GEN and a.gen == int(lsattr.stdout.split()[0])
    else:
        assert not a.valid & P.GETATTR_GEN
    assert not lfs.getattr(n, P.GETATTR_BASIC).valid & P.GETATTR_GEN


def test_generation_is_read_once_per_inode_and_a_new_file_gets_its_own(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "f").write_bytes(b"1")
    b = Sync(LocalBackend(str(tmp_path)))
    root = b.attach("", ROOT)
    reads: list[int] = []
    real = LocalBackend._generation

    def counted(h: Any, fmt: int) -> int:
        reads.append(fmt)
        return real(h, fmt)

    monkeypatch.setattr(LocalBackend, "_generation", staticmethod(counted))
    first = b.getattr(b.walk(root, ["f"])[0], P.GETATTR_ALL).gen
    for _ in range(3):  # what Linux does with cache=none: a fresh walk + getattr per access
        assert b.getattr(b.walk(root, ["f"])[0], P.GETATTR_ALL).gen == first
    assert len(reads) == 1
    (tmp_path / "f").unlink()
    (tmp_path / "f").write_bytes(b"2")  # may well reuse the inode number
    a = b.getattr(b.walk(root, ["f"])[0], P.GETATTR_ALL)
    assert len(reads) == 2
    lsattr = subprocess.run(["lsattr", "-v", str(tmp_path / "f")], capture_output=True, text=True)
    if lsattr.returncode == 0:
        assert a.gen == int(lsattr.stdout.split()[0])


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak(layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "d").mkdir()
    before = count_fds()
    fs = Sync(LocalBackend(str(export)))
    root = fs.attach("", ROOT)
    start = count_fds()
    for i in range(20):
        d = fs.walk(root, ["d"])[0]
        n, f = fs.create(d, f"f{i}", RW, 0o644, ROOT)
        fs.write(f, 0, b"x")
        o = LockOwner(1, "c", i)
        fs.lock(f, Lock(P.LOCK_TYPE_WRLCK, 0, 0), o)
        assert fs.getlock(f, Lock(P.LOCK_TYPE_WRLCK, 0, 0), LockOwner(2, "c", i)).type == 1
        fs.close(f)
        f = fs.open(d, P.L_O_RDONLY, ROOT)
        fs.readdir(f, 0, 10)
        fs.close(f)
        nodes = fs.walk(root, ["d", f"f{i}", "..", ".."])
        fs.rename(nodes[1], root, f"g{i}")
        fs.remove(nodes[1])
        for x in [*nodes, n, d]:
            fs.release(x)
        with contextlib.suppress(OSError):
            fs.walk(root, ["nope"])
    assert count_fds() == start
    fs.release(root)
    fs.aclose()
    assert count_fds() == before


def test_aclose_closes_unreleased(layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "f").write_bytes(b"x")
    before = count_fds()
    fs = Sync(LocalBackend(str(export)))
    root = fs.attach("", ROOT)
    n = fs.walk(root, ["f"])[0]
    fs.open(n, P.L_O_RDONLY, ROOT)
    fs.aclose()
    assert count_fds() == before


def test_passthrough_creates_with_client_credentials(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, _ = layout
    old = os.umask(0o077)
    try:
        root = lfs.attach("", ROOT)
        c = Cred(1234, 5678, "u")
        n, f = lfs.create(root, "f", RW, 0o664, c)
        lfs.close(f)
        lfs.mkdir(root, "d", 0o775, c)
        lfs.symlink(root, "l", "f", c)
        lfs.mknod(root, "p", stat.S_IFIFO | 0o666, 0, 0, c)
        lfs.mknod(root, "c", stat.S_IFCHR | 0o600, 1, 3, c)
    finally:
        os.umask(old)
    for name, mode in (("f", 0o664), ("d", 0o775), ("p", 0o666), ("c", 0o600)):
        st = os.lstat(export / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, mode), name
    st = os.lstat(export / "l")
    assert (st.st_uid, st.st_gid) == (1234, 5678) and os.readlink(export / "l") == "f"
    assert os.lstat(export / "c").st_rdev == os.makedev(1, 3)


def test_credentials_refuse_privileged_xattrs(layout: tuple[Path, Path]) -> None:
    export, _ = layout
    (export / "f").write_bytes(b"")
    os.setxattr(export / "f", "trusted.hidden", b"1")
    fs = Sync(LocalBackend(str(export), credentials=Credentials()))
    root = fs.attach("", ROOT)
    n = fs.walk(root, ["f"])[0]
    for name in ("trusted.x", "security.x"):
        with pytest.raises(OSError) as ei:
            fs.xattr_set(n, name, b"1", 0)
        assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError):
        fs.xattr_get(n, "trusted.hidden")
    assert "trusted.hidden" not in fs.xattr_list(n)
    fs.xattr_set(n, "user.ok", b"1", 0)
    with pytest.raises(OSError):
        fs.mknod(root, "dev", stat.S_IFCHR | 0o600, 1, 3, ROOT)
    fs.aclose()


def test_none_credentials_as_root_behave_like_passthrough(layout: tuple[Path, Path]) -> None:
    export, _ = layout
    fs = Sync(LocalBackend(str(export), credentials=NoneCredentials()))
    root = fs.attach("", ROOT)
    n, f = fs.create(root, "f", RW, 0o640, Cred(1000, 1000))
    fs.close(f)
    assert os.stat(export / "f").st_uid == 1000
    assert stat.S_IMODE(os.stat(export / "f").st_mode) == 0o640
    fs.aclose()
    assert PassthroughCredentials().name == "passthrough"


def test_symlink_setattr(lfs: Sync, layout: tuple[Path, Path]) -> None:
    export, canary = layout
    os.symlink(str(canary / "secret"), export / "l")
    root = lfs.attach("", ROOT)
    n = lfs.walk(root, ["l"])[0]
    with pytest.raises(OSError) as ei:
        lfs.setattr(n, SetAttr(P.SETATTR_MODE, mode=0o777), ROOT)
    assert ei.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError):
        lfs.setattr(n, SetAttr(P.SETATTR_SIZE, size=0), ROOT)
    lfs.setattr(n, SetAttr(P.SETATTR_UID | P.SETATTR_GID, uid=7, gid=8), ROOT)
    assert (os.lstat(export / "l").st_uid, os.lstat(export / "l").st_gid) == (7, 8)
    assert os.stat(canary / "secret").st_uid == 0


def test_close_and_release_racing_requests(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Tclunk arriving while reads/walks on the same fid run in worker threads: the fd stays
    open until they finish, so its number cannot be reused for another file meanwhile."""
    import trio

    real_pread = os.pread

    def slow_pread(fd: int, n: int, off: int) -> bytes:
        time.sleep(0.03)  # widen the window in which the clunk arrives
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", slow_pread)
    export, _ = layout
    (export / "mine").write_bytes(b"MINE" * 1024)
    (export / "d").mkdir()
    for i in range(20):
        (export / f"other{i}").write_bytes(b"OTHER" * 1024)
    before = count_fds()
    seen: set[bytes] = set()

    async def main() -> None:
        b = LocalBackend(str(export))
        root = await b.attach("", ROOT)
        for _ in range(5):
            n = (await b.walk(root, ["mine"]))[0]
            d = (await b.walk(root, ["d"]))[0]
            f = await b.open(n, P.L_O_RDONLY, ROOT)

            async def reader(f=f) -> None:
                try:
                    seen.add((await b.read(f, 0, 4))[:4])
                except OSError as e:
                    assert e.errno == errno.EBADF

            async def walker(d=d) -> None:
                try:
                    for x in await b.walk(d, [".."]):
                        await b.release(x)
                except OSError as e:
                    assert e.errno == errno.EBADF

            others = []
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(reader)
                    nursery.start_soon(walker)
                await trio.sleep(0.01)
                await b.close(f)
                await b.release(n)
                await b.release(d)
                # Other files opened meanwhile (another connection, say) take the lowest
                # free fd numbers.
                others += [os.open(export / f"other{i}", os.O_RDONLY) for i in range(20)]
            for o in others:
                os.close(o)
        await b.release(root)
        await b.aclose()

    trio.run(main)
    assert seen <= {b"MINE"}
    assert count_fds() == before


def test_fd_reclaim_bounds_fds_and_keeps_nodes_working(layout: tuple[Path, Path]) -> None:
    """Far more live nodes than the fd budget: the fds held stay bounded, every node still
    reaches its own file, and a node whose file was deleted meanwhile fails cleanly."""
    export, _ = layout
    n = 300
    (export / "d").mkdir()
    for i in range(n):
        (export / "d" / f"f{i}").write_bytes(b"content %d" % i)
    before = count_fds()
    b = LocalBackend(str(export), max_path_fds=32)
    fs = Sync(b)
    root = fs.attach("", ROOT)
    nodes = [fs.walk(root, ["d", f"f{i}"]) for i in range(n)]
    assert count_fds() - before < 80, "fds were not reclaimed"
    assert b._pool.reclaims > 0
    for i, (d, f) in enumerate(nodes):
        assert f.qid.path == os.stat(export / "d" / f"f{i}").st_ino
        o = fs.open(f, P.L_O_RDONLY, ROOT)
        assert fs.read(o, 0, 100) == b"content %d" % i
        fs.close(o)
        assert fs.getattr(d, P.GETATTR_ALL).qid.path == os.stat(export / "d").st_ino
    # Deleted behind the backend's back while its fd was reclaimed: an error, never another file.
    os.unlink(export / "d" / "f0")
    (export / "d" / "f0").write_bytes(b"impostor")
    for _ in range(3):  # push f0's node out of the fd cache
        for _d, f in nodes[1:]:
            fs.getattr(f, P.GETATTR_BASIC)
    with pytest.raises(OSError) as ei:
        o = fs.open(nodes[0][1], P.L_O_RDONLY, ROOT)
        fs.close(o)
    assert ei.value.errno in (errno.ESTALE, errno.ENOENT)
    for d, f in nodes:
        fs.release(d)
        fs.release(f)
    fs.release(root)
    fs.aclose()
    assert count_fds() == before


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The calls that hopped to a worker thread (`fs_backends.offload`), in order."""
    from fs_backends import offload

    seen: list[object] = []
    real = offload.run_sync

    async def counting(fn):  # noqa: ANN001, ANN202
        seen.append(fn)
        return await real(fn)

    monkeypatch.setattr(offload, "run_sync", counting)
    return seen


def test_inline_metadata_skips_the_worker_hop_until_a_call_is_slow(tmp_path: Path, monkeypatch, hops: list[object]) -> None:  # noqa: ANN001
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 10)
    b = Sync(LocalBackend(str(tmp_path), inline_metadata=True))
    root = b.attach("", ROOT)
    hops.clear()
    d, f = b.walk(root, ["d", "f"])
    assert b.getattr(f, P.GETATTR_ALL).size == 10
    assert hops == []  # walk and getattr ran on the trio thread
    with pytest.raises(OSError) as e:
        b.walk(d, ["missing"])
    assert e.value.errno == errno.ENOENT  # errors come through the same as from a worker
    assert hops == []
    # A slow call that did not sleep (preempted, busy machine) changes nothing ...
    from fs_backends import _linux

    real_statx = _linux.statx

    def busy_statx(fd: int) -> Any:
        end = time.monotonic() + 0.005
        while time.monotonic() < end:
            pass
        return real_statx(fd)

    monkeypatch.setattr(_linux, "statx", busy_statx)
    b.getattr(f, P.GETATTR_ALL)
    b.getattr(f, P.GETATTR_ALL)
    assert hops == []
    # ... one that slept (waited for a disk) sends the following ones back to the worker threads.
    def sleepy_statx(fd: int) -> Any:
        time.sleep(0.005)
        return real_statx(fd)

    monkeypatch.setattr(_linux, "statx", sleepy_statx)
    b.getattr(f, P.GETATTR_ALL)
    assert hops == []
    monkeypatch.setattr(_linux, "statx", real_statx)
    assert b.getattr(f, P.GETATTR_ALL).size == 10
    assert len(hops) == 1
    # Turned off, every call hops.
    hops.clear()
    plain = Sync(LocalBackend(str(tmp_path), inline_metadata=False))
    plain.getattr(plain.attach("", ROOT), P.GETATTR_ALL)
    assert len(hops) == 2


def test_writes_run_inline_until_one_sleeps(tmp_path: Path, hops: list[object]) -> None:
    """Writes into the page cache take no worker hop (a guest's sequential 1 MiB writes made two
    thread handoffs per 496 KiB Twrite), and a write the kernel made wait sends them back."""
    (tmp_path / "f").write_bytes(b"")
    b = Sync(LocalBackend(str(tmp_path), inline_metadata=True))
    (f_node,) = b.walk(b.attach("", ROOT), ["f"])
    f = b.open(f_node, P.L_O_RDWR, ROOT)
    hops.clear()
    assert b.write(f, 0, b"abc") == 3
    written: list[int] = []

    def pwrite(fd: int, offset: int) -> int:  # what a transport's zero-copy write does
        written.append(threading.get_ident())
        return os.pwrite(fd, b"defg", offset)

    assert b.write_from(f, 3, pwrite) == 4
    assert hops == [] and written == [threading.get_ident()]  # both on the trio thread
    assert (tmp_path / "f").read_bytes() == b"abcdefg"

    def throttled(fd: int, offset: int) -> int:  # balance_dirty_pages put the writer to sleep
        time.sleep(0.005)
        return os.pwrite(fd, b"h", offset)

    assert b.write_from(f, 7, throttled) == 1
    assert hops == []
    assert b.write(f, 8, b"i") == 1
    assert len(hops) == 1  # the next write went to a worker thread
    assert (tmp_path / "f").read_bytes() == b"abcdefghi"
    plain = Sync(LocalBackend(str(tmp_path), inline_metadata=False))
    (g_node,) = plain.walk(plain.attach("", ROOT), ["f"])
    g = plain.open(g_node, P.L_O_RDWR, ROOT)
    hops.clear()
    plain.write(g, 0, b"A")
    assert len(hops) == 1


def test_inline_metadata_by_default_only_on_local_filesystems(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from fs_backends import _linux

    fd = os.open(tmp_path, os.O_PATH)
    try:
        assert LocalBackend(str(tmp_path)).inline_metadata == (_linux.fstatfs(fd)[0] in LOCAL_FS_TYPES)
    finally:
        os.close(fd)
    assert LocalBackend("/dev/shm").inline_metadata  # tmpfs
    real = _linux.fstatfs
    monkeypatch.setattr(_linux, "fstatfs", lambda fd: (0x6969, *real(fd)[1:]))  # NFS
    assert not LocalBackend(str(tmp_path)).inline_metadata
    assert LocalBackend(str(tmp_path), inline_metadata=True).inline_metadata
