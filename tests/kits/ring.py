"""A hand-driven split virtqueue in a memfd, for unit tests of the compiled device side.

The test plays a (possibly hostile) driver: it writes descriptors and ring indices directly and
calls `VirtQueue.pop` / `Chain.complete` itself. Guest-physical addresses start at GPA_BASE and
the VMM-virtual addresses (used for the ring areas, as vhost-user does) at UVA_BASE.
"""

from __future__ import annotations

import mmap
import os
import struct

from transports.virtio._ext import MemTable, VirtQueue

GPA_BASE = 0x10_0000
UVA_BASE = 0x7F12_3400_0000
MEM_SIZE = 1 << 20
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4


class Ring:
    def __init__(self, num: int = 8, *, event_idx: bool = False, indirect: bool = True, max_request: int = 1 << 16) -> None:
        self.num = num
        self.fd = os.memfd_create("ringkit")
        os.ftruncate(self.fd, MEM_SIZE)
        self.mem = mmap.mmap(self.fd, MEM_SIZE)
        self.table = MemTable([(self.fd, GPA_BASE, MEM_SIZE, UVA_BASE, 0)])
        self.desc = GPA_BASE + 0x1000
        self.avail = GPA_BASE + 0x2000
        self.used = GPA_BASE + 0x3000
        self.data = GPA_BASE + 0x10000  # buffers from here on
        self.avail_idx = 0
        self.queue = VirtQueue(
            self.table,
            num,
            self.uva(self.desc),
            self.uva(self.avail),
            self.uva(self.used),
            event_idx=event_idx,
            indirect=indirect,
            max_request=max_request,
        )

    def uva(self, gpa: int) -> int:
        return gpa - GPA_BASE + UVA_BASE

    def off(self, gpa: int) -> int:
        assert GPA_BASE <= gpa < GPA_BASE + MEM_SIZE
        return gpa - GPA_BASE

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[self.off(gpa) : self.off(gpa) + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return self.mem[self.off(gpa) : self.off(gpa) + n]

    def put(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        DESC.pack_into(self.mem, self.off(base + 16 * i), addr, length, flags, nxt)

    def chain(self, *bufs: tuple[int, int, bool], start: int = 0, table: int | None = None) -> int:
        """Writes descriptors start.. for (addr, len, writable) buffers, linked in order."""
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.put(start + k, addr, length, (WRITE if writable else 0) | (0 if last else NEXT), 0 if last else start + k + 1, table)
        return start

    def offer(self, head: int) -> None:
        struct.pack_into("<H", self.mem, self.off(self.avail + 4 + 2 * (self.avail_idx % self.num)), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.mem, self.off(self.avail + 2), idx & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.mem, self.off(self.avail), flags)

    def set_used_event(self, idx: int) -> None:
        struct.pack_into("<H", self.mem, self.off(self.avail + 4 + 2 * self.num), idx)

    def avail_event(self) -> int:
        return int(struct.unpack_from("<H", self.mem, self.off(self.used + 4 + 8 * self.num))[0])

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.mem, self.off(self.used + 2))[0])

    def used_elem(self, i: int) -> tuple[int, int]:
        head, length = struct.unpack_from("<II", self.mem, self.off(self.used + 4 + 8 * (i % self.num)))
        return head, length

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)
