"""Direct I/O as the session uses it: which fids it registers, that a clunked fid is never served
again, that errors are the session's to answer, and that the metrics count what the queue served."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from fs_backends.local import LocalBackend
from ninep.client import Client
from ninep.protocol.numbers import L_O_RDONLY, L_O_RDWR, L_O_WRONLY
from ninep.server.policy import OperationPolicy
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from tests.kits.virtio import local_client, serving
from transports.options import ConnectOptions
from transports.virtio import connect_address

pytestmark = pytest.mark.timeout(60)

O_PATH = 0o10000000


def _queue(listener):  # noqa: ANN001, ANN202
    return listener.devices[0].vrings[0].queue


def test_reads_and_writes_on_open_files_are_served_by_the_queue_and_counted(tmp_path: Path) -> None:
    data = os.urandom(1_300_000)

    async def main() -> None:
        async with local_client(tmp_path) as (c, root, listener, server):
            await c.write_file(root, "f", data)  # Tlcreate, then three 9P writes
            assert await c.read_file(root, "f") == data
            q = _queue(listener)
            assert q.direct_served >= 6
            assert q.direct_fids == 0  # both files were clunked: nothing stays registered
            snap = server.metrics.snapshot()
            (conn,) = snap["connections"]
            assert conn["ops"]["write"]["count"] >= 3 and conn["ops"]["read"]["count"] >= 3
            assert conn["bytes"] == {"in": len(data), "out": len(data)}
        assert (tmp_path / "f").read_bytes() == data

    trio.run(main)


def test_a_clunked_fid_number_reused_for_another_file_never_reaches_the_old_one(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "b").write_bytes(b"")

    async def main() -> None:
        async with local_client(tmp_path) as (c, root, listener, _):
            fid = c.new_fid()
            await c.walk(root, ["a"], newfid=fid)
            await c.lopen(fid, L_O_RDWR)
            assert await c.write(fid, 0, b"first") == 5
            await c.clunk(fid)
            with pytest.raises(OSError) as e:
                await c.write(fid, 5, b"late")  # the fid is gone, even for the queue
            assert e.value.errno == errno.EBADF
            await c.walk(root, ["b"], newfid=fid)
            await c.lopen(fid, L_O_RDWR)
            assert await c.write(fid, 0, b"second") == 6
            assert _queue(listener).direct_served >= 2
        assert (tmp_path / "a").read_bytes() == b"first"
        assert (tmp_path / "b").read_bytes() == b"second"

    trio.run(main)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "no-direct-io"])
def test_errors_are_the_sessions_to_answer_and_the_same_either_way(tmp_path: Path, direct: bool) -> None:
    (tmp_path / "f").write_bytes(b"content")

    async def main() -> None:
        async with local_client(tmp_path, SessionOptions(direct_io=direct)) as (c, root, listener, _):
            ro, _ = await c.walk(root, ["f"])
            await c.lopen(ro, L_O_RDONLY)
            with pytest.raises(OSError) as e:
                await c.write(ro, 0, b"nope")
            assert e.value.errno == errno.EBADF
            assert await c.read(ro, 0, 100) == b"content"
            wo, _ = await c.walk(root, ["f"])
            await c.lopen(wo, L_O_WRONLY)
            with pytest.raises(OSError) as e:
                await c.read(wo, 0, 100)
            assert e.value.errno == errno.EBADF
            with pytest.raises(OSError) as e:
                await c.write(wo, 1 << 62, b"far")  # past what a file may hold
            assert e.value.errno in (errno.EFBIG, errno.EINVAL)
            assert _queue(listener).direct_served == (1 if direct else 0)  # the one good read
        assert (tmp_path / "f").read_bytes() == b"content"

    trio.run(main)


@pytest.mark.parametrize(
    "options",
    [SessionOptions(trace=True), SessionOptions(direct_io=False)],
    ids=["trace", "no-direct-io"],
)
def test_trace_and_no_direct_io_keep_every_request_in_the_session(tmp_path: Path, options: SessionOptions) -> None:
    async def main() -> None:
        async with local_client(tmp_path, options) as (c, root, listener, _):
            await c.write_file(root, "f", b"x" * 100_000)
            assert await c.read_file(root, "f") == b"x" * 100_000
            assert _queue(listener).direct_served == 0

    trio.run(main)


def test_a_read_only_export_never_registers_a_writable_fid(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"content")

    async def main() -> None:
        options = SessionOptions(policy=OperationPolicy(readonly=True))
        async with local_client(tmp_path, options) as (c, root, listener, _):
            fid, _ = await c.walk(root, ["f"])
            with pytest.raises(OSError):
                await c.lopen(fid, L_O_RDWR)
            await c.lopen(fid, L_O_RDONLY)
            assert await c.read(fid, 0, 100) == b"content"
            assert _queue(listener).direct_served == 1

    trio.run(main)


def _files_open_on(directory: Path) -> list[str]:
    """The fds of this process open on files in `directory` for I/O (not O_PATH)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
        except OSError:
            continue
        if target.startswith(str(directory) + "/") and not flags & O_PATH:
            found.append(target)
    return found


def test_a_connection_that_ends_with_files_open_leaks_no_fd(tmp_path: Path) -> None:
    """The VMM goes away (guest crash) while the guest holds open files the queue serves: every
    fd on them is closed, the queue's own copies included."""
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x" * 1000)

    async def main() -> None:
        server = Server(LocalBackend(str(tmp_path)))
        async with serving(server.handle, max_msize=512 * 1024) as (path, listener):
            channel = await connect_address("vhost-user:" + path, ConnectOptions(max_msize=512 * 1024))
            async with Client.connect(channel, msize=512 * 1024) as c:
                root = await c.attach()
                for i in range(5):
                    fid, _ = await c.walk(root, [f"f{i}"])
                    await c.lopen(fid, L_O_RDWR)
                    await c.read(fid, 0, 10)
                assert _queue(listener).direct_fids == 5
                assert len(_files_open_on(tmp_path)) == 10  # the backend's and the queue's
            with trio.fail_after(10):
                while server.sessions:
                    await trio.sleep(0.01)
            assert _files_open_on(tmp_path) == []

    trio.run(main)


def test_past_64_open_files_the_rest_go_through_the_session_and_nothing_leaks(tmp_path: Path) -> None:
    for i in range(70):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)

    async def main() -> None:
        async with local_client(tmp_path) as (c, root, listener, _):
            fids = []
            for i in range(70):
                fid, _ = await c.walk(root, [f"f{i}"])
                await c.lopen(fid, L_O_RDONLY)
                fids.append(fid)
            for i, fid in enumerate(fids):
                assert await c.read(fid, 0, 10) == b"%d" % i
            q = _queue(listener)
            assert q.direct_fids == 64 and q.direct_served == 64
            for fid in fids:
                await c.clunk(fid)
            assert q.direct_fids == 0
            assert _files_open_on(tmp_path) == []  # the six fds the queue could not take too

    trio.run(main)
