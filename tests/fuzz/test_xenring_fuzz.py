"""Fuzzing the compiled Xen 9pfs data ring (transports/ring/xen.c) and grant mapping as a hostile
frontend.

tests/transports/xen/test_datapath.py fuzzes take/put on an order-1 ring starting at index 0; tests/xen's
handshake and hostile suites cover ring orders and grant refs the backend must refuse. This adds:
every ring order, indices that start near the 2^32 wrap, the whole API (take, put, put_pread
staged or published, publish, free_space, has_input, peek) interleaved with hostile writes of
the peer's indices, of our own indices (which the ring must ignore) and of ring bytes; random
grant ref lists; and a second *process* flipping the peer's indices and the message headers while
the backend reads. Invariants: only XenRingError (the ring is then broken for good), ValueError
for a message that cannot fit, RuntimeError for misuse; messages come out framed by their first
size; the backend writes nothing but its producer half and its own two indices; a fresh ring on
clean memory works. Run under ASan/UBSan by test_sanitized.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hypothesis.strategies as hs
from hypothesis import given

from tests.fuzz.budget import examples, fuzz_settings
from transports.xen._ext import ring_ext

IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 0, 4, 64, 68
R = ring_ext()


class Shared:
    """An interface page and a data area of 2^order pages in one memfd (shareable with a child)."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.size = 1 << (order + 11)
        self.fd = os.memfd_create("xenring-fuzz")
        os.ftruncate(self.fd, 4096 + 2 * self.size)
        self.intf_map = mmap.mmap(self.fd, 4096)
        self.data_map = mmap.mmap(self.fd, 2 * self.size, offset=4096)
        self.intf, self.data = memoryview(self.intf_map), memoryview(self.data_map)

    def ring(self, frontend: bool = False) -> Any:
        return R.XenRing(self.intf, self.data, self.order, frontend)

    def idx(self, off: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.intf, off, value & 0xFFFFFFFF)
        return int(struct.unpack_from("<I", self.intf, off)[0])

    def close(self) -> None:
        self.intf.release()
        self.data.release()
        self.intf_map.close()
        self.data_map.close()
        os.close(self.fd)


@contextmanager
def _closing(ring: Any) -> Iterator[Any]:
    try:
        yield ring
    finally:
        ring.close()


def frame(size: int, tag: int = 1, fill: int = 0x61) -> bytes:
    body = bytes([fill]) * max(size - 7, 0)
    return struct.pack("<IBH", size, 100, tag) + body


_u32 = hs.one_of(hs.integers(0, 3 * 4096), hs.integers(0, 2**32 - 1),
                 hs.sampled_from([2**32 - 1, 2**32 - 7, 2**31]))
_op = hs.one_of(
    hs.tuples(hs.just("take"), hs.sampled_from([0, 6, 7, 100, 4096, 1 << 20])),
    hs.tuples(hs.just("put"), hs.lists(hs.integers(0, 3000), max_size=4)),
    hs.tuples(hs.just("put_pread"), hs.integers(0, 0x3000), hs.booleans(), hs.booleans()),
    hs.tuples(hs.just("publish")),
    hs.tuples(hs.just("query")),
    hs.tuples(hs.just("peer_prod"), _u32),  # frontend's producer index, absolute
    hs.tuples(hs.just("peer_prod_rel"), hs.integers(-16, 5000)),  # relative to our consumer
    hs.tuples(hs.just("peer_cons"), _u32),
    hs.tuples(hs.just("own_idx"), hs.sampled_from([IN_PROD, OUT_CONS]), _u32),
    hs.tuples(hs.just("message"), hs.integers(0, 1 << 22), hs.sampled_from([0, 1, 6, 7, 8, 64, 2048, 4096, 2**32 - 1])),
    hs.tuples(hs.just("scribble"), hs.integers(0, 1 << 22), hs.binary(min_size=1, max_size=32)),
)


