"""A backend call that never returns must not keep a dead connection, or the server, alive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from fs_backends.memory import MemoryBackend
from ninep.client import Client
from ninep.protocol import messages as m
from ninep.protocol.numbers import V9P2000_L
from ninep.server.session import SessionOptions
from tests.kits.harness import served


class WedgedGetattr(MemoryBackend):
    """getattr hangs forever, as a wedged remote server or proxy helper would."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.released = 0

    async def getattr(self, node: Any, mask: int) -> Any:
        self.entered.set()
        await trio.sleep_forever()

    async def release(self, node: Any) -> None:
        self.released += 1
        await super().release(node)


def test_connection_with_a_wedged_backend_call_is_reaped_after_the_grace_period(tmp_path: Path) -> None:
    backend = WedgedGetattr()

    async def scenario() -> None:
        options = SessionOptions(drain_seconds=0.5)
        async with served(backend, "unix", tmp_path, options) as (server, connect):
            channel = await connect()
            c = Client(channel)
            async with trio.open_nursery() as n:
                n.start_soon(c._reader)
                await c.version(65536, V9P2000_L)
                root = await c.attach()
                await c.walk(root, [])
                await channel.send(c.codec.encode(m.Tgetattr(root, 0x3FFF, tag=77)))
                await backend.entered.wait()
                # The client vanishes with the request outstanding (no flush).
                await channel.aclose()
                n.cancel_scope.cancel()
            with trio.fail_after(5):
                while server.sessions:
                    await trio.sleep(0.05)
            assert backend.released == 2, "both fids were clunked when the connection was reaped"

    trio.run(scenario)
