"""The compiled split-virtqueue device side against a well-behaved and a hostile driver."""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kits.ring import GPA_BASE, INDIRECT, MEM_SIZE, NEXT, UVA_BASE, WRITE, Ring
from transports.virtio._ext import MemTable, VirtqError


@pytest.fixture
def ring():
    r = Ring()
    yield r
    r.close()


def test_chain_is_one_byte_stream(ring: Ring) -> None:
    d = ring.data
    ring.write(d, b"hello ")
    ring.write(d + 0x100, b"world")
    ring.chain((d, 6, False), (d + 0x100, 5, False), (d + 0x200, 3, True), (d + 0x300, 10, True))
    ring.offer(0)
    chain = ring.queue.pop()
    assert chain.request == b"hello world"
    assert chain.capacity == 13
    assert chain.segments == 2
    # The reply crosses from the first writable buffer into the second.
    assert chain.write([b"ab", b"cdef"]) == 6
    assert ring.read(d + 0x200, 3) == b"abc"
    assert ring.read(d + 0x300, 3) == b"def"
    assert chain.complete(6) is True
    assert ring.used_idx() == 1
    assert ring.used_elem(0) == (0, 6)  # used.len is exactly the bytes written
    assert ring.queue.pop() is None


def test_request_is_a_private_copy(ring: Ring) -> None:
    ring.write(ring.data, b"ABCDEFG")
    ring.chain((ring.data, 7, False), (ring.data + 0x100, 16, True))
    ring.offer(0)
    chain = ring.queue.pop()
    ring.write(ring.data, b"XXXXXXX")  # the driver changes its buffer after the pop
    assert chain.request == b"ABCDEFG"


def test_out_of_order_completion(ring: Ring) -> None:
    for i in range(3):
        ring.chain((ring.data + 0x100 * i, 8, False), (ring.data + 0x1000 + 0x100 * i, 8, True), start=2 * i)
        ring.offer(2 * i)
    chains = [ring.queue.pop() for _ in range(3)]
    assert ring.queue.inflight == 3
    for c, n in zip(reversed(chains), (1, 2, 3), strict=True):
        c.complete(n)
    assert [ring.used_elem(i) for i in range(3)] == [(4, 1), (2, 2), (0, 3)]
    assert ring.queue.inflight == 0


def test_reply_too_large_writes_nothing(ring: Ring) -> None:
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 4, True))
    ring.offer(0)
    chain = ring.queue.pop()
    with pytest.raises(ValueError):
        chain.write([b"12345"])
    assert ring.read(ring.data + 0x100, 4) == b"\0\0\0\0"
    with pytest.raises(ValueError):
        chain.complete(5)
    chain.complete(0)
    with pytest.raises(RuntimeError):
        chain.complete(0)


def test_device_never_writes_readable_buffers(ring: Ring) -> None:
    ring.write(ring.data, b"R" * 16)
    ring.chain((ring.data, 16, False), (ring.data + 0x100, 4, True))
    ring.offer(0)
    chain = ring.queue.pop()
    chain.write([b"WWWW"])
    assert ring.read(ring.data, 16) == b"R" * 16


def test_indirect_chain(ring: Ring) -> None:
    table = ring.data + 0x8000
    ring.write(ring.data, b"in-table")
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True), table=table)
    ring.put(0, table, 32, INDIRECT)
    ring.offer(0)
    chain = ring.queue.pop()
    assert chain.request == b"in-table" and chain.capacity == 8


def broken(ring: Ring, match: str) -> None:
    with pytest.raises(VirtqError, match=match):
        ring.queue.pop()
    assert ring.queue.broken
    with pytest.raises(VirtqError):  # stays broken until the VMM resets the ring
        ring.queue.pop()


def test_descriptor_loop(ring: Ring) -> None:
    ring.put(0, ring.data, 8, NEXT, 1)
    ring.put(1, ring.data, 8, NEXT, 0)
    ring.offer(0)
    broken(ring, "loops")


