"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from ninep.client import Client, ClientError
from ninep.protocol.numbers import L_O_CREAT, L_O_RDWR, L_O_WRONLY
from tests.kits.harness import Connector


async def fails(errnos: int | tuple[int, ...], coro: Awaitable[Any]) -> ClientError:
    """Awaits `coro` and checks the server answered an error with one of `errnos`."""
    want = errnos if isinstance(errnos, tuple) else (errnos,)
    with pytest.raises(ClientError) as ei:
        await coro
    assert ei.value.errno in want, f"errno {ei.value.errno} ({ei.value}), expected one of {want}"
    return ei.value


@asynccontextmanager
async def raw_client(connect: Connector) -> AsyncIterator[Client]:
    """A Client whose reader runs but which has not sent Tversion yet."""
    channel = await connect()
    c = Client(channel)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c._reader)
            yield c
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()


async def make_file(c: Client, dfid: int, name: str, data: bytes = b"", mode: int = 0o644) -> None:
    f, _ = await c.walk(dfid, [])
    await c.lcreate(f, name, L_O_WRONLY | L_O_CREAT, mode)
    if data:
        await c.write_all(f, 0, data)
    await c.clunk(f)


async def open_rw(c: Client, dfid: int, path: list[str], flags: int = L_O_RDWR) -> int:
    f, _ = await c.walk(dfid, path)
    await c.lopen(f, flags)
    return f


async def names_in(c: Client, dfid: int, path: list[str] | None = None) -> set[str]:
    from ninep.protocol.numbers import L_O_DIRECTORY, L_O_RDONLY

    d, _ = await c.walk(dfid, path or [])
    try:
        await c.lopen(d, L_O_RDONLY | L_O_DIRECTORY)
        return {e[3] for e in await c.readdir_all(d)} - {".", ".."}
    finally:
        await c.clunk(d)
