"""Helpers for the fault tests: a `ninep serve` subprocess and what it holds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from ninep.client import Client, ClientError
from ninep.protocol.numbers import V9P2000_L
from tests.kits.processes import wait_for_socket
from transports.base import Channel

REPO = Path(__file__).resolve().parents[2]


def serve(export: str | Path, sock: Path, *args: str, preexec_fn: Callable[[], None] | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    """`ninep serve EXPORT --listen unix:SOCK ARGS…` in a subprocess, once it is listening."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (child keeps it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ninep", "serve", str(export), "--listen", f"unix:{sock}", "-v", *args],
        cwd=REPO, stdout=out, stderr=out, preexec_fn=preexec_fn,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if log is not None:
        out.close()  # type: ignore[union-attr]
    wait_for_socket(sock, proc)
    return proc


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def version_error(channel: Channel) -> int:
    """Sends Tversion on a fresh channel and returns the errno of the error it is answered with
    (0 if it is accepted)."""
    c = Client(channel)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c._reader)
            try:
                await c.version(65536, V9P2000_L)
                return 0
            except ClientError as e:
                return e.errno or -1
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()
