"""The real 9P server and client talking through the vhost-user back-end and the Frontend.

(The core end-to-end suite runs over the Frontend too, through its transport fixture; this is
the virtio suite's own check that the pieces fit, including the zero-copy read layouts.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fs_backends.memory import MemoryBackend
from ninep.client import Client
from ninep.server.server import Server
from tests.kits.processes import wait_for_socket
from tests.kits.virtio import local_client, serving
from transports.options import ConnectOptions
from transports.virtio import connect_address

pytestmark = pytest.mark.timeout(60)


def test_server_and_client_over_vhost_user() -> None:
    async def main() -> None:
        server = Server(MemoryBackend())
        async with serving(server.handle, max_msize=512 * 1024) as (path, _):
            channel = await connect_address("vhost-user:" + path, ConnectOptions(max_msize=512 * 1024))
            async with Client.connect(channel, msize=512 * 1024) as c:
                assert c.msize == 512 * 1024
                root = await c.attach()
                data = os.urandom(1_500_000)
                await c.write_file(root, "big", data)  # zero-copy Twrite layout
                assert await c.read_file(root, "big") == data  # zero-copy Tread layout
                for i in range(40):
                    await c.mkdir(root, f"d{i}")
                dfid, _ = await c.walk(root, [])
                await c.lopen(dfid, 0)
                names = {e[3] for e in await c.readdir_all(dfid)}
                assert {f"d{i}" for i in range(40)} | {"big"} <= names
                # Many requests in flight at once on the one queue.
                async with trio.open_nursery() as n:
                    for _ in range(100):
                        n.start_soon(c.getattr, root)

    trio.run(main)


def test_local_backend_reads_go_straight_into_guest_buffers(tmp_path) -> None:  # noqa: ANN001
    data = os.urandom(700_000)
    (tmp_path / "f").write_bytes(data)

    async def main() -> None:
        async with local_client(tmp_path) as (c, root, listener, _):
            assert await c.read_file(root, "f") == data
            queue_channel = listener.devices[0].vrings[0].channel
            assert queue_channel is not None and queue_channel.zero_copy_reads >= 2

    trio.run(main)


def test_local_backend_writes_come_straight_from_guest_buffers(tmp_path) -> None:  # noqa: ANN001
    data = os.urandom(1_300_000)
    value = os.urandom(3000)

    async def main() -> None:
        async with local_client(tmp_path) as (c, root, listener, _):
            await c.write_file(root, "f", data)
            queue_channel = listener.devices[0].vrings[0].channel
            assert queue_channel is not None and queue_channel.zero_copy_writes >= 3
            # Overwrite in the middle, unaligned, and past the end.
            async with await c.open_file(root, "f", 2) as f:  # L_O_RDWR
                assert await c.write_all(f.fid, 12_345, data[:200_000]) == 200_000
                assert await c.write_all(f.fid, len(data) + 10, b"t" * 5000) == 5000
            # An xattr value large enough for the zero-copy layout lands whole.
            fid, _ = await c.walk(root, ["f"])
            await c.xattr_set(fid, "user.big", value)
            assert await c.xattr_get(fid, "user.big") == value
        want = bytearray(data)
        want[12_345 : 12_345 + 200_000] = data[:200_000]
        want += bytes(10) + b"t" * 5000
        assert (tmp_path / "f").read_bytes() == bytes(want)

    trio.run(main)


def test_a_server_in_another_process_never_sees_a_torn_ring_index(tmp_path: Path) -> None:
    """The Frontend publishes ring indices while the back-end, in its own process, reads them:
    every store must be whole (a transient 0 in avail.idx broke the queue after a few thousand
    requests with 4 or more in flight)."""
    import subprocess
    import sys

    sock = tmp_path / "vu.sock"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ninep", "serve", str(tmp_path), "--listen",
                                 f"vhost-user:{sock}", "--security-model", "none"],
                                cwd=Path(__file__).resolve().parents[3], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock, proc, 20, log)

        async def main() -> None:
            channel = await connect_address(f"vhost-user:{sock}", ConnectOptions(max_msize=65536))
            async with Client.connect(channel, msize=65536) as c:
                root = await c.attach()
                left = 12_000

                async def worker() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await c.getattr(root)

                with trio.fail_after(45):
                    async with trio.open_nursery() as n:
                        for _ in range(16):
                            n.start_soon(worker)

        trio.run(main)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "broken" not in log.read_text()
