#!/usr/bin/env python3
"""How many kicks a polling vhost-user back-end saves: a driver sends request after request (one
in flight) to `ninep serve --listen vhost-user:…` with polling off and on, and counts the kicks it
had to send per request, with the server's CPU per request beside it.

    PYTHONPATH=. .venv/bin/python bench/polling.py [--requests 300] [--poll-us 0,400,20000]

Kicks depend on scheduling (a loaded machine delays the server past its window), which is why this
is a benchmark and not a test: say the load when quoting it. This script must never change the
code it measures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench._servers import cpu_seconds
from ninep.client import Client
from transports.virtio import Frontend

REPO = Path(__file__).resolve().parents[1]


async def drive(sock: str, op: str, requests: int, pid: int) -> tuple[int, float]:
    fe = Frontend(sock, msize=65536, event_idx=True)
    channel = await fe.connect()
    async with Client.connect(channel, msize=65536) as c:
        root = await c.attach()
        f, _ = await c.walk(root, [])
        await c.lcreate(f, "data", os.O_WRONLY, 0o644, 0)
        chunk = b"x" * 32768
        before, cpu0 = fe.kicks, cpu_seconds(pid)
        for i in range(requests):
            if op == "getattr":
                await c.getattr(root)
            else:
                await c.write(f, i * len(chunk), chunk)
        return fe.kicks - before, (cpu_seconds(pid) - cpu0) * 1e6 / requests


def one(poll_us: int, op: str, requests: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "vu.sock")
        proc = subprocess.Popen([sys.executable, "-m", "ninep", "serve", tmp, "--listen", f"vhost-user:{sock}",
                                 "--security-model", "none", "--poll-us", str(poll_us)], cwd=REPO)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start (exit {proc.poll()})")
                time.sleep(0.05)
            return trio.run(drive, sock, op, requests, proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--poll-us", default="0,400,20000")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"{'op':8s} {'poll_us':>8s} {'kicks/request':>14s} {'server µs/request':>18s}")
    for op in ("getattr", "write"):
        for poll_us in (int(x) for x in args.poll_us.split(",")):
            kicks, cpu = one(poll_us, op, args.requests)
            print(f"{op:8s} {poll_us:8d} {kicks / args.requests:14.2f} {cpu:18.1f}")


if __name__ == "__main__":
    main()
