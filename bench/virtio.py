"""Host-side throughput of the virtio (vhost-user) transport, with the unix-socket transport as
the reference, both against `ninep serve` of a local directory running in its own process.

The client is `ninep.client` over `transports.virtio.Frontend` (VMM + guest driver in Python), so
these numbers include the Python driver's cost; a Linux guest driver costs far less per request.

    PYTHONPATH=. python bench/virtio.py [--transports vhost-user,unix] [--seconds 3]

This script must never be run as a test (it takes seconds and only prints numbers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import trio

from bench._servers import cpu_seconds
from ninep.client import Client
from transports.options import ConnectOptions

MSIZE = 512 * 1024
FILE_SIZE = 64 << 20


async def wait_for_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(20):
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            await trio.sleep(0.05)


SERVER_PID = 0


async def rate(seconds: float, concurrency: int, op) -> tuple[float, float]:  # noqa: ANN001
    """Runs `op()` in `concurrency` tasks for `seconds`; returns (ops/s, server CPU µs per op).
    The CPU figure does not depend on how loaded the machine is, the rate does."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await op()
            done += 1

    start, cpu0 = time.perf_counter(), cpu_seconds(SERVER_PID)
    async with trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(worker)
    cpu = cpu_seconds(SERVER_PID) - cpu0
    return done / (time.perf_counter() - start), cpu * 1e6 / max(done, 1)


async def bench(address: str, seconds: float) -> dict[str, float]:
    results: dict[str, float] = {}
    async with Client.connect(address, msize=MSIZE, options=ConnectOptions(max_msize=MSIZE)) as c:
        root = await c.attach()
        f, _ = await c.walk(root, ["data"])
        await c.lopen(f, 0)
        offsets = iter(range(0, 1 << 62, 4096))

        async def read4k() -> None:
            off = next(offsets) % FILE_SIZE
            assert len(await c.read(f, off, 4096)) == 4096

        results["4k_read_rtt_per_s_qd1"], results["4k_read_server_cpu_us"] = await rate(seconds, 1, read4k)
        results["4k_read_per_s_qd16"], _ = await rate(seconds, 16, read4k)
        big = iter(range(0, 1 << 62, 1 << 20))

        async def read1m() -> None:
            off = next(big) % FILE_SIZE
            assert len(await c.read_all(f, off, 1 << 20)) == 1 << 20

        per_s, results["1m_read_server_cpu_us"] = await rate(seconds, 4, read1m)
        results["1m_read_MB_per_s_qd4"] = per_s * (1 << 20) / 1e6
        payload = os.urandom(1 << 20)

        async def write1m() -> None:
            off = next(big) % FILE_SIZE
            assert await c.write_all(w, off, payload) == 1 << 20

        w, _ = await c.walk(root, ["data"])
        await c.lopen(w, 1)
        per_s, results["1m_write_server_cpu_us"] = await rate(seconds, 4, write1m)
        results["1m_write_MB_per_s_qd4"] = per_s * (1 << 20) / 1e6

        async def stat() -> None:
            await c.getattr(root)

        results["getattr_per_s_qd1"], results["getattr_server_cpu_us"] = await rate(seconds, 1, stat)

        async def guest_stat() -> None:
            # What Linux sends for stat("dir/data") with cache=none: a lookup (walk + getattr) per
            # component, the stat's own getattr, then a clunk per fid.
            d, _ = await c.walk(root, ["dir"])
            await c.getattr(d)
            x, _ = await c.walk(d, ["data"])
            await c.getattr(x)
            await c.getattr(x)
            await c.clunk(x)
            await c.clunk(d)

        results["guest_stat_per_s_qd1"], results["guest_stat_server_cpu_us"] = await rate(seconds, 1, guest_stat)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="vhost-user,unix")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra `ninep serve` argument (repeatable), e.g. --server-arg=--inline-metadata")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = os.path.join(tmp, "export")
        os.mkdir(export)
        with open(os.path.join(export, "data"), "wb") as fh:
            fh.write(os.urandom(1 << 20) * (FILE_SIZE >> 20))
        os.mkdir(os.path.join(export, "dir"))
        with open(os.path.join(export, "dir", "data"), "wb") as fh:
            fh.write(b"x")
        for transport in args.transports.split(","):
            sock = os.path.join(tmp, f"{transport}.sock")
            address = f"{transport}:{sock}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "ninep", "serve", export, "--listen", address, "--msize", str(MSIZE),
                 "--security-model", "none", *args.server_arg],
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            global SERVER_PID
            SERVER_PID = proc.pid
            try:
                trio.run(wait_for_socket, sock, proc)
                results = trio.run(bench, address, args.seconds)
            finally:
                proc.terminate()
                proc.wait(10)
            for key, value in results.items():
                print(f"{transport:10s} {key:24s} {value:10.1f}")


if __name__ == "__main__":
    main()
