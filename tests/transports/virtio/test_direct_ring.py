"""Direct I/O in the compiled queue (transports/ring/direct.c): Tread/Twrite on registered fids
answered by pop()/poll() themselves, everything else left for the session, in ring order."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.kits.ring import Ring

TWRITE = struct.Struct("<IBHIQI")  # size type tag fid offset count
TREAD = TWRITE
REPLY = struct.Struct("<IBHI")  # size type tag count
FID = 5
READ, WRITE = 1, 2


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(num=16)
    yield r
    r.queue.stop()
    r.close()


@pytest.fixture
def path(tmp_path) -> str:  # noqa: ANN001
    p = tmp_path / "f"
    p.write_bytes(b"")
    return str(p)


def register(ring: Ring, path: str, flags: int = READ | WRITE, fid: int = FID, mode: int = os.O_RDWR) -> None:
    assert ring.queue.direct_open(fid, os.open(path, mode), flags) is True


class Offer:
    """Lays out requests in guest memory as the Linux driver does: header, data, reply area."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.desc = 0
        self.addr = ring.data

    def _buf(self, size: int) -> int:
        addr = self.addr
        self.addr += (size + 0xFFF) & ~0xFFF or 0x1000
        return addr

    def chain(self, readable: list[bytes], writable: list[int]) -> tuple[int, list[int]]:
        bufs: list[tuple[int, int, bool]] = []
        for piece in readable:
            a = self._buf(len(piece))
            self.ring.write(a, piece)
            bufs.append((a, len(piece), False))
        outs = []
        for n in writable:
            a = self._buf(n)
            outs.append(a)
            bufs.append((a, n, True))
        head = self.ring.chain(*bufs, start=self.desc)
        self.desc += len(bufs)
        self.ring.offer(head)
        return head, outs

    def write(self, tag: int, offset: int, data: bytes, fid: int = FID, pieces: tuple[int, ...] = ()) -> list[int]:
        head = TWRITE.pack(TWRITE.size + len(data), 118, tag, fid, offset, len(data))
        cuts = [0, *pieces, len(head)]
        parts = [head[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        return self.chain([*parts, data] if data else parts, [11])[1]

    def read(self, tag: int, offset: int, count: int, room: int, fid: int = FID) -> list[int]:
        return self.chain([TREAD.pack(23, 116, tag, fid, offset, count)], [11, room])[1]

    def other(self, tag: int, mtype: int = 120, fid: int = FID) -> list[int]:
        return self.chain([struct.pack("<IBHI", 11, mtype, tag, fid)], [64])[1]


def test_writes_and_reads_on_a_registered_fid_are_answered_by_the_queue(ring: Ring, path: str) -> None:
    register(ring, path)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    ring.queue.set_call(call)
    try:
        o = Offer(ring)
        data = os.urandom(5000)
        (reply,) = o.write(7, 100, data)
        assert ring.queue.pop() is None  # answered: nothing for the session
        assert ring.used_idx() == 1 and ring.used_elem(0) == (0, 11)
        assert REPLY.unpack(ring.read(reply, 11)) == (11, 119, 7, 5000)
        with open(path, "rb") as f:
            assert f.read() == bytes(100) + data
        assert os.eventfd_read(call) == 1  # the driver was interrupted
        hdr, body = o.read(8, 100, 5000, 8192)
        assert ring.queue.pop() is None
        assert ring.used_elem(1)[1] == 11 + 5000
        assert REPLY.unpack(ring.read(hdr, 11)) == (11 + 5000, 117, 8, 5000)
        assert ring.read(body, 5000) == data
        stats = ring.queue.direct_stats()
        assert stats[118][:2] == (1, 5000) and stats[116][:2] == (1, 5000)
        assert sum(stats[118][3]) == 1 and ring.queue.direct_served == 2 and ring.queue.direct_notified == 2
    finally:
        os.close(call)


@pytest.mark.parametrize("pieces", [(3,), (7, 11), (1, 2, 3, 4, 5)])
def test_a_header_split_across_buffers_is_read_as_one_stream(ring: Ring, path: str, pieces: tuple[int, ...]) -> None:
    register(ring, path)
    (reply,) = Offer(ring).write(3, 0, b"hello", pieces=pieces)
    assert ring.queue.pop() is None
    assert REPLY.unpack(ring.read(reply, 11)) == (11, 119, 3, 5)
    with open(path, "rb") as f:
        assert f.read() == b"hello"


def test_reads_stop_at_end_of_file_and_fit_msize_and_the_buffer(ring: Ring, path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(20000))
    register(ring, path, READ)
    o = Offer(ring)
    hdr, _ = o.read(1, 19990, 100, 4096)  # 10 bytes left
    assert ring.queue.pop() is None
    assert REPLY.unpack(ring.read(hdr, 11))[3] == 10
    hdr, _ = o.read(2, 0, 100000, 4096)  # the buffer holds 4096
    assert ring.queue.pop() is None
    assert REPLY.unpack(ring.read(hdr, 11))[3] == 4096
    ring.queue.set_msize(1024)
    hdr, _ = o.read(3, 0, 100000, 4096)  # msize 1024: at most 1013 bytes of data
    assert ring.queue.pop() is None
    assert REPLY.unpack(ring.read(hdr, 11))[3] == 1024 - 11


def _untouched(ring: Ring, path: str) -> None:
    chain = ring.queue.pop()
    assert chain is not None and not chain.done, "expected the request to reach the session"
    chain.complete(0)
    with open(path, "rb") as f:
        assert f.read() == b""


@pytest.mark.parametrize(
    "case",
    ["unregistered fid", "read-only fid", "count disagrees with size", "larger than msize", "clunk", "no reply room"],
)
def test_requests_the_queue_cannot_answer_reach_the_session_untouched(ring: Ring, path: str, case: str) -> None:
    register(ring, path, READ if case == "read-only fid" else READ | WRITE)
    o = Offer(ring)
    if case == "unregistered fid":
        o.write(1, 0, b"data", fid=FID + 1)
    elif case == "read-only fid":
        o.write(1, 0, b"data")
    elif case == "count disagrees with size":
        o.chain([TWRITE.pack(27, 118, 1, FID, 0, 3), b"data"], [11])
    elif case == "larger than msize":
        ring.queue.set_msize(4096)
        o.write(1, 0, b"x" * 5000)
    elif case == "clunk":
        o.other(1)
    else:
        o.chain([TWRITE.pack(27, 118, 1, FID, 0, 4), b"data"], [8])
    _untouched(ring, path)
    assert ring.queue.direct_served == 0


def test_ring_order_holds_a_withdrawn_fid_back(ring: Ring, path: str) -> None:
    """Twrite, Tclunk, Twrite on one fid: the queue answers the first, hands out the clunk, and
    once the session withdraws the fid the second is the session's too (it would get EBADF)."""
    register(ring, path)
    o = Offer(ring)
    o.write(1, 0, b"one")
    o.other(2)
    o.write(3, 3, b"two")
    clunk = ring.queue.pop()
    assert clunk is not None and clunk.request[4] == 120
    assert ring.queue.direct_close(FID) is True
    late = ring.queue.pop()
    assert late is not None and late.request[4] == 118
    with open(path, "rb") as f:
        assert f.read() == b"one"
    clunk.complete(0)
    late.complete(0)


def test_a_failed_transfer_goes_to_the_session_once(ring: Ring, path: str) -> None:
    """An fd that cannot write (EBADF here): nothing is answered; the session gets the request
    and repeats the call to answer the error."""
    register(ring, path, READ | WRITE, mode=os.O_RDONLY)
    Offer(ring).write(1, 0, b"data")
    chain = ring.queue.pop()
    assert chain is not None and chain.request[4] == 118
    assert ring.used_idx() == 0 and ring.queue.direct_served == 0
    chain.complete(0)


def test_poll_answers_requests_while_it_spins() -> None:
    r = Ring(num=16, event_idx=True)
    path = f"/dev/shm/ninep-direct-{os.getpid()}"
    with open(path, "wb"):
        pass
    try:
        register(r, path)
        o = Offer(r)

        def driver() -> None:
            for i in range(3):
                time.sleep(0.02)
                o.write(i, 4 * i, b"%04d" % i)

        t = threading.Thread(target=driver)
        t.start()
        assert r.queue.poll(300_000_000) is False  # all three answered inside; then idle
        t.join()
        assert r.used_idx() == 3 and r.queue.direct_served == 3
        with open(path, "rb") as f:
            assert f.read() == b"000000010002"
        assert r.avail_event() == 3  # gave up: the next buffer must kick
    finally:
        r.queue.stop()
        r.close()
        os.unlink(path)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_fid_table_is_bounded_and_its_fds_closed(ring: Ring, path: str) -> None:
    before = _open_fds()
    for fid in range(64):
        register(ring, path, fid=fid)
    extra = os.open(path, os.O_RDONLY)
    assert ring.queue.direct_open(64, extra, READ) is False  # full: the fd stays the caller's
    os.close(extra)
    assert ring.queue.direct_fids == 64 and _open_fds() == before + 64
    assert ring.queue.direct_close(3) is True and ring.queue.direct_close(3) is False
    assert _open_fds() == before + 63
    ring.queue.stop()  # the ring stops (VMM reset, guest reboot): every direct fd goes
    assert ring.queue.direct_fids == 0 and _open_fds() == before


def test_the_latency_histogram_has_the_size_its_caller_gives(ring: Ring, path: str) -> None:
    """The bucket count is the metrics' (passed in), not the extension's: slow requests land in
    the last of however many buckets there are."""
    from transports.virtio._ext import VirtQueue

    for bad in (0, 66):
        with pytest.raises(ValueError, match="buckets"):
            VirtQueue(ring.table, 16, ring.uva(ring.desc), ring.uva(ring.avail), ring.uva(ring.used), buckets=bad)
    ring.queue.stop()
    ring.queue = VirtQueue(ring.table, 16, ring.uva(ring.desc), ring.uva(ring.avail), ring.uva(ring.used),
                           indirect=True, max_request=1 << 16, buckets=1)
    register(ring, path)
    Offer(ring).write(7, 0, b"x" * 100)
    assert ring.queue.pop() is None
    count, nbytes, _, buckets = ring.queue.direct_stats()[118]
    assert (count, nbytes, buckets) == (1, 100, [1])
