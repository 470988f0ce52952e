"""`ninep xenstore-emu` and `ninep serve --listen xen:…` as separate processes, a client in this
one: the way a user runs the emulated Xen transport."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from ninep.client import Client
from tests.kits.processes import wait_for_socket

ROOT = Path(__file__).resolve().parents[3]


def test_xenstore_emu_and_serve_processes(sock_path: str, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "hello.txt").write_text("over the ring\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NINEP_XENSTORE=sock_path)
    emu = subprocess.Popen(
        [sys.executable, "-m", "ninep", "xenstore-emu"], env=env, stderr=subprocess.PIPE
    )
    serve = None
    try:
        wait_for_socket(sock_path, emu, 20)
        serve = subprocess.Popen(
            [sys.executable, "-m", "ninep", "serve", str(export), "--listen", "xen:7/0"],
            env=env,
            stderr=subprocess.PIPE,
        )

        async def client() -> None:
            with trio.fail_after(30):
                while True:  # until the backend published InitWait
                    try:
                        async with Client.connect(f"xen:7/0,xenstore={sock_path}") as c:
                            root = await c.attach()
                            assert await c.read_file(root, "hello.txt") == b"over the ring\n"
                            await c.write_file(root, "back.txt", b"and back")
                            return
                    except ConnectionError:
                        await trio.sleep(0.1)

        trio.run(client)
        assert (export / "back.txt").read_bytes() == b"and back"
    finally:
        for proc in (serve, emu):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert emu.returncode == 0
    assert not os.path.exists(sock_path)  # the daemon cleans up its socket