def test_loop_inside_indirect_table(ring: Ring) -> None:
    table = ring.data + 0x8000
    ring.put(0, ring.data, 8, NEXT, 1, table)
    ring.put(1, ring.data + 0x100, 8, WRITE | NEXT, 1, table)
    ring.put(0, table, 32, INDIRECT)
    ring.offer(0)
    broken(ring, "loops")


def test_indirect_inside_indirect(ring: Ring) -> None:
    outer, inner = ring.data + 0x8000, ring.data + 0x9000
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True), table=inner)
    ring.put(0, inner, 32, INDIRECT, 0, outer)
    ring.put(0, outer, 16, INDIRECT)
    ring.offer(0)
    broken(ring, "INDIRECT inside")


def test_indirect_with_next_refused(ring: Ring) -> None:
    table = ring.data + 0x8000
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True), table=table)
    ring.put(0, table, 32, INDIRECT | NEXT, 1)
    ring.offer(0)
    broken(ring, "INDIRECT descriptor with NEXT")


def test_indirect_in_middle_of_chain(ring: Ring) -> None:
    ring.put(0, ring.data, 8, NEXT, 1)
    ring.put(1, ring.data + 0x8000, 32, INDIRECT)
    ring.offer(0)
    broken(ring, "middle")


def test_indirect_needs_the_feature() -> None:
    r = Ring(indirect=False)
    try:
        r.put(0, r.data + 0x8000, 32, INDIRECT)
        r.offer(0)
        broken(r, "without the feature")
    finally:
        r.close()


@pytest.mark.parametrize("length", [0, 24, 16 * 5000])
def test_bad_indirect_table_length(ring: Ring, length: int) -> None:
    ring.put(0, ring.data + 0x8000, length, INDIRECT)
    ring.offer(0)
    broken(ring, "bad indirect table")


@pytest.mark.parametrize(
    "addr,length",
    [
        (GPA_BASE + MEM_SIZE - 8, 16),  # runs off the end
        (GPA_BASE + MEM_SIZE, 1),  # starts past the end
        (GPA_BASE - 16, 8),  # before the start
        (0, 8),
        (2**64 - 8, 16),  # wraps around
        (UVA_BASE, 8),  # a VMM address, not a guest-physical one
    ],
)
def test_buffer_outside_guest_memory(ring: Ring, addr: int, length: int) -> None:
    ring.chain((addr, length, False), (ring.data, 16, True))
    ring.offer(0)
    broken(ring, "outside guest memory|wraps")


def test_indirect_table_outside_guest_memory(ring: Ring) -> None:
    ring.put(0, GPA_BASE + MEM_SIZE - 16, 32, INDIRECT)
    ring.offer(0)
    broken(ring, "indirect table outside")


def test_readable_after_writable(ring: Ring) -> None:
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True), (ring.data + 0x200, 8, False))
    ring.offer(0)
    broken(ring, "readable descriptor after a writable")


@pytest.mark.parametrize("jump", [9, 100, 0xFFFF])  # 0xFFFF: the index moved backwards
def test_avail_idx_jump(ring: Ring, jump: int) -> None:
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True))
    ring.set_avail_idx(jump)
    broken(ring, "more than the queue size")


def test_head_and_next_out_of_range(ring: Ring) -> None:
    ring.offer(8)
    broken(ring, "head index 8 out of range")
    r = Ring()
    try:
        r.put(0, r.data, 8, NEXT, 9)
        r.offer(0)
        broken(r, "next index 9 out of range")
    finally:
        r.close()


def test_request_size_limit() -> None:
    r = Ring(max_request=4096)
    try:
        r.chain((r.data, 4097, False), (r.data + 0x2000, 16, True))
        r.offer(0)
        broken(r, "request larger")
    finally:
        r.close()


def test_no_interrupt_flag(ring: Ring) -> None:
    ring.set_avail_flags(1)
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True))
    ring.offer(0)
    assert ring.queue.pop().complete(1) is False
    assert ring.used_idx() == 1


