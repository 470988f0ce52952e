"""Proxy backend cost: per metadata operation round trips/s and CPU per call (server process and
helper apart), and 1 MiB sequential read MB/s, ProxyBackend against LocalBackend on the same
export, called directly (no 9P in between).

    PYTHONPATH=. python bench/proxy.py [--seconds 2] [--model none] [--concurrency 1,16]
                                       [--ops getattr,walk,...] [--no-read]

CPU is what matters on a loaded machine (wall clock swings 2-5x with other load): `srv` is this
process's CPU time (all its threads), `hlp` the helper's confined child's (from /proc, clock
ticks), both per call.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from fs_backends.base import Cred, SetAttr
from fs_backends.local import LocalBackend
from fs_backends.proxy import proxy_backend
from ninep.protocol import numbers as P

ROOT = Cred(0, 0, "root")
MiB = 1 << 20
OPS = ("getattr", "walk", "setattr", "create", "unlink", "readdir", "xattr_get", "xattr_set")


def helper_cpu(b: Any) -> float:
    """CPU seconds the proxy helper (its confined child) has used, 0 for other backends."""
    pid = getattr(b, "helper_child_pid", 0)
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_op(b: Any, op: str, seconds: float, concurrency: int) -> tuple[float, float, float]:
    """(calls/s, server µs CPU per call, helper µs CPU per call) of one operation."""
    root = await b.attach("", ROOT)
    (big,) = await b.walk(root, ["big"])
    (cw,) = await b.walk(root, ["cw"])
    (small,) = await b.walk(root, ["small"])
    if op == "xattr_get":
        await b.xattr_set(big, "user.bench", b"v" * 32, 0)
    names = itertools.count()
    created: list[str] = []
    if op == "unlink":
        # Files to unlink, made beforehand (not timed).
        for _ in range(int(4000 * seconds)):
            name = f"u{next(names)}"
            n, f = await b.create(cw, name, P.L_O_RDWR, 0o644, ROOT)
            await b.close(f)
            await b.release(n)
            created.append(name)
    sa = SetAttr(valid=P.SETATTR_MODE, mode=0o644)

    async def one() -> bool:
        if op == "getattr":
            await b.getattr(big, P.GETATTR_BASIC)
        elif op == "walk":  # walk + clunk, as Twalk + Tclunk
            (n,) = await b.walk(root, ["big"])
            await b.release(n)
        elif op == "setattr":
            await b.setattr(big, sa, ROOT)
        elif op == "create":  # Tlcreate + Tclunk
            n, f = await b.create(cw, f"c{next(names)}", P.L_O_RDWR, 0o644, ROOT)
            await b.close(f)
            await b.release(n)
        elif op == "unlink":
            if not created:
                return False
            await b.unlinkat(cw, created.pop(), 0)
        elif op == "readdir":  # Twalk + Tlopen + Treaddir (100 entries) + Tclunk
            (n,) = await b.walk(root, ["small"])
            f = await b.open(n, P.L_O_RDONLY, ROOT)
            off = 0
            while ents := await b.readdir(f, off, 256):
                off = ents[-1].offset
            await b.close(f)
            await b.release(n)
        elif op == "xattr_get":
            await b.xattr_get(big, "user.bench")
        elif op == "xattr_set":
            await b.xattr_set(big, "user.bench", b"v" * 32, 0)
        return True

    count = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            if not await one():
                return
            count += 1

    t0 = time.perf_counter()
    s0, h0 = time.process_time(), helper_cpu(b)
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    dt = time.perf_counter() - t0
    srv, hlp = time.process_time() - s0, helper_cpu(b) - h0
    for n in (big, cw, small, root):
        await b.release(n)
    count = max(count, 1)
    return count / dt, srv / count * 1e6, hlp / count * 1e6


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


def _clean(d: str) -> None:
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--model", default="none")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--backends", default="local,proxy")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--no-read", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        export = os.path.join(d, "export")
        os.mkdir(export)
        os.mkdir(os.path.join(export, "cw"))
        os.mkdir(os.path.join(export, "small"))
        for i in range(100):
            open(os.path.join(export, "small", f"entry-{i:03}"), "w").close()
        size = args.size_mib * MiB
        with open(os.path.join(export, "big"), "wb") as f:
            f.write(os.urandom(MiB) * args.size_mib)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, model {args.model}")
        backends: list[tuple[str, Callable[[], Any]]] = []
        wanted = args.backends.split(",")
        if "local" in wanted:
            backends.append(("local", lambda: LocalBackend(export)))
        if "proxy" in wanted:
            backends.append(("proxy", lambda: proxy_backend(export, args.model)))
        for name, make in backends:
            t = time.perf_counter()
            b = make()
            if name == "proxy":
                print(f"helper start-up: {(time.perf_counter() - t) * 1000:.0f} ms "
                      f"({b.info.extra.get('confinement')})")
            for op in args.ops.split(","):
                for c in (int(x) for x in args.concurrency.split(",")):
                    rate, srv, hlp = trio.run(bench_op, b, op, args.seconds, c)
                    _clean(os.path.join(export, "cw"))
                    print(f"{name:6} {op:10} concurrency {c:3}: {rate:9.0f} calls/s  CPU per call "
                          f"{srv + hlp:5.0f} us (srv {srv:4.0f} + hlp {hlp:4.0f})", flush=True)
            if not args.no_read:
                mbs = trio.run(bench_read, b, args.seconds, size)
                print(f"{name:6} read 1 MiB sequential : {mbs:10.0f} MB/s")
            aclose: Callable[[], Awaitable[None]] = b.aclose
            trio.run(aclose)


if __name__ == "__main__":
    main()
