"""Fixtures of the interop suite: our server started through the real CLI on a loopback TCP port,
diod started as a server, and a private venv holding PyPI's p9fs (its module is named `py9p`,
which other 9P packages also use, so it never goes into the project's own environment)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NINEP_TEST_CACHE", Path.home() / ".cache" / "ninep-tests"))
P9FS_VERSION = "0.0.4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
    """Signals `proc` and waits; kills it if it does not exit. Returns its exit code (None if killed)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


@dataclass
class Served:
    port: int
    export: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A small tree every interop test starts from."""
    e = tmp_path / "export"
    (e / "sub" / "deeper").mkdir(parents=True)
    (e / "hello.txt").write_bytes(b"hello, 9P world\n")
    (e / "sub" / "inner.txt").write_bytes(b"inner file\n")
    (e / "sub" / "deeper" / "big.bin").write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    os.symlink("hello.txt", e / "link")
    return e


@pytest.fixture
def ninep_server(export: Path, tmp_path: Path) -> Iterator[Served]:
    """`python -m ninep serve EXPORT --listen tcp:127.0.0.1:PORT`, stopped with SIGTERM."""
    yield from _ninep_server(export, tmp_path)


@pytest.fixture
def ninep_readonly_server(export: Path, tmp_path: Path) -> Iterator[Served]:
    """The same with --readonly."""
    yield from _ninep_server(export, tmp_path, "--readonly")


def _ninep_server(export: Path, tmp_path: Path, *extra: str) -> Iterator[Served]:
    port = free_port()
    log = tmp_path / "ninep.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ninep", "serve", str(export), "--listen", f"tcp:127.0.0.1:{port}", "-v", *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        wait_listening(port, proc, "ninep serve")
        yield Served(port, export, proc, log)
    finally:
        code = stop(proc)
    # A clean SIGTERM shutdown is part of what a user relies on, and nothing may have crashed.
    text = log.read_text(errors="replace")
    assert code == 0, f"ninep serve did not exit cleanly on SIGTERM ({code}):\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture
def diod_server(export: Path, tmp_path: Path) -> Iterator[Served]:
    """diod serving `export` on loopback TCP without authentication."""
    diod = shutil.which("diod") or "/usr/sbin/diod"
    assert os.path.exists(diod), "diod is installed by the CI setup (apt-get install diod)"
    port = free_port()
    log = tmp_path / "diod.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([diod, "-f", "-n", "-e", str(export), "-l", f"127.0.0.1:{port}", "-L", "stderr"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc, "diod")
        yield Served(port, export, proc, log)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def p9fs_python() -> Path:
    """The interpreter of a venv (kept under the cache dir) with PyPI's p9fs installed."""
    venv = CACHE / f"p9fs-{P9FS_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import p9fs, py9p"], capture_output=True).returncode == 0
    if not ok:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"p9fs=={P9FS_VERSION}"],
                       check=True)
    return py


def diod_tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    assert os.path.exists(path), f"{name} comes with Debian's diod package"
    return path