def test_event_idx_suppression() -> None:
    r = Ring(event_idx=True)
    try:
        for i in range(4):
            r.chain((r.data + 0x100 * i, 8, False), (r.data + 0x1000 + 0x100 * i, 8, True), start=2 * i)
            r.offer(2 * i)
        chains = [r.queue.pop() for _ in range(4)]
        assert r.avail_event() == 0  # busy popping: no kick wanted for buffers added meanwhile
        assert r.queue.pop() is None
        assert r.avail_event() == 4  # idle: the device asks to be kicked at the next new buffer
        r.set_used_event(2)  # the driver wants an interrupt once used.idx passes 2
        assert [c.complete(1) for c in chains] == [True, False, True, False]
    finally:
        r.close()


def test_memory_table_change_while_in_flight(ring: Ring) -> None:
    ring.write(ring.data, b"request")
    ring.chain((ring.data, 7, False), (ring.data + 0x100, 16, True))
    ring.offer(0)
    chain = ring.queue.pop()
    # The VMM replaces the table: same memory through a new fd and mapping.
    fd2 = os.dup(ring.fd)
    try:
        ring.queue.remap(MemTable([(fd2, GPA_BASE, MEM_SIZE, UVA_BASE, 0)]), *map(ring.uva, (ring.desc, ring.avail, ring.used)))
    finally:
        os.close(fd2)
    ring.table = None  # drop the last outside reference to the old mapping
    assert chain.write([b"reply"]) == 5  # the chain keeps its own mapping alive
    chain.complete(5)
    assert ring.read(ring.data + 0x100, 5) == b"reply"
    assert ring.used_elem(0) == (0, 5)
    # A table that no longer contains the rings breaks the queue instead of dangling.
    other = os.memfd_create("other")
    os.ftruncate(other, 1 << 16)
    try:
        with pytest.raises(VirtqError, match="outside guest memory"):
            ring.queue.remap(MemTable([(other, 0, 1 << 16, 0, 0)]), *map(ring.uva, (ring.desc, ring.avail, ring.used)))
    finally:
        os.close(other)
    assert ring.queue.broken


def test_stopped_queue_drops_completions(ring: Ring) -> None:
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True))
    ring.offer(0)
    chain = ring.queue.pop()
    assert ring.queue.stop() == 1
    assert chain.complete(3) is False
    assert ring.used_idx() == 0
    assert ring.queue.pop() is None


def test_memtable_refuses_bad_regions() -> None:
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(ValueError, match="past the end"):
            MemTable([(fd, 0, 8192, 0, 0)])
        with pytest.raises(ValueError):
            MemTable([(fd, 2**64 - 4096, 8192, 0, 0)])
        with pytest.raises(ValueError, match="overlaps"):
            MemTable([(fd, 0, 4096, 0, 0), (fd, 0, 4096, 1 << 20, 0)])
        with pytest.raises(ValueError):
            MemTable([])
    finally:
        os.close(fd)


def test_pread_zero_copy_layout(ring: Ring) -> None:
    d = ring.data
    # Linux's zero-copy Rread: an 11-byte header area, then payload pages elsewhere.
    ring.write(d, b"T" * 23)
    ring.chain((d, 23, False), (d + 0x1000, 11, True), (d + 0x3000, 4096, True), (d + 0x5000, 4096, True))
    ring.offer(0)
    chain = ring.queue.pop()
    content = os.urandom(6000)
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.flush()
        n = chain.pread(f.fileno(), 100, 8000)
    assert n == 5900  # stops at end of file
    assert ring.read(d + 0x3000, 4096) == content[100:4196]
    assert ring.read(d + 0x5000, 5900 - 4096) == content[4196:]
    assert ring.read(d + 0x1000, 11) == bytes(11)  # header area untouched until written
    chain.write([struct.pack("<IBHI", 11 + n, 117, 1, n)])
    chain.complete(11 + n)
    assert ring.used_elem(0) == (0, 11 + n)


TWRITE_HEAD = struct.Struct("<IBHIQI")


