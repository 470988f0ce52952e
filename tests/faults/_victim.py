"""A 9P client meant to be killed: `python -m tests.faults._victim SOCK MODE NFILES`.

It opens NFILES files (walk + lopen, one fid and one server fd each), then, by MODE:
- `read`: keeps 16 reads of 64 KiB in flight forever;
- `write`: sends the start of a 1 MiB Twrite and never the rest (the server holds a part message);
- `lock`: takes a write lock on `lockfile` and keeps it.
It prints `ready` once in that state; the test then kills it with SIGKILL.
"""

from __future__ import annotations

import struct
import sys

import trio

from ninep.client import Client
from ninep.protocol.numbers import L_O_RDWR, LOCK_SUCCESS, LOCK_TYPE_WRLCK, T


async def main(sock: str, mode: str, nfiles: int) -> None:
    async with Client.connect(f"unix:{sock}", msize=2 << 20) as c:
        root = await c.attach()
        for i in range(nfiles):
            f, _ = await c.walk(root, [f"f{i % 4}"])
            await c.lopen(f, L_O_RDWR)
        if mode == "read":
            f, _ = await c.walk(root, ["big"])
            await c.lopen(f, L_O_RDWR)

            async def reader() -> None:
                while True:
                    await c.read(f, 0, 64 * 1024)

            async with trio.open_nursery() as n:
                for _ in range(16):
                    n.start_soon(reader)
                await c.read(f, 0, 1)
                print("ready", flush=True)
        elif mode == "write":
            f, _ = await c.walk(root, ["big"])
            await c.lopen(f, L_O_RDWR)
            count = 1 << 20
            # size[4] type[1] tag[2] fid[4] offset[8] count[4] data[count]: only a third is sent.
            head = struct.pack("<IBHIQI", 4 + 1 + 2 + 4 + 8 + 4 + count, T.Twrite, 7, f, 0, count)
            await c.channel.send([head, b"x" * (count // 3)])
            print("ready", flush=True)
            await trio.sleep_forever()
        elif mode == "lock":
            f, _ = await c.walk(root, ["lockfile"])
            await c.lopen(f, L_O_RDWR)
            assert await c.lock(f, LOCK_TYPE_WRLCK, client_id="victim") == LOCK_SUCCESS
            print("ready", flush=True)
            await trio.sleep_forever()
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
