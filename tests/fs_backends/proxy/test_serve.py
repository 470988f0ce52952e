"""`ninep serve EXPORT --security-model proxy --user nobody` as a real process tree: the server
ends up as nobody in an empty root holding no host path, the helper confined as the export's
owner, and a helper killed under a live server is replaced through the launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from ninep.client import Client, ClientError
from tests.fs_backends.proxy.conftest import OWNER

REPO = Path(__file__).resolve().parents[3]
NOBODY = 65534


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def wait_log(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        found = list(re.finditer(pattern, text))
        if found:
            return found[-1]
        if proc.poll() is not None:
            raise AssertionError(f"server exited:\n{text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in log:\n{text}")
        time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs the server to start as root")
def test_serve_proxy_as_nobody(site: tuple[Path, Path], tmp_path: Path) -> None:
    export, canary = site
    sock = tmp_path / "9p.sock"
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ninep", "serve", str(export), "--security-model", "proxy",
             "--user", "nobody", "--listen", f"unix:{sock}", "-v"],
            cwd=REPO, stderr=logf, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_log(log, r"server confined", proc)
        m = wait_log(log, r"proxy helper (\d+) \(child (\d+)\) ready", proc)
        helper, child = int(m.group(1)), int(m.group(2))

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                assert await c.read_file(root, "file") == b"inside\n"
                await c.write_file(root, "new.txt", b"written through the proxy")
                await c.mkdir(root, "newdir")
                with pytest.raises(ClientError):
                    await c.read_file(root, "abs_secret")
                with pytest.raises(ClientError):
                    await c.read_file(root, "outdir/secret")

        trio.run(use)
        assert (export / "new.txt").read_bytes() == b"written through the proxy"
        assert (export / "newdir").is_dir()

        # The server: nobody, no capabilities, no_new_privs, an empty deleted root, no host path.
        s = status(proc.pid)
        assert s["Uid"].split() == [str(NOBODY)] * 4 and s["Gid"].split() == [str(NOBODY)] * 4
        assert s["Groups"] == "" and int(s["CapEff"], 16) == 0 and int(s["CapPrm"], 16) == 0
        assert s["NoNewPrivs"] == "1"
        assert os.listdir(f"/proc/{proc.pid}/root") == []
        assert os.readlink(f"/proc/{proc.pid}/root").endswith("(deleted)")
        assert os.readlink(f"/proc/{proc.pid}/cwd") == os.readlink(f"/proc/{proc.pid}/root")
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("/"):
                assert target in (os.devnull, str(log)) or target.startswith(str(export)), target

        # The launcher kept only the export owner's identity; the helper is confined as the owner.
        launchers = [p for p in children(proc.pid) if p != helper]
        assert launchers and all(status(p)["Uid"].split()[0] == str(OWNER) for p in launchers)
        hs = status(child)
        assert hs["Uid"].split() == [str(OWNER)] * 4 and int(hs["CapEff"], 16) == 0
        assert hs["NoNewPrivs"] == "1"
        assert sorted(os.listdir(f"/proc/{child}/root")) == ["export", "proc"]

        # Kill the helper under the live server: a replacement comes from the launcher.
        os.kill(child, signal.SIGKILL)
        wait_log(log, r"restarted as", proc)
        m2 = wait_log(log, r"proxy helper (\d+) \(child (\d+)\) ready", proc)
        assert int(m2.group(2)) != child

        async def again() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                assert await c.read_file(root, "new.txt") == b"written through the proxy"

        trio.run(again)
        assert "died" in log.read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