def _split_twrite(ring: Ring, data: bytes, *, head_pieces: tuple[int, ...] = (23,)) -> object:
    """Offers a Twrite laid out as Linux's zero-copy write: the header (possibly cut into several
    buffers), then the data in separate pages; returns the popped chain."""
    d = ring.data
    head = TWRITE_HEAD.pack(23 + len(data), 118, 5, 1, 0, len(data))
    bufs, pos = [], 0
    for k, n in enumerate(head_pieces):
        ring.write(d + 0x100 * k, head[pos : pos + n])
        bufs.append((d + 0x100 * k, n, False))
        pos += n
    for k in range(0, len(data), 4096):
        ring.write(d + 0x2000 + 2 * k, data[k : k + 4096])  # pages with gaps between them
        bufs.append((d + 0x2000 + 2 * k, len(data[k : k + 4096]), False))
    bufs.append((d + 0x1000, 64, True))
    ring.chain(*bufs)
    ring.offer(0)
    return ring.queue.pop()


@pytest.mark.parametrize("head_pieces", [(23,), (5, 18), (3, 4, 16)])
def test_split_twrite_copies_only_the_header(ring: Ring, head_pieces: tuple[int, ...]) -> None:
    ring.queue.set_split(118, 23, 23 + 1024)
    data = os.urandom(10_000)
    chain = _split_twrite(ring, data, head_pieces=head_pieces)
    assert chain.split and chain.readable == 23 + len(data)
    assert chain.request == TWRITE_HEAD.pack(23 + len(data), 118, 5, 1, 0, len(data))
    assert chain.read(23, len(data)) == data
    with tempfile.TemporaryFile() as f:
        assert chain.pwrite(f.fileno(), 7, 23, len(data)) == len(data)  # straight from the pages
        f.seek(0)
        assert f.read() == bytes(7) + data
    chain.complete(0)


def test_split_twrite_sees_what_the_guest_wrote_last(ring: Ring) -> None:
    # The data is not copied at pop: a guest that changes it afterwards writes its new bytes
    # (its own business), while the header that was parsed stays the private copy.
    ring.queue.set_split(118, 23, 23 + 1024)
    chain = _split_twrite(ring, b"a" * 5000)
    ring.write(ring.data, b"\xff" * 23)
    ring.write(ring.data + 0x2000, b"b" * 4096)
    assert chain.request[4] == 118
    assert chain.read(23, 5000) == b"b" * 4096 + b"a" * 904
    chain.complete(0)


def test_split_only_large_requests_of_the_chosen_type(ring: Ring) -> None:
    ring.queue.set_split(118, 23, 23 + 1024)
    small = _split_twrite(ring, b"x" * 1024)  # not above the minimum: copied whole
    assert not small.split and small.readable == len(small.request) == 23 + 1024
    with pytest.raises(ValueError):
        small.pwrite(0, 0, 23, 10)  # nothing left in guest memory
    small.complete(0)
    ring.write(ring.data + 0x4000, struct.pack("<IBH", 4007, 116, 1) + bytes(4000))  # a Tread
    ring.chain((ring.data + 0x4000, 4007, False), (ring.data + 0x1000, 64, True), start=4)
    ring.offer(4)
    other = ring.queue.pop()
    assert not other.split and len(other.request) == 4007
    other.complete(0)
    ring.queue.set_split(-1, 0, 0)  # turned off
    big = _split_twrite(ring, b"y" * 5000)
    assert not big.split and len(big.request) == 5023
    big.complete(0)


def test_split_ranges_are_bounds_checked(ring: Ring) -> None:
    ring.queue.set_split(118, 23, 23 + 1024)
    chain = _split_twrite(ring, b"z" * 3000)
    for start, count in [(0, 3024), (3023, 2), (2**64 - 1, 2), (5, 2**64 - 1)]:
        with pytest.raises((ValueError, OverflowError)):
            chain.read(start, count)
        with pytest.raises((ValueError, OverflowError)):
            chain.pwrite(0, 0, start, count)
    with pytest.raises(OSError):
        chain.pwrite(-1, 0, 23, 3000)
    chain.complete(0)
    with pytest.raises(RuntimeError):
        chain.read(23, 10)  # the buffers went back to the driver
    with pytest.raises(ValueError):
        ring.queue.set_split(118, 30, 23)  # header longer than the minimum
    with pytest.raises(ValueError):
        ring.queue.set_split(118, 3, 1000)  # shorter than a 9P header


