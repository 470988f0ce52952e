"""The FUSE frontend's own bookkeeping: inode numbers stay stable while the mount lives, and the
inode table shrinks back when the kernel forgets (no growth over create/delete churn).

Runs on the memory kind (fastest; the table is the frontend's, whatever the backend) and on the
local kind (a backend whose handles are host fds)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

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


def test_table_returns_to_baseline_after_churn(mnt: Mount) -> None:
    d = mnt.path / "churn"
    d.mkdir()
    drop_caches()
    base = settle(mnt, 5)
    n = 20_000
    t0 = time.monotonic()
    for i in range(n):
        p = d / f"f{i}"
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"x")
        os.close(fd)
        if i % 2:
            os.unlink(p)
    peak = mnt.stats()["inodes"]
    for i in range(0, n, 2):
        os.unlink(d / f"f{i}")
    elapsed = time.monotonic() - t0
    after = settle(mnt, base + 5)
    print(f"{mnt.kind}: {n} creates+deletes in {elapsed:.1f}s; table {base} -> {peak} -> {after}")
    assert peak >= 1  # it did count them while they lived
    assert after <= base + 5, f"inode table kept {after} entries (baseline {base})"
    assert os.listdir(d) == []


def test_listing_then_forget(mnt: Mount) -> None:
    """readdirplus hands the kernel a lookup per entry; dropping caches gives them all back."""
    d = mnt.path / "listed"
    d.mkdir()
    n = 3000
    for i in range(n):
        os.close(os.open(d / f"e{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    drop_caches()
    base = settle(mnt, 5)
    names = os.listdir(d)
    assert len(names) == n
    assert mnt.stats()["inodes"] >= n // 2  # entries came with lookups (readdirplus)
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
