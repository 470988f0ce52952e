"""A client killed (SIGKILL) mid-read, mid-write (a large Twrite partly sent) and while holding a
lock another client waits for: the server lets go of its fids and fds (its /proc fd count goes
back to where it was) and of the lock (the waiting client gets it) within about a second, and a
client connected alongside keeps working throughout without an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ninep.client import Client
from ninep.protocol.numbers import (
    GETATTR_ALL,
    L_O_RDWR,
    LOCK_FLAGS_BLOCK,
    LOCK_SUCCESS,
    LOCK_TYPE_UNLCK,
    LOCK_TYPE_WRLCK,
)
from tests.kits.faults import REPO, fd_count, serve

NFILES = 64
#: What the tests check; the issue asks for one second, the machine is shared and loaded.
RELEASE_BOUND = 5.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    export = tmp_path / "export"
    export.mkdir()
    for i in range(4):
        (export / f"f{i}").write_bytes(b"data" * 100)
    (export / "big").write_bytes(os.urandom(4 << 20))
    (export / "lockfile").write_bytes(b"")
    sock = tmp_path / "s.sock"
    proc = serve(export, sock, "--msize", "2M", log=tmp_path / "server.log")
    try:
        yield proc, sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _victim(sock: Path, mode: str) -> subprocess.Popen[str]:
    v = subprocess.Popen(
        [sys.executable, "-m", "tests.faults._victim", str(sock), mode, str(NFILES)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert v.stdout is not None
    line = v.stdout.readline()
    assert line.strip() == "ready", f"victim said {line!r}, exit {v.poll()}"
    return v


async def _until(cond: object, bound: float) -> float:
    t0 = time.monotonic()
    with trio.fail_after(bound):
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["read", "write"])
def test_killed_client_releases_fids_and_fds(server: tuple[subprocess.Popen[bytes], Path], mode: str) -> None:
    proc, sock = server

    async def scenario() -> None:
        async with Client.connect(f"unix:{sock}") as witness:
            root = await witness.attach()
            f, _ = await witness.walk(root, ["f0"])
            await witness.lopen(f, L_O_RDWR)
            ops = 0

            async def keep_working() -> None:
                nonlocal ops
                while True:  # any error here fails the test
                    await witness.getattr(f, GETATTR_ALL)
                    assert await witness.read(f, 0, 4) == b"data"
                    ops += 1
                    await trio.sleep(0.005)

            async with trio.open_nursery() as n:
                n.start_soon(keep_working)
                await trio.sleep(0.1)
                baseline = fd_count(proc.pid)
                victim = await trio.to_thread.run_sync(_victim, sock, mode)
                held = fd_count(proc.pid)
                assert held >= baseline + NFILES, (baseline, held)
                before = ops
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                took = await _until(lambda: fd_count(proc.pid) <= baseline, RELEASE_BOUND)
                print(f"{mode}: {held - baseline} server fds released {took * 1000:.0f} ms after SIGKILL")
                await _until(lambda: ops > before + 5, RELEASE_BOUND)
                n.cancel_scope.cancel()
            # Still serving new connections too.
            async with Client.connect(f"unix:{sock}") as c:
                await c.getattr(await c.attach())
        assert proc.poll() is None

    trio.run(scenario)


def test_killed_lock_holder_hands_the_lock_to_the_waiter(server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = server

    async def scenario() -> None:
        async with Client.connect(f"unix:{sock}") as waiter, Client.connect(f"unix:{sock}") as witness:
            wroot = await waiter.attach()
            lf, _ = await waiter.walk(wroot, ["lockfile"])
            await waiter.lopen(lf, L_O_RDWR)
            sroot = await witness.attach()
            baseline = fd_count(proc.pid)
            victim = await trio.to_thread.run_sync(_victim, sock, "lock")
            got: list[float] = []

            async def wait_for_lock() -> None:
                status = await waiter.lock(lf, LOCK_TYPE_WRLCK, flags=LOCK_FLAGS_BLOCK, client_id="waiter")
                assert status == LOCK_SUCCESS
                got.append(time.monotonic())

            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    n.start_soon(wait_for_lock)
                    await trio.sleep(0.5)
                    assert not got, "the lock was granted while the victim held it"
                    for _ in range(10):  # the lock wait blocks nobody else
                        await witness.getattr(sroot)
                    killed = time.monotonic()
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
            took = got[0] - killed
            print(f"lock: waiter got the lock {took * 1000:.0f} ms after SIGKILL")
            assert took < RELEASE_BOUND
            await _until(lambda: fd_count(proc.pid) <= baseline + 1, RELEASE_BOUND)  # + the waiter's lock fd
            await waiter.lock(lf, LOCK_TYPE_UNLCK, client_id="waiter")
            await witness.getattr(sroot)

    trio.run(scenario)
