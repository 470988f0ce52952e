"""security_model=mapped-file: the metadata files QEMU's hw/9pfs/9p-local.c writes and reads
(`<dir>/.virtfs_metadata/<name>`, `.virtfs_metadata_root`, "virtfs.uid=N" lines), those names
hidden and refused (CVE-2017-7493), and the metadata following renames, links and removals."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_backends.base import Cred, SetAttr
from fs_backends.local import LocalBackend
from fs_backends.security import MappedFileCredentials
from ninep.protocol import numbers as P

from .conftest import Sync

RW = P.L_O_RDWR
CLIENT = Cred(1234, 5678, "client")
META = ".virtfs_metadata"


def meta(d: Path, name: str) -> str:
    return (d / META / name).read_text()


@pytest.fixture
def mf(tmp_path: Path) -> Iterator[tuple[Sync, Path]]:
    export = tmp_path / "export"
    export.mkdir()
    b = Sync(LocalBackend(str(export), credentials=MappedFileCredentials()))
    yield b, export
    b.aclose()


def test_on_disk_format_written(mf: tuple[Sync, Path]) -> None:
    fs, export = mf
    root = fs.attach("", CLIENT)
    n, f = fs.create(root, "file", RW, 0o644, CLIENT)
    fs.close(f)
    fs.mkdir(root, "dir", 0o755, CLIENT)
    fs.mknod(root, "blk", stat.S_IFBLK | 0o660, 8, 1, CLIENT)
    fs.symlink(root, "link", "target", CLIENT)
    S = stat
    assert (
        meta(export, "file")
        == f"virtfs.uid=1234\nvirtfs.gid=5678\nvirtfs.mode={S.S_IFREG | 0o644}\n"
    )
    assert (
        meta(export, "dir")
        == f"virtfs.uid=1234\nvirtfs.gid=5678\nvirtfs.mode={S.S_IFDIR | 0o755}\n"
    )
    assert meta(export, "blk") == (
        f"virtfs.uid=1234\nvirtfs.gid=5678\nvirtfs.mode={S.S_IFBLK | 0o660}\n"
        f"virtfs.rdev={os.makedev(8, 1)}\n"
    )
    assert (
        meta(export, "link")
        == f"virtfs.uid=1234\nvirtfs.gid=5678\nvirtfs.mode={S.S_IFLNK | 0o777}\n"
    )
    assert (export / "link").read_bytes() == b"target"
    assert stat.S_IMODE(os.stat(export / META).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(export / META / "file").st_mode) == 0o600
    assert os.lstat(export / "blk").st_mode == stat.S_IFREG | 0o600
    assert os.lstat(export / "dir").st_mode == stat.S_IFDIR | 0o700
    # The export root keeps its metadata in .virtfs_metadata_root.
    fs.setattr(root, SetAttr(P.SETATTR_MODE | P.SETATTR_UID, mode=0o750, uid=7), CLIENT)
    text = (export / ".virtfs_metadata_root").read_text()
    assert text == f"virtfs.uid=7\nvirtfs.mode={S.S_IFDIR | 0o750}\n"
    a = fs.getattr(root, P.GETATTR_ALL)
    assert (a.uid, a.mode) == (7, S.S_IFDIR | 0o750)


def test_reads_metadata_written_by_qemu(tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / META).mkdir(parents=True)
    (export / "sub" / META).mkdir(parents=True)
    (export / "f").write_bytes(b"")
    (export / META / "f").write_text("virtfs.uid=1000\nvirtfs.gid=100\nvirtfs.mode=33261\n")
    (export / "sub" / "s").write_bytes(b"../f")
    (export / "sub" / META / "s").write_text(f"virtfs.mode={stat.S_IFLNK | 0o777}\n")
    (export / "sub" / "c").write_bytes(b"")
    (export / "sub" / META / "c").write_text(
        f"virtfs.mode={stat.S_IFCHR | 0o600}\nvirtfs.rdev={os.makedev(1, 5)}\n"
    )
    fs = Sync(LocalBackend(str(export), credentials=MappedFileCredentials()))
    root = fs.attach("", CLIENT)
    f, sub = fs.walk(root, ["f"])[0], fs.walk(root, ["sub"])[0]
    a = fs.getattr(f, P.GETATTR_ALL)
    assert (a.uid, a.gid, a.mode) == (1000, 100, stat.S_IFREG | 0o755)
    s = fs.walk(sub, ["s"])[0]
    assert s.qid.type == P.QTSYMLINK and fs.readlink(s) == "../f"
    c = fs.walk(sub, ["c"])[0]
    a = fs.getattr(c, P.GETATTR_ALL)
    assert a.mode == stat.S_IFCHR | 0o600 and a.rdev == os.makedev(1, 5)
    with pytest.raises(OSError):
        fs.open(c, P.L_O_RDONLY, CLIENT)
    fd = fs.open(sub, P.L_O_RDONLY, CLIENT)
    ents = {e.name: e for e in fs.readdir(fd, 0, 100)}
    fs.close(fd)
    assert sorted(ents) == [".", "..", "c", "s"]
    assert ents["s"].type == P.DT_LNK and ents["c"].type == P.DT_CHR
    # A directory reached through '..' still finds its metadata.
    up = fs.walk(sub, [".."])[0]
    assert fs.getattr(up, P.GETATTR_ALL).qid.path == root.qid.path
    fs.aclose()


def test_metadata_names_hidden_and_refused(mf: tuple[Sync, Path]) -> None:
    fs, export = mf
    root = fs.attach("", CLIENT)
    fs.mkdir(root, "d", 0o755, CLIENT)
    d = fs.walk(root, ["d"])[0]
    n, f = fs.create(d, "x", RW, 0o644, CLIENT)
    fs.close(f)
    fs.setattr(root, SetAttr(P.SETATTR_MODE, mode=0o755), CLIENT)
    assert (export / META).is_dir() and (export / ".virtfs_metadata_root").is_file()
    for dirnode in (root, d):
        fd = fs.open(dirnode, P.L_O_RDONLY, CLIENT)
        names = {e.name for e in fs.readdir(fd, 0, 100)}
        fs.close(fd)
        assert not names & {META, ".virtfs_metadata_root"}
    for name in (META, ".virtfs_metadata_root"):
        with pytest.raises(OSError) as ei:
            fs.walk(root, [name])
        assert ei.value.errno == errno.ENOENT
        for op in (
            lambda name=name: fs.create(root, name, RW, 0o644, CLIENT),
            lambda name=name: fs.mkdir(root, name, 0o755, CLIENT),
            lambda name=name: fs.symlink(root, name, "x", CLIENT),
            lambda name=name: fs.mknod(root, name, stat.S_IFIFO | 0o644, 0, 0, CLIENT),
            lambda name=name: fs.link(root, name, n),
            lambda name=name: fs.renameat(d, "x", root, name),
            lambda name=name: fs.rename(n, root, name),
        ):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EINVAL
        for op in (
            lambda name=name: fs.unlinkat(root, name, 0),
            lambda name=name: fs.unlinkat(root, name, P.AT_REMOVEDIR),
            lambda name=name: fs.renameat(root, name, d, "stolen"),
        ):
            with pytest.raises(OSError):
                op()
    with pytest.raises(OSError):
        fs.attach(META, CLIENT)
    assert (export / META / "d").is_file() and (export / ".virtfs_metadata_root").is_file()


def test_metadata_follows_renames_links_and_removals(mf: tuple[Sync, Path]) -> None:
    fs, export = mf
    root = fs.attach("", CLIENT)
    fs.mkdir(root, "a", 0o755, CLIENT)
    fs.mkdir(root, "b", 0o755, CLIENT)
    a, b = fs.walk(root, ["a"])[0], fs.walk(root, ["b"])[0]
    n, f = fs.create(a, "f", RW, 0o640, Cred(11, 22))
    fs.close(f)
    fs.renameat(a, "f", b, "g")
    assert not (export / "a" / META / "f").exists()
    assert "virtfs.uid=11" in meta(export / "b", "g")
    assert fs.getattr(n, P.GETATTR_ALL).uid == 11
    fs.rename(n, a, "h")
    assert "virtfs.uid=11" in meta(export / "a", "h")
    fs.link(b, "hl", n)
    assert "virtfs.uid=11" in meta(export / "b", "hl")
    assert fs.getattr(fs.walk(b, ["hl"])[0], P.GETATTR_ALL).mode == stat.S_IFREG | 0o640
    # Renaming over a file takes its place, metadata included.
    m, f = fs.create(b, "other", RW, 0o600, Cred(99, 99))
    fs.close(f)
    fs.renameat(b, "hl", b, "other")
    assert "virtfs.uid=11" in meta(export / "b", "other")
    assert not (export / "b" / META / "hl").exists()
    # A host file without metadata renamed over one leaves no stale metadata behind.
    (export / "b" / "plain").write_bytes(b"")
    fs.renameat(b, "plain", b, "other")
    assert not (export / "b" / META / "other").exists()
    fs.unlinkat(a, "h", 0)
    assert not (export / "a" / META / "h").exists()
    # Directories holding only (stale) metadata can be removed.
    (export / "a" / META / "stale").write_text("virtfs.uid=1\n")
    fs.unlinkat(root, "a", P.AT_REMOVEDIR)
    assert not (export / "a").exists() and not (export / META / "a").exists()
    fs.mkdir(b, "sub", 0o755, CLIENT)
    sub = fs.walk(b, ["sub"])[0]
    m2, f = fs.create(sub, "inner", RW, 0o600, CLIENT)
    fs.close(f)
    with pytest.raises(OSError) as ei:
        fs.remove(sub)
    assert ei.value.errno == errno.ENOTEMPTY
    assert "virtfs.uid" in meta(export / "b" / "sub", "inner")
    fs.remove(m2)
    fs.remove(sub)
    assert not (export / "b" / "sub").exists() and not (export / "b" / META / "sub").exists()


def test_setattr_updates_metadata(mf: tuple[Sync, Path]) -> None:
    fs, export = mf
    root = fs.attach("", CLIENT)
    fs.mknod(root, "p", stat.S_IFIFO | 0o644, 0, 0, CLIENT)
    p = fs.walk(root, ["p"])[0]
    fs.setattr(p, SetAttr(P.SETATTR_MODE | P.SETATTR_GID, mode=0o600, gid=4), CLIENT)
    # mknod records rdev even for a fifo (0), as QEMU does.
    assert meta(export, "p") == (
        f"virtfs.uid=1234\nvirtfs.gid=4\nvirtfs.mode={stat.S_IFIFO | 0o600}\nvirtfs.rdev=0\n"
    )
    a = fs.getattr(p, P.GETATTR_ALL)
    assert (a.mode, a.uid, a.gid) == (stat.S_IFIFO | 0o600, 1234, 4)
    st = os.lstat(export / "p")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


def test_metadata_symlink_planted_on_host_is_not_followed(
    mf: tuple[Sync, Path], tmp_path: Path
) -> None:
    fs, export = mf
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("virtfs.uid=0\n")
    os.symlink(outside, export / META)  # a hostile host-side setup
    (export / "f").write_bytes(b"")
    root = fs.attach("", CLIENT)
    f = fs.walk(root, ["f"])[0]
    assert fs.getattr(f, P.GETATTR_ALL).uid == os.geteuid()  # nothing read through it
    with pytest.raises(OSError):
        fs.setattr(f, SetAttr(P.SETATTR_UID, uid=5), CLIENT)
    assert (outside / "f").read_text() == "virtfs.uid=0\n"
    assert sorted(os.listdir(outside)) == ["f"]
