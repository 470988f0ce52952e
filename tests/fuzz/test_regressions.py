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
from ninep.protocol import messages as m
from ninep.protocol.codec import codec_for
from ninep.protocol.numbers import (
    L_O_CREAT,
    L_O_RDWR,
    LOCK_FLAGS_BLOCK,
    LOCK_SUCCESS,
    LOCK_TYPE_WRLCK,
    NOFID,
    NOTAG,
    SETATTR_SIZE,
    V9P2000_L,
)
from tests.kits.e2e import fails
from tests.kits.harness import client_for, served
from tests.kits.session import Frame, run_script


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


def test_flush_is_read_when_every_request_slot_waits_on_a_lock() -> None:
    """Session fuzzer: with every request slot (max_inflight) held by a blocking Tlock, the
    session waited for a free slot before reading the next message, so the Tflush that would
    free one was never read: the connection hung. Tflush no longer needs a slot."""
    L = codec_for(V9P2000_L)

    def batch(*msgs: m.Message) -> list[Frame]:
        return [Frame(L.encode_bytes(x)) for x in msgs]

    script = [
        batch(m.Tversion(8192, V9P2000_L, tag=NOTAG), m.Tattach(0, NOFID, "root", "", 0, tag=1)),
        batch(m.Twalk(0, 1, [], tag=2)),
        batch(m.Tlcreate(1, "x", L_O_RDWR | L_O_CREAT, 0o644, 0, tag=3)),
        batch(m.Twalk(0, 2, ["x"], tag=4), m.Twalk(0, 3, ["x"], tag=5)),
        batch(m.Tlopen(2, L_O_RDWR, tag=6), m.Tlopen(3, L_O_RDWR, tag=7)),
        batch(m.Tlock(1, LOCK_TYPE_WRLCK, 0, 0, 0, 1, "a", tag=8)),
        # Two other owners block on the held lock and fill both slots; then flush one.
        batch(m.Tlock(2, LOCK_TYPE_WRLCK, LOCK_FLAGS_BLOCK, 0, 0, 2, "b", tag=9),
              m.Tlock(3, LOCK_TYPE_WRLCK, LOCK_FLAGS_BLOCK, 0, 0, 3, "c", tag=10),
              m.Tflush(9, tag=11)),
    ]
    # The peer then flushes tag 10 too (still blocked); run_script raises TooSlowError if any
    # flush goes unanswered.
    run_script(MemoryBackend, script, settle=1.0, max_inflight=2)
