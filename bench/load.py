#!/usr/bin/env python3
"""Load and soak test: many connections, many requests in flight, mixed metadata and data
operations against one `ninep serve` over a unix socket.

    .venv/bin/python bench/load.py                        # 256 connections x 32 in flight, 60 s
    .venv/bin/python bench/load.py --minutes 30           # soak: RSS at 5 min vs at the end
    .venv/bin/python bench/load.py --seconds 3 --connections 4 --depth 4 --procs 1   # smoke

The script starts the server itself (local backend on a temporary export, or `--backend memory`),
fills the export, and drives it from `--procs` client processes (ninep/client.py on trio; one
Python process cannot keep 8192 requests in flight and measure them at once). Each of the
connections x depth workers loops over a mix of operations: getattr; walk+clunk; open, read and
clunk; open, write and clunk; open a directory, readdir and clunk; create, write, clunk and unlink.
Every request is timed from the client (so a busy client adds to the latency it reports).

It reports, per message type, count, p50/p90/p99/max latency, and overall ops/s, errors (any
Rlerror or lost connection counts; there must be none), the server's peak RSS (VmHWM) and RSS
sampled over time, and the server's and clients' CPU use, which says who was the bottleneck. The
result goes to bench/results/load-<date>-<host>.json (or `--out DIR`) and a summary to stdout;
the exit status is 1 if there was any error.

This script must never change what it measures: no retries, no dropped samples.
"""

from __future__ import annotations

import argparse
import errno as _errno
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, host, machine, stamp, write_json  # noqa: E402
from bench._servers import _env, _raise_nofile, _wait_unix, cpu_seconds  # noqa: E402

#: Latency histogram: bucket i holds latencies in [BASE**i, BASE**(i+1)) microseconds, so
#: percentiles are exact to 2 % whatever the run length (a soak run cannot keep every sample).
BASE = 1.02
SHARED_FILES = 64
SHARED_SIZE = 64 * 1024
#: The mix: operation name and weight.
MIX = (("getattr", 30), ("walk", 20), ("read", 20), ("write", 10), ("readdir", 10), ("create", 10))


@dataclass
class Stats:
    """One client process's measurements (merged across processes by the parent)."""

    hist: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    maxima: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_samples: list[str] = field(default_factory=list)
    mixes: int = 0

    def add(self, op: str, seconds: float) -> None:
        us = max(seconds * 1e6, 1.0)
        self.hist[op][int(math.log(us, BASE))] += 1
        if us > self.maxima.get(op, 0.0):
            self.maxima[op] = us

    def error(self, op: str, e: BaseException) -> None:
        key = f"{op}: {type(e).__name__} {getattr(e, 'errno', '')}".strip()
        self.errors[key] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{op}: {e!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "hist": {op: dict(h) for op, h in self.hist.items()},
            "maxima": self.maxima,
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "mixes": self.mixes,
        }


def percentile(hist: dict[int, int], q: float) -> float:
    """The q-quantile (0..1) of a histogram, in milliseconds (bucket midpoint)."""
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return BASE ** (b + 0.5) / 1000
    return BASE ** (max(hist) + 0.5) / 1000


# --- the client side (runs in each client process) -------------------------------------------------