def test_pread_error_is_oserror(ring: Ring) -> None:
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 64, True))
    ring.offer(0)
    chain = ring.queue.pop()
    with pytest.raises(OSError):
        chain.pread(-1, 0, 10)
    chain.complete(0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(
        st.tuples(
            st.integers(GPA_BASE - 64, GPA_BASE + MEM_SIZE + 64) | st.integers(0, 2**64 - 1),
            st.integers(0, 0x3000) | st.integers(0, 2**32 - 1),
            st.integers(0, 7),
            st.integers(0, 12),
        ),
        min_size=8,
        max_size=8,
    ),
    heads=st.lists(st.integers(0, 10), min_size=1, max_size=10),
    idx=st.integers(0, 0xFFFF) | st.integers(1, 10),
    split=st.booleans(),
    direct=st.booleans(),
)
def test_random_driver_never_crashes(descs, heads, idx, split: bool, direct: bool) -> None:
    r = Ring()
    file = os.memfd_create("direct")
    try:
        if split:  # guest memory is zeros: every readable part over 8 bytes gets split
            r.queue.set_split(0, 7, 8)
        if direct:
            # Guest memory full of Twrite and Tread headers for fid 0, which the queue serves
            # itself (transports/ring/direct.c): buffers starting on one are answered there.
            pattern = struct.pack("<IBHIQI", 27, 118, 1, 0, 0, 4) + b"abcd" + struct.pack("<IBHIQI", 23, 116, 2, 0, 0, 4096)
            start = r.off(r.data)
            r.mem[start:] = (pattern * (MEM_SIZE // len(pattern) + 1))[: MEM_SIZE - start]
            assert r.queue.direct_open(0, os.dup(file), 3)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            r.put(i, addr, length, flags, nxt)
        for h in heads:
            r.offer(h)
        if idx > 10:
            r.set_avail_idx(idx)
        before = bytes(r.mem)
        while True:
            try:
                chain = r.queue.pop()
            except VirtqError:
                assert r.queue.broken
                break
            if chain is None:
                break
            if chain.split:
                assert len(chain.read(0, chain.readable)) == chain.readable
                with open(os.devnull, "wb") as null:
                    assert chain.pwrite(null.fileno(), 0, 0, chain.readable) == chain.readable
            n = chain.capacity
            chain.write([b"\xaa" * n])
            chain.complete(n)
        # The device changed nothing but the used ring and device-writable buffers.
        after = bytes(r.mem)
        allowed = [(r.used, 6 + 8 * r.num)]
        allowed += [(a, n) for a, n, f, _ in descs if f & WRITE and not f & INDIRECT]
        expected = bytearray(before)
        for a, n in allowed:
            lo, hi = max(a, GPA_BASE), min(a + n, GPA_BASE + MEM_SIZE)
            if lo < hi:
                expected[lo - GPA_BASE : hi - GPA_BASE] = after[lo - GPA_BASE : hi - GPA_BASE]
        assert expected == after, "the device wrote outside the used ring and writable buffers"
    finally:
        r.queue.stop()
        r.close()
        os.close(file)


def test_driver_writing_the_used_index_does_not_move_the_device(ring: Ring) -> None:
    ring.chain((ring.data, 8, False), (ring.data + 0x100, 8, True))
    ring.offer(0)
    chain = ring.queue.pop()
    struct.pack_into("<H", ring.mem, ring.off(ring.used + 2), 40)  # the wrong side writes used.idx
    chain.complete(2)
    assert ring.used_idx() == 1 and ring.used_elem(0) == (0, 2)


def test_pread_nowait_reads_only_what_is_cached(ring: Ring) -> None:
    d = ring.data
    ring.chain((d, 23, False), (d + 0x1000, 11, True), (d + 0x3000, 8192, True))
    ring.offer(0)
    chain = ring.queue.pop()
    content = os.urandom(8192)
    # A file on a disk filesystem (not tmpfs), so its pages can really leave the cache.
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(__file__)) as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
        assert chain.pread(f.fileno(), 0, 8192, nowait=True) == 8192  # just written: cached
        assert ring.read(d + 0x3000, 8192) == content
        assert chain.pread(f.fileno(), 8192, 100, nowait=True) == 0  # end of file
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            n = chain.pread(f.fileno(), 0, 8192, nowait=True)
        except BlockingIOError:
            n = -1
        assert n in (-1, 8192)  # dropped (EAGAIN) or the kernel kept the pages
        assert chain.pread(f.fileno(), 0, 8192) == 8192  # the blocking form always reads
    chain.complete(0)


def test_uninitialised_objects_raise_instead_of_crashing() -> None:
    from transports.virtio._ext import VirtQueue

    q = VirtQueue.__new__(VirtQueue)
    with pytest.raises(RuntimeError):
        q.pop()
    with pytest.raises(RuntimeError):
        q.stop()
    empty = MemTable.__new__(MemTable)
    with pytest.raises(VirtqError):
        VirtQueue(empty, 8, 0, 0x1000, 0x2000)


def _offer_one(r: Ring) -> None:
    r.chain((r.data, 8, False), (r.data + 0x1000, 8, True))
    r.offer(0)


def test_poll_sees_a_buffer_offered_while_it_spins_and_asks_for_no_kick() -> None:
    """A back-end spinning on an empty ring finds a buffer the driver adds meanwhile, and tells
    the driver (EVENT_IDX) that it need not kick for it."""
    r = Ring(event_idx=True)
    seen_event: list[int] = []

    def driver() -> None:
        time.sleep(0.05)
        seen_event.append(r.avail_event())  # what a driver adding a buffer now would read
        _offer_one(r)

    try:
        t = threading.Thread(target=driver)
        start = time.monotonic()
        t.start()
        assert r.queue.poll(5_000_000_000) is True
        assert time.monotonic() - start < 4
        t.join()
        assert seen_event == [0xFFFF]  # last_avail - 1: adding buffer 0 needs no kick
        # Still suppressed: the driver may read it only now, after publishing what was seen.
        assert r.avail_event() == 0xFFFF
        assert r.queue.pop() is not None
        assert r.queue.pop() is None
        assert r.avail_event() == 1  # the ring went empty: kick me at the next buffer
    finally:
        r.close()


def test_poll_gives_up_after_its_budget() -> None:
    r = Ring(event_idx=True)
    try:
        start = time.monotonic()
        assert r.queue.poll(20_000_000) is False
        assert time.monotonic() - start >= 0.019
        assert r.avail_event() == 0  # it asks for a kick at the next buffer, as an empty pop does
        assert r.queue.pop() is None
    finally:
        r.close()


def test_poll_returns_at_once_when_a_buffer_is_waiting(ring: Ring) -> None:
    _offer_one(ring)
    assert ring.queue.poll(0) is True
    assert ring.queue.pop() is not None
    assert ring.queue.poll(0) is False


def test_poll_ends_early_when_the_event_loop_has_work(ring: Ring) -> None:
    fd = os.eventfd(1)  # readable: "another fd of the event loop is ready"
    try:
        start = time.monotonic()
        assert ring.queue.poll(10_000_000_000, fd) is False
        assert time.monotonic() - start < 5
    finally:
        os.close(fd)


def test_poll_on_a_stopped_or_broken_queue_does_not_spin(ring: Ring) -> None:
    ring.queue.stop()
    start = time.monotonic()
    assert ring.queue.poll(10_000_000_000) is False
    assert time.monotonic() - start < 5
