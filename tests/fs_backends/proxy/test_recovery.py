"""The helper dies (SIGKILL): pending requests answer EIO, the death is logged, a new helper
starts, new requests work, handles from before answer ESTALE, data I/O on files opened before
keeps working (it never needed the helper)."""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

import pytest
import trio

from fs_backends.base import Cred
from fs_backends.proxy import proxy_backend
from ninep.protocol import numbers as P

ROOT = Cred(0, 0, "root")


async def _until_gone(pid: int) -> None:
    with trio.fail_after(10):
        while True:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        return
            except FileNotFoundError:
                return
            await trio.sleep(0.01)


@pytest.mark.parametrize("victim", ["child", "outer"])
def test_sigkill_gives_eio_then_recovers(
    site: tuple[Path, Path], victim: str, caplog: pytest.LogCaptureFixture
) -> None:
    export, _ = site
    caplog.set_level(logging.INFO, logger="ninep.proxy")
    b = proxy_backend(str(export), "none")

    async def main() -> None:
        root = await b.attach("", ROOT)
        (n,) = await b.walk(root, ["file"])
        f = await b.open(n, P.L_O_RDWR, ROOT)
        d = await b.open(root, P.L_O_RDONLY, ROOT)
        old = (b.helper_pid, b.helper_child_pid)
        assert old[1] > 0
        # Freeze the helper so that a request is surely pending when it dies.
        os.kill(old[1], signal.SIGSTOP)
        results: list[int] = []

        async def pending() -> None:
            try:
                await b.getattr(n, P.GETATTR_ALL)
                results.append(0)
            except OSError as e:
                results.append(e.errno or 0)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(pending)
            await trio.sleep(0.3)
            assert results == []
            os.kill(old[1] if victim == "child" else old[0], signal.SIGKILL)
            if victim == "outer":
                # The child dies of PDEATHSIG's SIGKILL, which ends a stopped process too; resuming
                # it first would let it answer the pending requests before it goes.
                await _until_gone(old[1])
        assert results == [errno.EIO] * 3

        with trio.fail_after(30):
            while b.restarts < 1:
                await trio.sleep(0.05)
        assert (b.helper_pid, b.helper_child_pid) != old
        # New requests work against the new helper.
        root2 = await b.attach("", ROOT)
        (n2,) = await b.walk(root2, ["file"])
        assert n2.qid.path == n.qid.path
        assert (await b.getattr(n2, P.GETATTR_ALL)).size == len("inside\n")
        # Old handles are stale until released.
        for call in (b.getattr(n, P.GETATTR_ALL), b.walk(root, ["dir"]), b.readdir(d, 0, 10)):
            with pytest.raises(OSError) as e:
                await call
            assert e.value.errno == errno.ESTALE
        # The file opened before the crash still reads and writes: its fd is the file.
        assert await b.read(f, 0, 6) == b"inside"
        assert await b.write(f, 7, b"more") == 4
        await b.fsync(f, False)
        await b.close(f)
        await b.close(d)
        for node in (n, root, n2, root2):
            await b.release(node)
        await b.aclose()
        # Both helper processes are gone.
        for pid in old:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()

    trio.run(main)
    assert (export / "file").read_bytes() == b"inside\nmore"
    assert any("died" in r.getMessage() for r in caplog.records)
    assert any("restarted" in r.getMessage() for r in caplog.records)


def test_aclose_stops_the_helper(site: tuple[Path, Path]) -> None:
    b = proxy_backend(str(site[0]), "none")
    pids = (b.helper_pid, b.helper_child_pid)
    trio.run(b.aclose)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                assert "zombie" in fh.read()
        except FileNotFoundError:
            pass