async def _client_main(sock: str, conns: list[int], depth: int, start_at: float, seconds: float,
                       msize: int) -> Stats:
    import trio

    from ninep.client import Client
    from ninep.protocol.numbers import L_O_CREAT, L_O_DIRECTORY, L_O_RDONLY, L_O_WRONLY

    stats = Stats()
    ops, weights = zip(*MIX, strict=True)

    async def timed(op: str, coro: Awaitable[Any]) -> Any:
        t0 = time.perf_counter()
        r = await coro
        stats.add(op, time.perf_counter() - t0)
        return r

    async def worker(c: Client, root: int, conn: int, slot: int, deadline: float) -> None:
        rng = random.Random(conn * 1000 + slot)
        mydir = f"c{conn}"
        scratch = [mydir, f"s{slot}"]
        block = rng.randbytes(4096)
        serial = 0
        shared_fid, _ = await c.walk(root, ["shared", "f0"])
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            try:
                if op == "getattr":
                    await timed("getattr", c.getattr(shared_fid))
                elif op == "walk":
                    f, _ = await timed("walk", c.walk(root, ["shared", f"f{rng.randrange(SHARED_FILES)}"]))
                    await timed("clunk", c.clunk(f))
                elif op == "read":
                    f, _ = await timed("walk", c.walk(root, ["shared", f"f{rng.randrange(SHARED_FILES)}"]))
                    await timed("lopen", c.lopen(f, L_O_RDONLY))
                    count = rng.choice((4096, 16384, 65536))
                    await timed("read", c.read(f, rng.randrange(0, SHARED_SIZE, 4096), count))
                    await timed("clunk", c.clunk(f))
                elif op == "write":
                    f, _ = await timed("walk", c.walk(root, scratch))
                    await timed("lopen", c.lopen(f, L_O_WRONLY))
                    await timed("write", c.write(f, rng.randrange(16) * 4096, block))
                    await timed("clunk", c.clunk(f))
                elif op == "readdir":
                    f, _ = await timed("walk", c.walk(root, [mydir]))
                    await timed("lopen", c.lopen(f, L_O_RDONLY | L_O_DIRECTORY))
                    await timed("readdir", c.readdir(f, 0, 8192))
                    await timed("clunk", c.clunk(f))
                elif op == "create":
                    serial += 1
                    name = f"t{slot}-{serial}"
                    f, _ = await timed("walk", c.walk(root, [mydir]))
                    await timed("lcreate", c.lcreate(f, name, L_O_WRONLY | L_O_CREAT, 0o644))
                    await timed("write", c.write(f, 0, block[:1024]))
                    await timed("clunk", c.clunk(f))
                    d, _ = await timed("walk", c.walk(root, [mydir]))
                    await timed("unlinkat", c.unlinkat(d, name))
                    await timed("clunk", c.clunk(d))
                stats.mixes += 1
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                stats.error(op, e)
                if isinstance(e, trio.BrokenResourceError | trio.ClosedResourceError) or (
                    isinstance(e, OSError) and e.errno == _errno.ECONNRESET
                ):
                    return  # the connection is gone: every further request would fail too

    async def connection(conn: int) -> None:
        try:
            async with Client.connect(f"unix:{sock}", msize=msize) as c:
                root = await c.attach()
                await trio.sleep_until(trio.current_time() + max(0.0, start_at - time.time()))
                deadline = time.monotonic() + seconds
                async with trio.open_nursery() as n:
                    for slot in range(depth):
                        n.start_soon(worker, c, root, conn, slot, deadline)
        except (OSError, trio.BrokenResourceError) as e:
            stats.error("connect", e)

    async with trio.open_nursery() as n:
        for conn in conns:
            n.start_soon(connection, conn)
    return stats


