"""Many requests in flight at once: more than the helper runs concurrently and more than the
socket buffers hold, so both sides must keep reading while they wait to send."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from fs_backends.base import Cred
from fs_backends.proxy import proxy_backend
from ninep.protocol import numbers as P

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


def test_a_close_racing_a_write_never_redirects_it_to_another_file(site: tuple[Path, Path]) -> None:
    """A client clunking a fid while its Twrite is still on a worker thread: the fd must stay
    open until the write is done, or its number goes to the next open and the data with it."""
    export, _ = site
    (export / "a").write_bytes(b"")
    (export / "b").write_bytes(b"b-untouched")
    for name in ("a", "b"):
        (export / name).chmod(0o666)  # the helper of the "none" model runs unprivileged
    b = proxy_backend(str(export), "none")

    async def main() -> None:
        root = await b.attach("", ROOT)
        (na,) = await b.walk(root, ["a"])
        (nb,) = await b.walk(root, ["b"])
        fa = await b.open(na, P.L_O_RDWR, ROOT)
        started, release = threading.Event(), threading.Event()

        def slow_pwrite(fd: int, offset: int) -> int:  # a zero-copy write from guest memory
            started.set()
            release.wait(10)
            return os.pwrite(fd, b"for-a", offset)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.write_from, fa, 0, slow_pwrite)
            await trio.to_thread.run_sync(started.wait, 10)
            await b.close(fa)  # the fid is clunked with its write in flight
            fb = await b.open(nb, P.L_O_RDWR, ROOT)  # would take fa's fd number if it were free
            release.set()
        with pytest.raises(OSError):
            await b.write(fa, 0, b"after close")  # the closed file takes no more writes
        assert (export / "a").read_bytes() == b"for-a"
        assert (export / "b").read_bytes() == b"b-untouched"
        assert fa.fd is None  # closed by the write that held it
        await b.close(fb)
        for n in (na, nb, root):
            await b.release(n)
        await b.aclose()

    trio.run(main)
