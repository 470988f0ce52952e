"""The FUSE frontend's own bookkeeping: inode numbers stay stable while the mount lives, and the
inode table shrinks back when the kernel forgets (no growth over create/delete churn).

Runs on the memory kind (fastest; the table is the frontend's, whatever the backend) and on the
local kind (a backend whose handles are host fds)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Mount, close_mount, open_kind


@pytest.fixture(scope="module", params=["memory", "local"])
def mnt(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mount]:
    m = open_kind(request.param, tmp_path_factory.mktemp(f"inodes-{request.param}"))
    try:
        yield m
    finally:
        close_mount(m)


def drop_caches() -> None:
    """Make the kernel forget every unused inode (it then sends FUSE FORGETs)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def settle(m: Mount, limit: int, timeout: float = 20.0) -> int:
    """Wait for the forgets to arrive; returns the inode table size seen last."""
    deadline = time.monotonic() + timeout
    while True:
        n = m.stats()["inodes"]
        if n <= limit or time.monotonic() > deadline:
            return n
        drop_caches()
        time.sleep(0.2)


# The table is the frontend's whatever the backend; memory makes the 20 000-file run quick.
@pytest.mark.parametrize("mnt", ["memory"], indirect=True)
def test_table_returns_to_baseline_after_churn(mnt: Mount) -> None:
    """20 000 files created and deleted in batches of 1000: the table never holds much more
    than a batch (an unlinked file's inode is forgotten by the kernel as soon as its dentry
    goes) and returns to its baseline."""
    d = mnt.path / "churn"
    d.mkdir()
    drop_caches()
    base = settle(mnt, 5)
    n, batch = 20_000, 1000
    peak = 0
    t0 = time.monotonic()
    for b in range(0, n, batch):
        names = [d / f"f{i}" for i in range(b, b + batch)]
        for p in names:
            os.mknod(p, 0o644 | stat.S_IFREG)
        peak = max(peak, mnt.stats()["inodes"])
        for p in names:
            os.unlink(p)
    elapsed = time.monotonic() - t0
    after = settle(mnt, base + 5)
    print(
        f"{mnt.kind}: {n} creates+deletes in {elapsed:.1f}s; table {base} -> peak {peak} -> {after}"
    )
    assert batch <= peak <= base + 2 * batch  # counted while they lived, never accumulated
    assert after <= base + 5, f"inode table kept {after} entries (baseline {base})"
    assert os.listdir(d) == []


def test_listing_then_forget(mnt: Mount) -> None:
    """readdirplus hands the kernel a lookup for the first FULL_ENTRIES entries of a listing
    (the rest go without, so a huge directory does not fill the table); stat of every entry
    looks them all up; dropping caches gives them all back."""
    from ninep.fuse.readdir import FULL_ENTRIES, RESOLVE_CHUNK

    d = mnt.path / "listed"
    d.mkdir()
    n = 3000
    made = mnt.host / "listed" if mnt.host is not None else d  # host side is quicker
    for i in range(n):
        os.close(os.open(made / f"e{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    drop_caches()
    base = settle(mnt, 5)
    names = os.listdir(d)
    assert sorted(names) == sorted(f"e{i}" for i in range(n))
    listed = mnt.stats()["inodes"]
    assert base + FULL_ENTRIES <= listed <= base + FULL_ENTRIES + RESOLVE_CHUNK + 5
    inos = {os.lstat(d / name).st_ino for name in names}
    assert len(inos) == n
    assert mnt.stats()["inodes"] >= base + n
    # the d_ino readdir shows is the st_ino stat shows, with or without attributes
    with os.scandir(d) as it:
        assert {e.inode() for e in it} == inos
    drop_caches()
    assert settle(mnt, base + 5) <= base + 5


def test_inode_numbers_stable(mnt: Mount) -> None:
    d = mnt.path / "stable"
    d.mkdir()
    (d / "f").write_bytes(b"1")
    os.link(d / "f", d / "g")
    (d / "sub").mkdir()
    first = {p: (d / p).stat().st_ino for p in ("f", "g", "sub")}
    assert first["f"] == first["g"] != first["sub"]
    assert first["f"] not in (0, 1)
    drop_caches()
    settle(mnt, 8)
    again = {p: (d / p).stat().st_ino for p in ("f", "g", "sub")}
    assert again == first
    os.rename(d / "f", d / "sub" / "moved")
    assert (d / "sub" / "moved").stat().st_ino == first["f"]
    assert os.stat(mnt.path).st_ino == 1


def test_inode_limit_sheds_old_inodes(tmp_path: Path) -> None:
    """With --max-inodes the mount asks the kernel to forget its oldest unused inodes, so
    touching many more files than the limit (each inode holds a host fd) keeps the table
    bounded and every stat succeeds with a stable inode number."""
    from .conftest import close_mount, start_mount

    export = tmp_path / "e"
    export.mkdir()
    n = 3000
    for i in range(n):
        os.close(os.open(export / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    m = start_mount(str(export), tmp_path / "m", tmp_path / "log", "--max-inodes", "500")
    try:
        first = [os.lstat(m.path / f"f{i}").st_ino for i in range(n)]
        assert m.stats()["inodes"] <= 500 + 200
        again = [os.lstat(m.path / f"f{i}").st_ino for i in range(n)]
        assert again == first and len(set(first)) == n
        assert m.stats()["inodes"] <= 500 + 200
        assert "asked the kernel to forget" in m.log.read_text()
    finally:
        close_mount(m)
