"""Regression tests for what the fuzzers found (one test per finding, named after the behaviour
that was wrong). tests/fuzz/README.md lists the findings."""

from __future__ import annotations

import errno
import resource
from pathlib import Path

import pytest
import trio

from fs_backends.base import Backend
from fs_backends.local import LocalBackend
from fs_backends.memory import MemoryBackend
from ninep.protocol import L_O_CREAT, L_O_RDWR, LOCK_SUCCESS, LOCK_TYPE_WRLCK, SETATTR_SIZE
from tests.e2e.harness import client_for, served
from tests.e2e.util import fails


def test_memory_backend_refuses_huge_sizes_and_offsets_with_efbig(tmp_path: Path) -> None:
    """Session fuzzer: Tsetattr size=2^32-1 or Twrite at offset 2^40 made the in-memory tree
    (also served by `ninep serve memory:`) allocate that much: MemoryError, or gigabytes taken
    for real. Now a size past the limit is EFBIG and nothing is allocated."""

    async def main() -> None:
        backend = MemoryBackend(max_file_size=1 << 20)
        async with served(backend, "fd", tmp_path) as (_, connect), client_for(connect) as c:
            root = await c.attach()
            f, _ = await c.walk(root, [])
            await c.lcreate(f, "big", L_O_RDWR | L_O_CREAT, 0o644)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for offset in (2**31, 2**40, 2**63, 2**64 - 1, (1 << 20) - 1):
                await fails(errno.EFBIG, c.write(f, offset, b"xy"))
            for size in (2**32 - 1, 2**40, 2**63, (1 << 20) + 1):
                await fails(errno.EFBIG, c.setattr(f, SETATTR_SIZE, size=size))
            # Up to the limit works, and reads back as zeros.
            await c.setattr(f, SETATTR_SIZE, size=1 << 20)
            assert await c.write(f, (1 << 20) - 2, b"xy") == 2
            assert await c.read(f, (1 << 20) - 4, 8) == b"\0\0xy"
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            assert grown_kib < 200 * 1024, f"the server grew by {grown_kib} KiB"
            await c.clunk(f)
            await c.clunk(root)

    trio.run(main)


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_lock_ranges_past_the_largest_offset_answer_einval(tmp_path: Path, kind: str) -> None:
    """Session fuzzer: Tlock/Tgetlock with start >= 2^63 (9P offsets are u64, struct flock's
    are signed) raised struct.error inside the local backend: an internal error logged at
    ERROR and EIO. They are EINVAL, as fcntl says, in every backend."""

    async def main() -> None:
        backend: Backend = MemoryBackend() if kind == "memory" else LocalBackend(str(tmp_path))
        async with served(backend, "fd", tmp_path) as (_, connect), client_for(connect) as c:
            root = await c.attach()
            f, _ = await c.walk(root, [])
            await c.lcreate(f, "locked", L_O_RDWR | L_O_CREAT, 0o644)
            for start in (2**63, 2**64 - 1):
                await fails(errno.EINVAL, c.lock(f, LOCK_TYPE_WRLCK, start, 1))
                await fails(errno.EINVAL, c.getlock(f, LOCK_TYPE_WRLCK, start, 1))
            # The largest valid start still works.
            assert await c.lock(f, LOCK_TYPE_WRLCK, 2**63 - 1, 0) == LOCK_SUCCESS
            await c.clunk(f)
            await c.clunk(root)

    trio.run(main)