def _client_process(sock: str, conns: list[int], depth: int, start_at: float, seconds: float,
                    msize: int, out: Connection) -> None:
    import trio

    stats = trio.run(_client_main, sock, conns, depth, start_at, seconds, msize)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.send({**stats.as_dict(), "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss})
    out.close()


# --- the server and the parent -------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def populate(export: Path, connections: int, depth: int) -> None:
    shared = export / "shared"
    shared.mkdir()
    data = os.urandom(SHARED_SIZE)
    for i in range(SHARED_FILES):
        (shared / f"f{i}").write_bytes(data)
    for c in range(connections):
        d = export / f"c{c}"
        d.mkdir()
        for s in range(depth):
            (d / f"s{s}").write_bytes(b"\0" * 4096)


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60 if args.minutes else args.seconds
    sample_every = args.sample_every or (10.0 if args.minutes else 1.0)
    tmp = Path(tempfile.mkdtemp(prefix="ninep-load-"))
    export = tmp / "export"
    export.mkdir()
    sock = tmp / "9p.sock"
    t0 = time.monotonic()
    populate(export, args.connections, args.depth)
    print(f"populated {args.connections} connection dirs in {time.monotonic() - t0:.1f} s", flush=True)
    server_log = tmp / "server.log"
    cmd = [sys.executable, "-m", "ninep", "serve", "memory:" if args.backend == "memory" else str(export),
           "--listen", f"unix:{sock}", "--msize", str(args.msize),
           "--max-connections", str(args.connections + 16)]
    with open(server_log, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=log, env=_env(), preexec_fn=_raise_nofile)
    try:
        _wait_unix(str(sock), server)
        if args.backend == "memory":
            _populate_memory(str(sock), args.connections, args.depth)
        rss_before = _status_kib(server.pid, "VmRSS")
        procs = max(1, min(args.procs, args.connections))
        groups = [list(range(i, args.connections, procs)) for i in range(procs)]
        start_at = time.time() + args.settle
        ctx = mp.get_context("fork")
        children = []
        for g in groups:
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_client_process,
                            args=(str(sock), g, args.depth, start_at, seconds, args.msize, send))
            p.start()
            send.close()
            children.append((p, recv))
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(server.pid)
        began = time.monotonic()
        samples: list[tuple[float, float]] = []
        while any(p.is_alive() for p, _ in children):
            samples.append((round(time.monotonic() - began, 1), _status_kib(server.pid, "VmRSS") / 1024))
            if server.poll() is not None:
                raise RuntimeError(f"server died with status {server.returncode}: see {server_log}")
            if time.monotonic() - began > seconds + 120:
                raise RuntimeError("clients did not finish in time")
            if args.minutes and samples and int(samples[-1][0]) % 60 < sample_every:
                print(f"  {samples[-1][0] / 60:.1f} min: server RSS {samples[-1][1]:.1f} MiB", flush=True)
            _sleep_while_alive(children, sample_every)
        elapsed = min(time.monotonic() - began, seconds)
        server_cpu = cpu_seconds(server.pid) - cpu0
        results = [recv.recv() for _, recv in children]
        for p, _ in children:
            p.join()
        peak = _status_kib(server.pid, "VmHWM") / 1024
        rss_end = _status_kib(server.pid, "VmRSS") / 1024
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    log_text = server_log.read_text(errors="replace")
    shutil.rmtree(tmp, ignore_errors=True)
    return _report(args, seconds, elapsed, results, samples, peak, rss_before / 1024, rss_end,
                   server_cpu, log_text)


def _sleep_while_alive(children: list[tuple[Any, Connection]], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(p.is_alive() for p, _ in children):
        time.sleep(min(0.1, seconds))


def _populate_memory(sock: str, connections: int, depth: int) -> None:
    import trio

    from ninep.client import Client
    from ninep.protocol.numbers import L_O_CREAT, L_O_WRONLY

    async def main() -> None:
        async with Client.connect(f"unix:{sock}") as c:
            root = await c.attach()
            await c.mkdir(root, "shared")
            data = os.urandom(SHARED_SIZE)
            for i in range(SHARED_FILES):
                await c.write_file(root, f"shared/f{i}", data)
            for conn in range(connections):
                await c.mkdir(root, f"c{conn}")
                for s in range(depth):
                    f, _ = await c.walk(root, [f"c{conn}"])
                    await c.lcreate(f, f"s{s}", L_O_WRONLY | L_O_CREAT, 0o644)
                    await c.write(f, 0, b"\0" * 4096)
                    await c.clunk(f)

    trio.run(main)


def _report(args: argparse.Namespace, seconds: float, elapsed: float, results: list[dict[str, Any]],
            samples: list[tuple[float, float]], peak: float, rss_before: float, rss_end: float,
            server_cpu: float, log_text: str) -> dict[str, Any]:
    hist: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    maxima: dict[str, float] = defaultdict(float)
    errors: dict[str, int] = defaultdict(int)
    error_samples: list[str] = []
    for r in results:
        for op, h in r["hist"].items():
            for b, n in h.items():
                hist[op][int(b)] += n
        for op, mx in r["maxima"].items():
            maxima[op] = max(maxima[op], mx)
        for k, n in r["errors"].items():
            errors[k] += n
        error_samples += r["error_samples"]
    ops = {}
    total = 0
    for op in sorted(hist):
        n = sum(hist[op].values())
        total += n
        ops[op] = {
            "count": n,
            "per_s": n / elapsed if elapsed else 0.0,
            "p50_ms": percentile(hist[op], 0.50),
            "p90_ms": percentile(hist[op], 0.90),
            "p99_ms": percentile(hist[op], 0.99),
            "max_ms": maxima[op] / 1000,
        }
    soak: dict[str, Any] = {}
    if args.minutes:
        at5 = [rss for t, rss in samples if t >= 300]
        if at5:
            soak = {"rss_5min_mib": at5[0], "rss_end_mib": samples[-1][1],
                    "growth_pct": 100 * (samples[-1][1] - at5[0]) / at5[0]}
    client_cpu = sum(r["cpu"] for r in results)
    return {
        "machine": machine(),
        "config": {"connections": args.connections, "depth": args.depth, "seconds": seconds,
                   "procs": len(results), "msize": args.msize, "backend": args.backend,
                   "transport": "unix", "mix": dict(MIX)},
        "elapsed_s": elapsed,
        "requests": total,
        "requests_per_s": total / elapsed if elapsed else 0.0,
        "mixes_per_s": sum(r["mixes"] for r in results) / elapsed if elapsed else 0.0,
        "ops": ops,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": error_samples,
        "server": {
            "peak_rss_mib": peak,
            "rss_start_mib": rss_before,
            "rss_end_mib": rss_end,
            "rss_samples": samples,
            "cpu_s": server_cpu,
            "cpu_cores": server_cpu / elapsed if elapsed else 0.0,
            "log_tracebacks": log_text.count("Traceback"),
            "log_warnings": log_text.count(" WARNING "),
        },
        "soak": soak,
        "clients": {"cpu_s": client_cpu, "cpu_cores": client_cpu / elapsed if elapsed else 0.0,
                    "max_rss_mib": [r["maxrss_kib"] / 1024 for r in results]},
    }


def text(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"ninep load: {cfg['connections']} connections x {cfg['depth']} in flight, {result['elapsed_s']:.0f} s, "
        f"{cfg['procs']} client processes, {cfg['backend']} backend, unix socket",
        f"{result['requests']:,} requests, {result['requests_per_s']:,.0f} requests/s, errors {result['errors']}",
        f"{'op':<10}{'count':>10}{'/s':>9}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}",
    ]
    for op, o in result["ops"].items():
        lines.append(f"{op:<10}{o['count']:>10,}{o['per_s']:>9,.0f}{o['p50_ms']:>10.1f}{o['p90_ms']:>10.1f}"
                     f"{o['p99_ms']:>10.1f}{o['max_ms']:>10.1f}")
    s = result["server"]
    lines.append(f"server: peak RSS {s['peak_rss_mib']:.1f} MiB (start {s['rss_start_mib']:.1f}, end "
                 f"{s['rss_end_mib']:.1f}), CPU {s['cpu_cores']:.2f} cores; clients CPU "
                 f"{result['clients']['cpu_cores']:.2f} cores; server log: {s['log_tracebacks']} tracebacks, "
                 f"{s['log_warnings']} warnings")
    if result["soak"]:
        k = result["soak"]
        lines.append(f"soak: RSS {k['rss_5min_mib']:.1f} MiB at 5 min, {k['rss_end_mib']:.1f} MiB at the end "
                     f"({k['growth_pct']:+.1f} %)")
    for e in result["error_samples"][:5]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--depth", type=int, default=32, help="requests in flight per connection")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--minutes", type=float, default=0.0, help="soak mode: run this many minutes")
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument("--msize", type=int, default=512 * 1024)
    p.add_argument("--backend", choices=("local", "memory"), default="local")
    p.add_argument("--sample-every", type=float, default=0.0, help="RSS sampling period (s)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds given to the clients to connect before the clock starts")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = run(args)
    path = write_json(args.out / f"load-{stamp()}-{host()}.json", result)
    print(text(result))
    print(f"wrote {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
