"""The scripted workload every metrics test runs, and the exact counters it must produce."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ninep.client import Client, ClientError
from ninep.protocol.numbers import L_O_RDONLY, L_O_WRONLY

#: Walks to a file that exists (each clunked again), walks to one that does not, reads of
#: READ_SIZE bytes, and one write of WRITE_SIZE bytes.
N_WALKS = 5
N_MISSING = 3
N_READS = 4
READ_SIZE = 1000
WRITE_SIZE = 3000
DATA = bytes(range(256)) * 20  # 5120 bytes, more than N_READS * READ_SIZE

#: op -> (requests, {errno name: count}) for one run of `workload`.
EXPECTED_OPS: dict[str, tuple[int, dict[str, int]]] = {
    "attach": (1, {}),
    # N_WALKS + N_MISSING + the walk to the file read + the clone of the root to create in.
    "walk": (N_WALKS + N_MISSING + 2, {"ENOENT": N_MISSING}),
    "clunk": (N_WALKS, {}),
    "lopen": (1, {}),
    "read": (N_READS, {}),
    "getattr": (1, {"EBADF": 1}),
    "lcreate": (1, {}),
    "write": (1, {}),
}
EXPECTED_REQUESTS = sum(n for n, _ in EXPECTED_OPS.values())
EXPECTED_ERRORS = N_MISSING + 1
#: Fids the workload leaves held (root, the file being read, the file written), two of them open.
HELD_FIDS = 3
HELD_OPEN = 2


def make_export(export: Path) -> None:
    export.mkdir(exist_ok=True)
    os.chmod(export, 0o755)
    (export / "data.bin").write_bytes(DATA)
    (export / "sub").mkdir(exist_ok=True)


async def workload(c: Client, aname: str = "") -> list[int]:
    """Runs the script; returns the fids it leaves held."""
    root = await c.attach(aname)
    for _ in range(N_WALKS):
        await c.clunk((await c.walk(root, ["data.bin"]))[0])
    for _ in range(N_MISSING):
        try:
            await c.walk(root, ["missing"])
        except ClientError as e:
            assert e.errno == errno.ENOENT
        else:
            raise AssertionError("walk to a missing file succeeded")
    f, _ = await c.walk(root, ["data.bin"])
    await c.lopen(f, L_O_RDONLY)
    for i in range(N_READS):
        assert await c.read(f, i * READ_SIZE, READ_SIZE) == DATA[i * READ_SIZE:(i + 1) * READ_SIZE]
    try:
        await c.getattr(0xDEAD)
    except ClientError as e:
        assert e.errno == errno.EBADF
    else:
        raise AssertionError("getattr of an unknown fid succeeded")
    d, _ = await c.walk(root, [])
    await c.lcreate(d, "out.bin", L_O_WRONLY, 0o644)
    assert await c.write(d, 0, b"w" * WRITE_SIZE) == WRITE_SIZE
    return [root, f, d]


def assert_ops(ops: dict[str, dict[str, object]], times: int = 1) -> None:
    """`ops` (a snapshot's per-op table) holds exactly `times` runs of the workload."""
    assert set(ops) == set(EXPECTED_OPS), ops.keys()
    for name, (count, errors) in EXPECTED_OPS.items():
        o = ops[name]
        assert o["count"] == count * times, (name, o)
        assert o["errors"] == {k: v * times for k, v in errors.items()}, (name, o)
        buckets = o["buckets"]
        assert isinstance(buckets, list) and sum(buckets) == o["count"], (name, o)
        assert isinstance(o["seconds"], float) and o["seconds"] > 0
    assert ops["read"]["bytes"] == N_READS * READ_SIZE * times
    assert ops["write"]["bytes"] == WRITE_SIZE * times
