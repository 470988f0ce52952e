"""The export's filesystem fills up (a 1 MiB tmpfs): writes answer ENOSPC, content fsynced before
is intact, and the server keeps serving: stat, read, remove to free space, write again."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fs_backends.local import LocalBackend
from ninep.client import ClientError
from ninep.protocol.numbers import L_O_CREAT, L_O_RDWR, L_O_WRONLY
from tests.kits.harness import client_for, served


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_answers_enospc_and_keeps_serving(small_fs: Path, tmp_path: Path) -> None:
    kept = os.urandom(300 * 1024)

    async def scenario() -> None:
        async with served(LocalBackend(str(small_fs)), "unix", tmp_path) as (_, connect), client_for(connect) as c:
            root = await c.attach()
            k, _ = await c.walk(root, [])
            await c.lcreate(k, "kept", L_O_WRONLY | L_O_CREAT, 0o644)
            await c.write_all(k, 0, kept)
            await c.fsync(k)
            await c.clunk(k)

            f, _ = await c.walk(root, [])
            await c.lcreate(f, "filler", L_O_WRONLY | L_O_CREAT, 0o644)
            block = os.urandom(64 * 1024)
            off = 0
            with pytest.raises(ClientError) as ei:
                for _ in range(64):  # 4 MiB: far past the 1 MiB filesystem
                    n = await c.write(f, off, block)
                    assert n > 0
                    off += n
            assert ei.value.errno == errno.ENOSPC
            assert off < 1024 * 1024
            # Full, and still serving: stat, statfs, read what was kept.
            st = await c.statfs(root)
            assert st.bavail == 0
            g, _ = await c.walk(root, ["kept"])
            assert (await c.getattr(g)).size == len(kept)
            await c.lopen(g, L_O_RDWR)
            assert await c.read_all(g) == kept
            # Free space by removing the filler; writing works again.
            await c.clunk(f)
            await c.unlinkat(root, "filler")
            await c.write_all(g, len(kept), block)
            await c.fsync(g)
            assert await c.read_all(g) == kept + block
            await c.clunk(g)
        assert (small_fs / "kept").read_bytes() == kept + block

    trio.run(scenario)