def drive(order: int, start: int, ops: list[tuple[Any, ...]]) -> None:
    sh = Shared(order)
    size = sh.size
    try:
        for off in (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD):
            sh.idx(off, start)
        back = sh.ring()
        err = R.XenRingError
        with tempfile.TemporaryFile() as f, _closing(back):
            f.write(os.urandom(0x3000))
            f.flush()
            staged = False  # a put_pread(publish=False) waits for publish()
            for op in ops:
                kind = op[0]
                # Frontend-side writes: the backend must cope, and never rely on its own indices
                # as they appear in shared memory.
                if kind == "peer_prod":
                    sh.idx(OUT_PROD, op[1])
                    continue
                if kind == "peer_prod_rel":
                    sh.idx(OUT_PROD, back.indices[0] + op[1])
                    continue
                if kind == "peer_cons":
                    sh.idx(IN_CONS, op[1])
                    continue
                if kind == "own_idx":
                    sh.idx(op[1], op[2])
                    continue
                if kind == "message":
                    pos = size + (back.indices[0] + op[1]) % size
                    hdr = struct.pack("<I", op[2])
                    for k in range(4):  # the header may straddle the wrap
                        sh.data[size + (pos - size + k) % size] = hdr[k]
                    continue
                if kind == "scribble":
                    pos = op[1] % (2 * size)
                    sh.data[pos : pos + len(op[2])] = op[2][: 2 * size - pos]
                    continue
                before_data = bytes(sh.data[size:])
                before_intf = bytes(sh.intf)
                try:
                    if kind == "take":
                        m = back.take(op[1])
                        if m is not None:
                            n = struct.unpack_from("<I", m)[0]
                            assert 7 <= n == len(m) <= min(op[1], size)
                    elif kind == "put":
                        parts = [b"p" * n for n in op[1]]
                        total = sum(op[1])
                        try:
                            ok = back.put(parts)
                        except RuntimeError:
                            assert staged, "put refused with nothing staged"
                            continue
                        except err:
                            raise
                        except ValueError:  # (XenRingError is a ValueError too)
                            assert total < 7 or total > size
                        else:
                            assert isinstance(ok, bool)
                    elif kind == "put_pread":
                        try:
                            got = back.put_pread(9, f.fileno(), 0, op[1], op[2], op[3])
                            staged = staged or (got is not None and not op[2])
                        except BlockingIOError:
                            pass  # nowait and nothing cached
                        except err:
                            raise
                        except ValueError:
                            assert 11 + op[1] > size
                        except RuntimeError:
                            assert staged, "put_pread refused with nothing staged"
                    elif kind == "publish":
                        try:
                            back.publish()
                            staged = False
                        except RuntimeError:
                            assert not staged, "publish refused a staged message"
                    elif kind == "query":
                        back.peek()
                        assert isinstance(back.has_input(), bool)
                        assert 0 <= back.free_space() <= size
                except err:
                    assert back.broken
                    for again in (lambda: back.take(4096), lambda: back.put([frame(7)]), back.free_space):
                        try:
                            again()
                        except err:
                            pass
                        else:
                            raise AssertionError("a broken ring worked again") from None
                    break
                # The backend only ever writes its producer half and its own two indices.
                assert bytes(sh.data[size:]) == before_data, "the backend wrote into the request half"
                after_intf = bytearray(sh.intf)
                after_intf[OUT_CONS : OUT_CONS + 4] = before_intf[OUT_CONS : OUT_CONS + 4]
                after_intf[IN_PROD : IN_PROD + 4] = before_intf[IN_PROD : IN_PROD + 4]
                assert bytes(after_intf) == before_intf, "the backend wrote the peer's part of the page"
    finally:
        sh.close()
    fresh_ring_works(order)


def fresh_ring_works(order: int) -> None:
    sh = Shared(order)
    try:
        back, front = sh.ring(), sh.ring(frontend=True)
        assert front.put([frame(20, 5)])
        got = back.take(4096)
        assert got == frame(20, 5)
        assert back.put([frame(9, 6)])
        assert front.take(4096) == frame(9, 6)
        back.close()
        front.close()
    finally:
        sh.close()


@fuzz_settings(300)
@given(hs.integers(1, 9), hs.sampled_from([0, 2**32 - 8, 2**32 - 4096, 12345]), hs.lists(_op, max_size=24))
def test_xen_ring_survives_any_frontend(order: int, start: int, ops: list[tuple[Any, ...]]) -> None:
    drive(order, start, ops)


