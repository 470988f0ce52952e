"""The server is killed (SIGKILL) during a write workload and restarted on the same export: every
block whose write was followed by an answered Tfsync is on disk, as the client's log of
checksums says."""

from __future__ import annotations

import hashlib
import os
import random
import signal
from pathlib import Path

import trio

from ninep.client import Client
from ninep.protocol.numbers import L_O_CREAT, L_O_RDONLY, L_O_RDWR
from tests.kits.faults import serve

BLOCK = 64 * 1024
WRITERS = 4


def test_every_fsynced_write_survives_sigkill(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    sock = tmp_path / "s.sock"
    proc = serve(export, sock, log=tmp_path / "server.log")
    #: The client's log: (file, offset, sha256) of blocks written and then fsynced (Rfsync seen).
    synced: list[tuple[str, int, str]] = []
    written = 0

    async def writer(c: Client, root: int, i: int) -> None:
        nonlocal written
        f, _ = await c.walk(root, [])
        name = f"w{i}"
        await c.lcreate(f, name, L_O_RDWR | L_O_CREAT, 0o644)
        pending: list[tuple[str, int, str]] = []
        off = 0
        while True:
            data = random.randbytes(BLOCK)
            await c.write_all(f, off, data)
            written += 1
            pending.append((name, off, hashlib.sha256(data).hexdigest()))
            off += BLOCK
            if len(pending) == 3:
                await c.fsync(f)
                synced.extend(pending)
                pending.clear()

    async def workload() -> None:
        try:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                async with trio.open_nursery() as n:
                    for i in range(WRITERS):
                        n.start_soon(writer, c, root, i)

                    async def killer() -> None:
                        while len(synced) < 60:
                            await trio.sleep(0.01)
                        proc.send_signal(signal.SIGKILL)

                    n.start_soon(killer)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection dies with the server: expected

    trio.run(workload)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert len(synced) >= 60 and written > len(synced)
    print(f"{len(synced)} fsynced blocks of {written} written when the server was killed")

    sock.unlink()  # left behind by the killed server; its reappearance says the new one listens
    proc = serve(export, sock, log=tmp_path / "server.log")
    try:

        async def verify() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                fids: dict[str, int] = {}
                for name, off, digest in synced:
                    if name not in fids:
                        fids[name], _ = await c.walk(root, [name])
                        await c.lopen(fids[name], L_O_RDONLY)
                    got = await c.read_all(fids[name], off, BLOCK)
                    assert hashlib.sha256(got).hexdigest() == digest, (name, off)

        trio.run(verify)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # And straight from the disk.
    for name, off, digest in synced:
        with open(export / name, "rb") as fh:
            fh.seek(off)
            assert hashlib.sha256(fh.read(BLOCK)).hexdigest() == digest
    assert os.path.getsize(export / "w0") >= BLOCK
