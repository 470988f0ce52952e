"""Fuzzing the compiled split-virtqueue device side (transports/ring/{memtable,queue,chain,virtqueue}.c)
as a hostile driver.

tests/transports/virtio/test_ring.py has the hand-written hostile cases and a small random driver (one
region, eight direct descriptors). This goes further: queue sizes 1..256, guest memory split in
regions with and without holes, indirect tables full of random descriptors, avail and used
indices starting anywhere (wrap-around), chains written, pread into, completed with any length,
dropped, or carried across a memory-table change; and a second *process* rewriting descriptors
and indices while the device reads them (the race a real guest can run; the GIL cannot serialise
it). Invariants: only VirtqError (and ValueError for a reply that does not fit) ever comes out,
a broken queue stays broken, the device writes nothing but the used ring and device-writable
buffers, and a fresh queue on clean memory then works. Run under ASan/UBSan by test_sanitized.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import hypothesis.strategies as hs
from hypothesis import given

from tests.fuzz.budget import examples, fuzz_settings
from tests.kits.ring import DESC, GPA_BASE, INDIRECT, MEM_SIZE, NEXT, UVA_BASE, WRITE, Ring
from transports.virtio._ext import MemTable, VirtqError, VirtQueue

HALF = MEM_SIZE // 2
INDIRECT_BASE = GPA_BASE + 0x4000  # two 4 KiB indirect tables
DATA = GPA_BASE + 0x10000

#: Guest memory layouts, as (gpa, size, file offset) regions over the ring's memfd. All map a
#: gpa to the same file offset as a single region would, so Ring.write/read stay valid.
LAYOUTS = {
    "one": [(GPA_BASE, MEM_SIZE, 0)],
    "split": [(GPA_BASE, HALF, 0), (GPA_BASE + HALF, HALF, HALF)],
    "hole": [(GPA_BASE, HALF, 0), (GPA_BASE + HALF + 0x2000, HALF - 0x2000, HALF + 0x2000)],
    "short": [(GPA_BASE, HALF, 0), (GPA_BASE + HALF, HALF - 0x10000, HALF)],
}


def memtable(ring: Ring, layout: str) -> MemTable:
    return MemTable([(ring.fd, gpa, size, ring.uva(gpa), off) for gpa, size, off in LAYOUTS[layout]])


_addr = hs.one_of(
    hs.integers(DATA, GPA_BASE + MEM_SIZE - 1),
    hs.sampled_from([
        0, GPA_BASE - 1, GPA_BASE, GPA_BASE + HALF - 8, GPA_BASE + HALF, GPA_BASE + HALF + 0x1000,
        GPA_BASE + MEM_SIZE - 16, GPA_BASE + MEM_SIZE, INDIRECT_BASE, INDIRECT_BASE + 0x1000,
        GPA_BASE + 0x1000, GPA_BASE + 0x3000, 2**64 - 16, 2**63,
    ]),
)
_len = hs.one_of(hs.integers(0, 0x2000), hs.sampled_from([0, 1, 16, 0x1000, HALF, 2**31, 2**32 - 1]))


def _descs(n: int, table_slots: int) -> hs.SearchStrategy[list[tuple[int, int, int, int]]]:
    return hs.lists(
        hs.tuples(_addr, _len, hs.integers(0, 7) | hs.sampled_from([NEXT, WRITE, NEXT | WRITE]),
                  hs.integers(0, table_slots + 2)),
        min_size=n, max_size=n,
    )


@hs.composite
def drivers(draw: hs.DrawFn) -> dict[str, object]:
    num = draw(hs.sampled_from([1, 2, 4, 8, 16, 64, 256]))
    return {
        "num": num,
        "layout": draw(hs.sampled_from(sorted(LAYOUTS))),
        "descs": draw(_descs(num, num)),
        "indirect": [draw(_descs(draw(hs.integers(1, 16)), 16)) for _ in range(2)],
        "heads": draw(hs.lists(hs.integers(0, num + 2), min_size=1, max_size=min(num, 12) + 2)),
        "idx_jump": draw(hs.none() | hs.integers(0, 0xFFFF)),
        "last_avail": draw(hs.sampled_from([0, 0xFFFE, 0xFFFF]) | hs.integers(0, 0xFFFF)),
        "used_idx": draw(hs.sampled_from([0, 0xFFFF]) | hs.integers(0, 0xFFFF)),
        "event_idx": draw(hs.booleans()),
        "feature_indirect": draw(hs.booleans() | hs.just(True)),
        "max_request": draw(hs.sampled_from([1 << 16, 100, 1 << 24])),
        # What the device does with each chain: (write at, write size, pread count, complete
        # length, drop instead of completing, remap before completing).
        "actions": draw(hs.lists(hs.tuples(hs.integers(0, 64), hs.integers(0, 0x3000),
                                           hs.integers(0, 0x3000), hs.integers(0, 0x3000),
                                           hs.booleans(), hs.booleans()), min_size=1, max_size=16)),
    }


def _allowed_writes(ring: Ring, d: dict[str, object]) -> list[tuple[int, int]]:
    """Where the device may write: the used ring (avail_event included) and every buffer some
    descriptor, direct or indirect, marks device-writable."""
    allowed = [(ring.used, 6 + 8 * int(d["num"]))]  # type: ignore[call-overload]
    tables = [d["descs"], *d["indirect"]]  # type: ignore[misc]
    for t in tables:
        allowed += [(a, n) for a, n, f, _ in t if f & WRITE and not f & INDIRECT]
    return allowed


@contextmanager
def _datafile() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(0x3000))
        f.flush()
        yield f.fileno()


def drive(d: dict[str, object]) -> None:
    """Sets up the ring as the driver `d` says, then serves it until it is empty or broken."""
    num = int(d["num"])  # type: ignore[call-overload]
    ring = Ring(num)
    try:
        for i, desc in enumerate(d["descs"]):  # type: ignore[arg-type]
            ring.put(i, *desc)
        for k, table in enumerate(d["indirect"]):  # type: ignore[arg-type]
            for i, desc in enumerate(table):
                ring.put(i, *desc, table=INDIRECT_BASE + 0x1000 * k)
        ring.write(DATA, bytes(range(256)) * 64)
        struct.pack_into("<H", ring.mem, ring.off(ring.used + 2), int(d["used_idx"]))  # type: ignore[call-overload]
        ring.avail_idx = int(d["last_avail"])  # type: ignore[call-overload]
        for h in d["heads"]:  # type: ignore[attr-defined]
            ring.offer(h)
        if d["idx_jump"] is not None:
            ring.set_avail_idx(int(d["idx_jump"]))  # type: ignore[call-overload]
        q = VirtQueue(memtable(ring, str(d["layout"])), num, ring.uva(ring.desc), ring.uva(ring.avail),
                      ring.uva(ring.used), event_idx=bool(d["event_idx"]),
                      indirect=bool(d["feature_indirect"]), last_avail=int(d["last_avail"]),  # type: ignore[call-overload]
                      max_request=int(d["max_request"]))  # type: ignore[call-overload]
        before = bytes(ring.mem)
        actions = list(d["actions"])  # type: ignore[call-overload]
        with _datafile() as fd:
            for step in range(64):
                try:
                    chain = q.pop()
                except VirtqError:
                    assert q.broken
                    try:
                        q.pop()
                    except VirtqError:
                        pass
                    else:
                        raise AssertionError("a broken queue served again")
                    break
                if chain is None:
                    break
                assert len(chain.request) <= int(d["max_request"])  # type: ignore[call-overload]
                assert chain.capacity <= 2**32
                at, wsize, count, length, drop, remap = actions[step % len(actions)]
                try:
                    chain.write([b"\xa5" * wsize], at)
                except ValueError:
                    assert at + wsize > chain.capacity
                n = chain.pread(fd, 0, count, skip=min(at, chain.capacity))
                assert 0 <= n <= count
                if remap:
                    q.remap(memtable(ring, "one"), ring.uva(ring.desc), ring.uva(ring.avail), ring.uva(ring.used))
                if drop:
                    del chain
                    continue
                try:
                    chain.complete(length)
                except ValueError:
                    assert length > chain.capacity
                    chain.complete(0)
        after = bytes(ring.mem)
        expected = bytearray(before)
        for a, n in _allowed_writes(ring, d):
            lo, hi = max(a, GPA_BASE), min(a + n, GPA_BASE + MEM_SIZE)
            if lo < hi:
                expected[lo - GPA_BASE : hi - GPA_BASE] = after[lo - GPA_BASE : hi - GPA_BASE]
        assert bytes(expected) == after, "the device wrote outside the used ring and writable buffers"
        del q
    finally:
        ring.close()
    fresh_queue_works()


def fresh_queue_works() -> None:
    ring = Ring(8)
    try:
        ring.write(ring.data, b"hello")
        ring.chain((ring.data, 5, False), (ring.data + 0x100, 8, True))
        ring.offer(0)
        chain = ring.queue.pop()
        assert chain.request == b"hello"
        chain.write([b"world"])
        chain.complete(5)
        assert ring.used_elem(0) == (0, 5) and ring.read(ring.data + 0x100, 5) == b"world"
    finally:
        ring.close()


@fuzz_settings(150)
@given(drivers())
def test_virtqueue_survives_any_driver(d: dict[str, object]) -> None:
    drive(d)


# --- a driver that rewrites the ring while the device reads it -------------------------------------


def _scribbler(ring: Ring, seed: int) -> None:
    """Child process: rewrites descriptors, indirect tables and avail entries/index for ever,
    alternating valid chains with loops, wild addresses and huge lengths."""
    rnd = random.Random(seed)
    num = ring.num
    wild = [0, GPA_BASE + MEM_SIZE - 4, 2**64 - 8, INDIRECT_BASE, GPA_BASE + HALF - 2]
    while True:
        i = rnd.randrange(num)
        if rnd.random() < 0.9:
            # Mostly valid: readable then writable buffers, chains of a few descriptors.
            more = i + 1 < num and rnd.random() < 0.6
            ring.put(i, DATA + 0x100 * i, 64, (NEXT if more else 0) | (WRITE if i & 1 else 0), i + 1)
        else:
            ring.put(i, rnd.choice(wild), rnd.choice([0, 16, 2**32 - 1, 0x1000]),
                     rnd.randrange(8), rnd.randrange(num + 2))
        t = INDIRECT_BASE + 16 * rnd.randrange(32)
        DESC.pack_into(ring.mem, ring.off(t), rnd.choice(wild + [DATA]), rnd.randrange(0x2000),
                       rnd.randrange(8), rnd.randrange(40))
        struct.pack_into("<H", ring.mem, ring.off(ring.avail + 4 + 2 * rnd.randrange(num)), rnd.randrange(num + 1))
        # The device starts each queue at avail index 0: mostly publish up to a full ring.
        idx = rnd.randrange(num + 1) if rnd.random() < 0.95 else rnd.randrange(0x10000)
        struct.pack_into("<H", ring.mem, ring.off(ring.avail + 2), idx)


def race(rounds: int, seed: int = 0) -> int:
    """`rounds` fresh queues popped against a scribbling child process; returns how many chains
    were served."""
    ring = Ring(16, event_idx=True)
    served = 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            _scribbler(ring, seed)
        finally:
            os._exit(0)
    try:
        for n in range(rounds * 20):
            if n >= rounds and served:
                break  # (on a loaded machine the child may get little time: go on until it did)
            q = VirtQueue(memtable(ring, "split"), 16, ring.uva(ring.desc), ring.uva(ring.avail),
                          ring.uva(ring.used), event_idx=True, indirect=True)
            for _ in range(200):
                try:
                    chain = q.pop()
                except VirtqError:
                    assert q.broken
                    break
                if chain is None:
                    continue
                served += 1
                assert chain.capacity <= 2**32
                chain.write([b"x" * min(chain.capacity, 32)])
                chain.complete(min(chain.capacity, 32))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ring.close()
    fresh_queue_works()
    return served


def test_virtqueue_survives_a_driver_rewriting_the_ring_while_it_is_read() -> None:
    assert race(examples(300)) > 0, "the race never let a chain through: it tests nothing"


@fuzz_settings(200)
@given(
    hs.integers(0, 70000) | hs.sampled_from([2**32 - 1]),
    *[hs.integers(0, 2**64 - 1) | hs.sampled_from([GPA_BASE + 0x1000, GPA_BASE + MEM_SIZE - 2, UVA_BASE + 0x2000]) for _ in range(3)],
    hs.booleans(),
    hs.integers(0, 0x1FFFF),
)
def test_queue_setup_out_of_range_is_refused(num: int, desc: int, avail: int, used: int, by_uva: bool, last_avail: int) -> None:
    """A VMM's vring size, addresses (outside memory, misaligned, wrapping) and base index are
    checked when the queue is set up: ValueError, OverflowError or VirtqError, nothing else."""
    ring = Ring(8)
    try:
        q = VirtQueue(ring.table, num, desc, avail, used, by_uva=by_uva, last_avail=last_avail)
    except (ValueError, OverflowError, VirtqError):
        return
    finally:
        ring.close()
    assert num and num <= 32768 and num & (num - 1) == 0 and last_avail <= 0xFFFF
    assert q.num == num
