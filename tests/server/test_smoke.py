"""The shortest useful session on every transport and backend: attach, create, write, read back."""

from __future__ import annotations

from pathlib import Path

import trio

from ninep.protocol.numbers import L_O_RDONLY
from tests.kits.harness import client_for, served


def test_create_write_read_list(transport: str, make_backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with served(make_backend(), transport, tmp_path) as (_, connect), client_for(connect) as c:
            root = await c.attach()
            payload = bytes(range(256)) * 5000  # 1.28 MB: more than one message at msize 1 MiB
            await c.write_file(root, "hello.bin", payload)
            assert await c.read_file(root, "hello.bin") == payload
            d, _ = await c.walk(root, [])
            await c.lopen(d, L_O_RDONLY)
            names = sorted(e[3] for e in await c.readdir_all(d))
            assert names == [".", "..", "hello.bin"]

    trio.run(scenario)
