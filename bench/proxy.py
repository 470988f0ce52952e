"""Proxy backend cost: getattr round trips/s and 1 MiB sequential read MB/s, ProxyBackend against
LocalBackend on the same export, called directly (no 9P in between).

    PYTHONPATH=. python bench/proxy.py [--seconds 3] [--model none] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import trio

from fs_backends.base import Cred
from fs_backends.local import LocalBackend
from fs_backends.proxy import proxy_backend
from ninep import protocol as P

ROOT = Cred(0, 0, "root")
MiB = 1 << 20


def helper_cpu(b: Any) -> float:
    """CPU seconds the proxy helper (its confined child) has used, 0 for other backends."""
    pid = getattr(b, "helper_child_pid", 0)
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_getattr(b: Any, seconds: float, concurrency: int) -> tuple[float, float]:
    root = await b.attach("", ROOT)
    (n,) = await b.walk(root, ["big"])
    count = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await b.getattr(n, P.GETATTR_BASIC)
            count += 1

    t0 = time.perf_counter()
    c0 = time.process_time() + helper_cpu(b)
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    dt = time.perf_counter() - t0
    cpu = time.process_time() + helper_cpu(b) - c0
    await b.release(n)
    await b.release(root)
    return count / dt, cpu / count * 1e6


async def bench_read(b: Any, seconds: float, size: int) -> float:
    root = await b.attach("", ROOT)
    (n,) = await b.walk(root, ["big"])
    f = await b.open(n, P.L_O_RDONLY, ROOT)
    total = 0
    t0 = time.perf_counter()
    off = 0
    while time.perf_counter() - t0 < seconds:
        data = await b.read(f, off, MiB)
        total += len(data)
        off = (off + MiB) % size
    dt = time.perf_counter() - t0
    await b.close(f)
    await b.release(n)
    await b.release(root)
    return total / dt / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--model", default="none")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--size-mib", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        export = os.path.join(d, "export")
        os.mkdir(export)
        size = args.size_mib * MiB
        with open(os.path.join(export, "big"), "wb") as f:
            f.write(os.urandom(MiB) * args.size_mib)
        t = time.perf_counter()
        proxy = proxy_backend(export, args.model)
        start = time.perf_counter() - t
        local = LocalBackend(export)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"helper start-up: {start * 1000:.0f} ms ({proxy.info.extra.get('confinement')})")
        for name, b in (("local", local), ("proxy", proxy)):
            for c in (int(x) for x in args.concurrency.split(",")):
                rate, us = trio.run(bench_getattr, b, args.seconds, c)
                print(f"{name:6} getattr  concurrency {c:3}: {rate:10.0f} round trips/s"
                      f"  ({us:.0f} us CPU per call, server + helper)")
            mbs = trio.run(bench_read, b, args.seconds, size)
            print(f"{name:6} read 1 MiB sequential : {mbs:10.0f} MB/s")
        trio.run(proxy.aclose)
        trio.run(local.aclose)


if __name__ == "__main__":
    main()
