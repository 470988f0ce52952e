"""Out of host fds: with RLIMIT_NOFILE at 64, a client holds 10 000 fids walked and opened, and
every request succeeds, because the server reclaims idle fds (closing them and reopening on
next use, as QEMU does) instead of answering EMFILE. Both ways of reopening are covered: by file
handle (root, CAP_DAC_READ_SEARCH) and by name below the parent directory (without it, as for
an unprivileged server). Files unlinked or renamed while open keep working."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ninep.client import Client
from ninep.protocol.numbers import L_O_DIRECTORY, L_O_RDONLY, L_O_RDWR
from tests.kits.faults import REPO, fd_count, wait_for_socket

LIMIT = 64
NFIDS = 10_000
NFILES = 200


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@pytest.fixture(params=["handles", "names"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """`ninep serve` with RLIMIT_NOFILE 64 and without CAP_SYS_RESOURCE (so it cannot lift the
    limit); for "names" also without CAP_DAC_READ_SEARCH (no open_by_handle_at: how an
    unprivileged server runs)."""
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    for i in range(NFILES):
        (export / "sub" / f"f{i}").write_bytes(f"file {i}\n".encode())
    sock = tmp_path / "s.sock"
    drop = "-sys_resource" + (",-dac_read_search" if request.param == "names" else "")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["setpriv", "--inh-caps=-all", f"--bounding-set={drop}",
             sys.executable, "-m", "ninep", "serve", str(export),
             "--listen", f"unix:{sock}", "-v", "--max-fids", str(NFIDS + 100)],
            cwd=REPO, stdout=out, stderr=out, preexec_fn=_low_limit,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        wait_for_socket(sock, proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert any(line.startswith("Max open files") and f" {LIMIT} " in line for line in limits.splitlines())
        yield proc, sock, export
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print(log.read_text()[-2000:])


def test_ten_thousand_open_fids_under_a_limit_of_64(server: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, sock, export = server

    async def scenario() -> None:
        async with Client.connect(f"unix:{sock}") as c:
            root = await c.attach()
            fids: list[tuple[int, int]] = [(0, 0)] * NFIDS
            most = 0

            async def opener(start: int) -> None:
                nonlocal most
                for k in range(start, NFIDS, 32):
                    i = k % NFILES
                    f, _ = await c.walk(root, ["sub", f"f{i}"])
                    await c.lopen(f, L_O_RDWR)
                    fids[k] = (f, i)
                    most = max(most, fd_count(proc.pid))

            async with trio.open_nursery() as n:
                for s in range(32):
                    n.start_soon(opener, s)
            assert most <= LIMIT

            # Every one of them still reads, writes and says what it is.
            async def user(start: int) -> None:
                for k in range(start, NFIDS, 32):
                    f, i = fids[k]
                    want = f"file {i}\n".encode()
                    assert await c.read(f, 0, 100) == want
                    if k % 97 == 0:
                        await c.write(f, 0, want)  # same bytes: content stays checkable
                    assert (await c.getattr(f)).size == len(want)

            async with trio.open_nursery() as n:
                for s in range(32):
                    n.start_soon(user, s)

            # A file opened, then unlinked, then many other fds used: still readable.
            gone, _ = await c.walk(root, ["sub", "f0"])
            await c.lopen(gone, L_O_RDWR)
            await c.write(gone, 0, b"unlinked but open\n")
            d, _ = await c.walk(root, ["sub"])
            await c.unlinkat(d, "f0")
            # A file renamed while open, and a directory open for reading.
            moved, _ = await c.walk(root, ["sub", "f1"])
            await c.lopen(moved, L_O_RDONLY)
            await c.renameat(d, "f1", root, "renamed")
            dirf, _ = await c.walk(root, ["sub"])
            await c.lopen(dirf, L_O_RDONLY | L_O_DIRECTORY)
            for k in range(0, NFIDS, 7):  # churn: every fd gets reclaimed many times over
                f, i = fids[k]
                if i not in (0, 1):
                    assert await c.read(f, 0, 100) == f"file {i}\n".encode()
            assert await c.read(gone, 0, 100) == b"unlinked but open\n"
            assert await c.read(moved, 0, 100) == b"file 1\n"
            names = {e[3] for e in await c.readdir(dirf, 0, 1 << 16)}
            assert "f2" in names and "f0" not in names and "f1" not in names
            assert fd_count(proc.pid) <= LIMIT
            for f, _ in fids:
                await c.clunk(f)
        assert (export / "renamed").read_bytes() == b"file 1\n"
        assert not (export / "sub" / "f0").exists()

    trio.run(scenario)
    assert proc.poll() is None