@fuzz_settings(200)
@given(hs.lists(hs.integers(-5, 70) | hs.sampled_from([2**32, 2**64 - 1, 2**64, -(2**63)]), max_size=8))
def test_grant_refs_out_of_range_are_refused(refs: list[int]) -> None:
    fd = os.memfd_create("grants")
    try:
        os.ftruncate(fd, 64 * 4096)
        try:
            gm = R.xen_map_grants(fd, refs)
        except (ValueError, OverflowError):
            assert not refs or any(r < 0 or r >= 64 for r in refs)
            return
        assert refs and all(0 <= r < 64 for r in refs)
        view = memoryview(gm)
        assert len(view) == 4096 * len(refs)
        view[0] = 1  # mapped and writable
        view.release()
        gm.close()
    finally:
        os.close(fd)


# --- a frontend that moves its indices while the backend reads -------------------------------------


def _flipper(sh: Shared, seed: int) -> None:
    """Child process: publishes messages and moves the producer index backwards, past the ring,
    and the header of the message being read, in a tight loop."""
    rnd = random.Random(seed)
    size = sh.size
    while True:
        cons = sh.idx(OUT_CONS)
        r = rnd.random()
        if r < 0.9:
            n = rnd.choice([7, 20, 100, size // 2])
            msg = frame(n, fill=rnd.randrange(256))
            for k in range(0, n, 512):  # ring bytes, wrapping
                chunk = msg[k : k + 512]
                p = (cons + k) % size
                first = min(len(chunk), size - p)
                sh.data[size + p : size + p + first] = chunk[:first]
                sh.data[size : size + len(chunk) - first] = chunk[first:]
            sh.idx(OUT_PROD, cons + n)
        elif r < 0.95:
            struct.pack_into("<I", sh.data, size + cons % (size - 4), rnd.choice([0, 6, size + 1, 2**32 - 1, 50]))
        else:
            sh.idx(OUT_PROD, cons + rnd.choice([-1, size + 1, 2**31, 3, 7]))
        sh.idx(IN_CONS, sh.idx(IN_PROD) - (rnd.choice([1, 2**31]) if rnd.random() < 0.02 else 0))


def test_xen_ring_survives_indices_moving_while_it_reads() -> None:
    sh = Shared(1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            _flipper(sh, 1)
        finally:
            os._exit(0)
    took = 0
    try:
        err = R.XenRingError
        rounds = examples(300)
        for n in range(rounds * 20):
            if n >= rounds and took:
                break
            sh.idx(OUT_CONS, sh.idx(OUT_PROD))
            back = sh.ring()
            for _ in range(200):
                try:
                    m = back.take(4096)
                    if m is not None:
                        took += 1
                        n = struct.unpack_from("<I", m)[0]
                        assert 7 <= n == len(m) <= 4096
                    back.put([frame(7)])
                except err:
                    assert back.broken
                    break
            back.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        sh.close()
    assert took > 0, "the race never let a message through: it tests nothing"
    fresh_ring_works(1)


@fuzz_settings(200)
@given(hs.integers(0, 12) | hs.sampled_from([2**31, 2**32 - 1]), hs.integers(0, 3), hs.integers(0, 5000), hs.booleans())
def test_ring_order_and_area_sizes_out_of_range_are_refused(order: int, pages: int, intf_len: int, frontend: bool) -> None:
    """Orders past the maximum (or 0), data areas smaller than 2^order pages and short interface
    pages are refused at construction; nothing else comes out."""
    data = bytearray(pages * 4096 * 2)
    intf = bytearray(intf_len)
    try:
        ring = R.XenRing(intf, data, order, frontend)
    except (ValueError, OverflowError):
        assert not (1 <= order <= 9 and intf_len >= 4096 and len(data) >= 2 << (order + 11))
        return
    assert 1 <= order <= 9 and intf_len >= 4096 and len(data) >= 2 << (order + 11)
    assert ring.size == 1 << (order + 11)
    ring.close()
