"""Configurable limits: each one, when hit, gives the client a clear outcome (an errno, or a
connection that slows down instead of failing) and the server a log line; the server keeps
serving the others."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from fs_backends.memory import MemoryBackend
from ninep.client import Client
from ninep.protocol.numbers import GETATTR_ALL, L_O_RDONLY
from ninep.server.session import SessionOptions
from tests.kits.e2e import fails, make_file
from tests.kits.faults import REPO, version_error, wait_for_socket
from tests.kits.harness import client_for, served
from transports.address import connect_address
from transports.options import ConnectOptions


class GatedBackend(MemoryBackend):
    """getattr and read wait at a gate; counts how many wait there at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.inside = 0
        self.most_inside = 0

    async def _wait(self) -> None:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await self.gate.wait()
        finally:
            self.inside -= 1

    async def getattr(self, node: Any, mask: int) -> Any:
        await self._wait()
        return await super().getattr(node, mask)

    async def read(self, f: Any, offset: int, count: int) -> bytes:
        await self._wait()
        return await super().read(f, offset, count)


def test_max_connections_refuses_the_next_with_eusers_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ninep.server")

    async def scenario() -> None:
        async with served(MemoryBackend(), "unix", tmp_path, SessionOptions(max_connections=2)) as (server, connect):
            async with client_for(connect) as a, client_for(connect) as b:  # noqa: SIM117 (code follows)
                assert await version_error(await connect()) == errno.EUSERS
                assert server.refused == 1
                # The two served connections never noticed.
                for c in (a, b):
                    root = await c.attach()
                    await c.getattr(root)
            # Once they are gone, new connections are served again.
            with trio.fail_after(10):
                while server.sessions:
                    await trio.sleep(0.02)
            async with client_for(connect) as c:
                await c.getattr(await c.attach())
        assert any("max-connections 2 reached" in r.getMessage() for r in caplog.records)

    trio.run(scenario)


def test_max_fids_answers_emfile_and_frees_on_clunk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ninep.session")

    async def scenario() -> None:
        async with (
            served(MemoryBackend(), "unix", tmp_path, SessionOptions(max_fids=4)) as (_, connect),
            client_for(connect) as c,
            client_for(connect) as other,
        ):
            root = await c.attach()
            fids = [(await c.walk(root, []))[0] for _ in range(3)]
            await fails(errno.EMFILE, c.walk(root, []))
            # The limit is per connection: another one is unaffected.
            oroot = await other.attach()
            await other.walk(oroot, [])
            await c.clunk(fids[0])
            await c.walk(root, [])
        assert any("fid limit 4 reached" in r.getMessage() for r in caplog.records)

    trio.run(scenario)


def test_max_inflight_stops_reading_and_every_request_is_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ninep.session")
    backend = GatedBackend()

    async def scenario() -> None:
        async with (
            served(backend, "unix", tmp_path, SessionOptions(max_inflight=3)) as (_, connect),
            client_for(connect) as c,
        ):
            root = await c.attach()
            done: list[int] = []

            async def one() -> None:
                await c.getattr(root, GETATTR_ALL)
                done.append(1)

            async with trio.open_nursery() as n:
                for _ in range(20):
                    n.start_soon(one)
                with trio.fail_after(10):
                    while backend.inside < 3:
                        await trio.sleep(0.01)
                await trio.sleep(0.2)  # time for a fourth to get in, were the limit broken
                assert backend.inside == 3
                backend.gate.set()
            assert len(done) == 20
            assert backend.most_inside == 3
        assert any("max-inflight 3 reached" in r.getMessage() for r in caplog.records)

    trio.run(scenario)


def test_max_conn_memory_applies_backpressure_and_every_read_is_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ninep.limits")
    backend = GatedBackend()
    count = 32 * 1024
    # Room for two 32 KiB reads in flight (each costs its request plus count + header), not three.
    limit = 3 * count - 1

    async def scenario() -> None:
        options = SessionOptions(max_conn_memory=limit, max_msize=1 << 20)
        async with served(backend, "unix", tmp_path, options) as (server, connect), client_for(connect) as c:
            root = await c.attach()
            await make_file(c, root, "f", os.urandom(count))
            f, _ = await c.walk(root, ["f"])
            await c.lopen(f, L_O_RDONLY)
            got: list[bytes] = []

            async def one() -> None:
                got.append(await c.read(f, 0, count))

            async with trio.open_nursery() as n:
                for _ in range(10):
                    n.start_soon(one)
                with trio.fail_after(10):
                    while backend.inside < 2:
                        await trio.sleep(0.01)
                await trio.sleep(0.2)
                assert backend.inside == 2
                (session,) = server.sessions
                assert session._memory.used <= limit
                backend.gate.set()
            assert len(got) == 10 and all(len(b) == count for b in got)
            assert session._memory.peak <= limit
            # A single request bigger than the whole budget is still served (never wedged).
            assert len(await c.read(f, 0, count)) == count
        assert any("max-conn-memory" in r.getMessage() for r in caplog.records)

    trio.run(scenario)


def test_cli_limits_reach_the_server(tmp_path: Path) -> None:
    """`ninep serve --max-connections 1 --max-fids 2`: the second connection is refused with a
    log line on stderr, the first one's third fid answers EMFILE."""
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ninep", "serve", "memory:", "--listen", f"unix:{sock}",
         "--max-connections", "1", "--max-fids", "2", "--max-inflight", "8", "--max-conn-memory", "4M"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_socket(sock, proc)

        async def scenario() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                await c.walk(root, [])
                await fails(errno.EMFILE, c.walk(root, []))
                assert await version_error(await connect_address(f"unix:{sock}", ConnectOptions())) == errno.EUSERS

        trio.run(scenario)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "max-connections 1 reached" in err
