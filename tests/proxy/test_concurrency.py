"""Many requests in flight at once: more than the helper runs concurrently and more than the
socket buffers hold, so both sides must keep reading while they wait to send."""

from __future__ import annotations

from pathlib import Path

import trio

from fs_backends.base import Cred
from fs_backends.proxy import proxy_backend
from ninep import protocol as P

ROOT = Cred(0, 0, "root")


def test_hundreds_of_concurrent_requests(site: tuple[Path, Path]) -> None:
    export, _ = site
    for i in range(20):
        (export / f"f{i}").write_bytes(bytes([i]) * 5000)
    b = proxy_backend(str(export), "none")

    async def main() -> None:
        root = await b.attach("", ROOT)
        results: dict[tuple[int, int], bytes] = {}

        async def one(rep: int, i: int) -> None:
            (n,) = await b.walk(root, [f"f{i}"])
            await b.getattr(n, P.GETATTR_ALL)
            await b.xattr_list(n)
            f = await b.open(n, P.L_O_RDONLY, ROOT)
            results[rep, i] = await b.read(f, 0, 10000)
            await b.close(f)
            await b.release(n)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for rep in range(100):
                    for i in range(20):
                        nursery.start_soon(one, rep, i)
        assert len(results) == 2000
        assert all(v == bytes([i]) * 5000 for (_, i), v in results.items())
        await b.release(root)
        await b.aclose()

    trio.run(main)
