"""Fixtures for the FUSE suite: the same tests run on several mounts of a host directory.

Kinds of mount (the `mount` fixture is parametrized over them):
- `local`:  `ninep mount DIR MNT` — LocalBackend straight under FUSE.
- `ninep`:  a ninep server exporting DIR on 127.0.0.1, mounted with `ninep mount 9p://…`
            (RemoteBackend → ninep client → TCP → ninep server → LocalBackend).
- `diod`:   diod exporting DIR on 127.0.0.1, mounted with `ninep mount 9p://…`.
- `memory`: `ninep mount memory:` — no host directory; only for the frontend-only tests.

Each mount runs in its own process (pyfuse3 is one mount per process, and a test doing blocking
syscalls on a mount served by its own process would deadlock). Fixtures always unmount with
`fusermount3 -u -z` in a finally, even when a test fails, and kill what they started.

Needs: /dev/fuse, fusermount3 (apt: fuse3), pyfuse3 (pip; builds against apt libfuse3-dev and
pkg-config), diod (apt) for the diod kind, attr (apt: setfattr/getfattr).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
APT_PACKAGES = ["fuse3", "libfuse3-dev", "pkg-config", "diod", "attr"]


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None


def ensure_tools() -> str | None:
    """Install what the suite needs if it is missing; returns why FUSE cannot run, or None."""
    missing = [
        pkg
        for pkg, tool in (("fuse3", "fusermount3"), ("diod", "diod"), ("attr", "setfattr"))
        if not _have(tool) and not os.path.exists(f"/usr/sbin/{tool}")
    ]
    if missing and os.geteuid() == 0 and _have("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *APT_PACKAGES],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        subprocess.run([PY, "-m", "pip", "install", "-q", "pyfuse3"], check=False)
    try:
        import pyfuse3  # noqa: F401,F811
    except ImportError:
        return "pyfuse3 cannot be installed"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if not _have("fusermount3"):
        return "fusermount3 missing (apt install fuse3)"
    return None


_WHY_NOT = ensure_tools()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuse/" in str(item.fspath):
            item.add_marker(pytest.mark.fuse)
            if _WHY_NOT:
                item.add_marker(pytest.mark.skip(reason=_WHY_NOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def is_mounted(mnt: Path) -> bool:
    target = str(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4] == target and " - fuse" in line:
                return True
    return False


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def unmount(mnt: Path) -> None:
    """Unmount now if nothing uses the mount, else lazily (a failed test may leave files open)."""
    for cmd in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
        r = subprocess.run([*cmd, str(mnt)], check=False, capture_output=True)
        if r.returncode == 0 or not is_mounted(mnt):
            return


@dataclass
class Mount:
    """A running mount: `path` is the mountpoint, `host` the exported directory (None for
    memory), `kind` one of the kinds above, `log` the mount process' log file."""

    kind: str
    path: Path
    host: Path | None
    log: Path
    proc: subprocess.Popen[bytes]
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _n: itertools.count[int] = field(default_factory=itertools.count)

    def workdir(self, name: str) -> tuple[Path, Path | None]:
        """A fresh directory for one test: (path in the mount, same path on the host)."""
        sub = f"{self.kind}-{name}-{next(self._n)}"
        p = self.path / sub
        p.mkdir()
        return p, (self.host / sub if self.host else None)

    def stats(self) -> dict[str, int]:
        """The mount's table sizes (SIGUSR1 makes it log them)."""
        before = self.log.read_text().count("tables: ")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [ln for ln in self.log.read_text().splitlines() if "tables: " in ln]
            if len(lines) > before:
                import ast

                return dict(ast.literal_eval(lines[-1].split("tables: ", 1)[1]))
            time.sleep(0.05)
        raise RuntimeError("mount did not report its tables")


def start_mount(
    source: str,
    mnt: Path,
    log: Path,
    *extra: str,
    kind: str = "",
    host: Path | None = None,
) -> Mount:
    mnt.mkdir(parents=True, exist_ok=True)
    # allow_other: tests also act as other users through the mount (root mounts it).
    cmd = [
        PY,
        "-m",
        "ninep.cli.mount",
        source,
        str(mnt),
        "--log-file",
        str(log),
        "-o",
        "allow_other",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.monotonic() + 20
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"mount of {source} failed:\n{text}")
        time.sleep(0.05)
    return Mount(kind, mnt, host, log, proc)


def close_mount(m: Mount) -> None:
    try:
        unmount(m.path)
        with contextlib.suppress(subprocess.TimeoutExpired):
            m.proc.wait(10)  # it ends by itself once unmounted
    finally:
        stop(m.proc)
        for s in m.servers:
            stop(s)


def start_ninep_server(export: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [PY, "-m", "ninep", "serve", str(export), "--listen", f"tcp:127.0.0.1:{port}", "--allow-setid"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc


def start_diod(export: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    diod = shutil.which("diod") or "/usr/sbin/diod"
    cmd = [diod, "-f", "-n", "-e", str(export), "-l", f"127.0.0.1:{port}", "-L", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


#: Override with NINEP_FUSE_KINDS=local,diod to run a subset while developing.
KINDS = os.environ.get("NINEP_FUSE_KINDS", "local,ninep,diod").split(",")


def open_kind(kind: str, base: Path, export: Path | None = None) -> Mount:
    """Start whatever `kind` needs and mount it under `base` (exporting `export`, or a new
    directory in `base`)."""
    if export is None:
        export = base / "export"
        export.mkdir()
    os.chmod(export, 0o755)
    mnt = base / "mnt"
    log = base / "mount.log"
    if kind == "local":
        # The POSIX suite chmods setuid bits (ninep's policy refuses them by default).
        return start_mount(str(export), mnt, log, "--allow-setid", kind=kind, host=export)
    if kind == "memory":
        return start_mount("memory:", mnt, log, kind=kind, host=None)
    port = free_port()
    if kind == "ninep":
        server = start_ninep_server(export, port, base / "server.log")
    elif kind == "diod":
        server = start_diod(export, port, base / "diod.log")
    else:
        raise ValueError(kind)
    try:
        m = start_mount(
            f"9p://127.0.0.1:{port}{export}" if kind == "diod" else f"9p://127.0.0.1:{port}/",
            mnt,
            log,
            "--uname",
            "root",
            "--allow-setid",
            kind=kind,
            host=export,
        )
    except BaseException:
        stop(server)
        raise
    m.servers.append(server)
    return m


@pytest.fixture(scope="session")
def shared_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One host directory every kind exports (so large fixtures are built once)."""
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module", params=KINDS)
def mount(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, shared_export: Path
) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp(f"fuse-{request.param}")
    m = open_kind(request.param, base, None if request.param == "memory" else shared_export)
    try:
        yield m
    finally:
        close_mount(m)


@pytest.fixture
def work(mount: Mount, request: pytest.FixtureRequest) -> tuple[Path, Path | None]:
    name = request.node.name.split("[")[0].removeprefix("test_")[:40]
    return mount.workdir(name)


BIG_ENTRIES = 100_000


@pytest.fixture(scope="session")
def big_dir(shared_export: Path) -> str:
    """A directory of BIG_ENTRIES empty files in the shared export, made once on the host."""
    big = shared_export / "big"
    big.mkdir()
    for i in range(BIG_ENTRIES):
        os.close(os.open(big / f"entry-{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return "big"
