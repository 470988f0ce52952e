"""1 MiB Tread throughput over TLS vs plain TCP, with ninep's own client (one number each).

    .venv/bin/python bench/tls.py [--seconds 5] [--depth 1]

Starts `ninep serve` twice on 127.0.0.1 (plain, and mutual TLS with certificates made by trustme),
exporting one 64 MiB file, and reads it round and round in 1 MiB Treads, `depth` in flight, for
`seconds` each. Server and client are separate processes, as in bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ninep.client import Client  # noqa: E402
from ninep.protocol.numbers import L_O_RDONLY  # noqa: E402
from transports.options import ConnectOptions  # noqa: E402

MiB = 1024 * 1024
FILE_SIZE = 64 * MiB


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(export: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "ninep", "serve", str(export), "--listen", f"tcp:127.0.0.1:{port}",
                             "--msize", "2M", "--security-model", "none", *extra], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


async def _measure(address: str, options: ConnectOptions, seconds: float, depth: int) -> float:
    async with Client.connect(address, msize=2 * MiB, options=options) as c:
        root = await c.attach()
        fid = await c.walk_path(root, "data.bin")
        await c.lopen(fid, L_O_RDONLY)
        done = 0
        deadline = trio.current_time() + seconds
        offsets = iter(range(0, 1 << 62, MiB))

        async def worker() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                data = await c.read(fid, next(offsets) % FILE_SIZE, MiB)
                assert len(data) == MiB
                done += len(data)

        start = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(depth):
                n.start_soon(worker)
        return done / MiB / (trio.current_time() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--depth", type=int, default=1)
    args = ap.parse_args()
    import trustme

    from transports.options import ClientTLS

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export = d / "export"
        export.mkdir()
        (export / "data.bin").write_bytes(os.urandom(FILE_SIZE))
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
        ca.issue_cert("bench.client", common_name="bench").private_key_and_cert_chain_pem.write_to_path(str(d / "client.pem"))
        plain_port, tls_port = _port(), _port()
        servers = [
            _serve(export, plain_port),
            _serve(export, tls_port, "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.pem"),
                   "--tls-client-ca", str(d / "ca.pem")),
        ]
        try:
            tls = ClientTLS(ca=str(d / "ca.pem"), cert=str(d / "client.pem"), key=str(d / "client.pem"))
            plain = trio.run(_measure, f"tcp:127.0.0.1:{plain_port}", ConnectOptions(max_msize=2 * MiB), args.seconds, args.depth)
            secure = trio.run(_measure, f"tcp:127.0.0.1:{tls_port}", ConnectOptions(max_msize=2 * MiB, tls=tls), args.seconds, args.depth)
        finally:
            for s in servers:
                s.terminate()
                s.wait(10)
    load = os.getloadavg()[0]
    print(f"1 MiB Tread, depth {args.depth}, {args.seconds:.0f} s each, load {load:.1f}:")
    print(f"  plain TCP: {plain:8.1f} MiB/s")
    print(f"  TLS:       {secure:8.1f} MiB/s  ({secure / plain:.2f}x)")


if __name__ == "__main__":
    main()
