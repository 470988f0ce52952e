"""`ninep serve` under systemd socket activation, and with TLS, as a real process.

The test plays the service manager: it creates the listening sockets, and a small wrapper puts
them at fds 3, 4 and sets LISTEN_PID to its own pid before it execs `ninep serve` (the pid stays
the same across exec, as with systemd).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from ninep.client import Client
from tests.transports.tls.conftest import PKI, make_pki, subject_of
from transports.activation import take_inherited_sockets
from transports.options import ConnectOptions

REPO = Path(__file__).resolve().parents[2]

#: argv[1] = comma-separated fds to place at 3, 4, …; the rest is the command to exec.
WRAPPER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way: a source may be 3 or 4
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable
for fd in high + [fd for fd in fds if fd >= 3 + len(fds)]:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@contextmanager
def activated(socks: list[socket.socket], *serve_args: str, names: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    fds = [s.fileno() for s in socks]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), "-m", "ninep", "serve", *serve_args, "-v"],
        cwd=REPO, env=env, pass_fds=fds, stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _read_greeting(address: str) -> None:
    async with Client.connect(address) as c:
        root = await c.attach()
        assert await c.read_file(root, "greeting.txt") == b"hello from an activated server\n"


def _listening_tcp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(16)
    return s


def _listening_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


@pytest.fixture
def export(tmp_path: Path) -> Path:
    e = tmp_path / "export"
    e.mkdir()
    (e / "greeting.txt").write_text("hello from an activated server\n")
    return e


def test_serves_inherited_unix_and_tcp_sockets(export: Path, tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    unix, tcp = _listening_unix(path), _listening_tcp()
    port = tcp.getsockname()[1]
    with unix, tcp, activated([unix, tcp], str(export), names="files:admin") as proc:
        # Connections made before the server runs wait in the backlog, as under systemd.
        async def use() -> None:
            # Bounded: if the server died, the connection would sit in our own copy's backlog.
            for address in (f"unix:{path}", f"tcp:127.0.0.1:{port}"):
                with trio.fail_after(30):
                    await _read_greeting(address)

        trio.run(use)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert "listening on systemd:files (unix:" in err and f"listening on systemd:admin (tcp:127.0.0.1:{port})" in err, err
    assert "tcp:127.0.0.1:5640" not in err, "no default listener when sockets are inherited"
    assert path.exists(), "the service manager's socket path is left alone"


def test_inherited_tcp_socket_gets_tls_and_tls_map(export: Path, tmp_path: Path) -> None:
    pki: PKI = make_pki(tmp_path)
    tcp = _listening_tcp()
    port = tcp.getsockname()[1]
    alice = subject_of(pki.path("alice.pem"))
    args = ["memory:", "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.pem"),
            "--tls-client-ca", pki.path("ca.pem"), "--tls-map", f"{alice}=2000"]
    with tcp, activated([tcp], *args) as proc:
        async def use() -> None:
            with trio.fail_after(30):
                await _write_as_alice()
            with pytest.raises(OSError):  # plain 9P is not spoken there
                async with Client.connect(f"tcp:127.0.0.1:{port}") as c:
                    await c.attach()

        async def _write_as_alice() -> None:
            async with Client.connect(f"tcp:127.0.0.1:{port}", options=ConnectOptions(tls=pki.client("alice"))) as c:
                root = await c.attach("", "root", 0)
                await c.write_file(root, "f", b"x")
                fid = await c.walk_path(root, "f")
                assert (await c.getattr(fid)).uid == 2000

        trio.run(use)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert f"({alice})" in err and "TLS handshake refused" in err, err


def test_inherited_non_loopback_tcp_without_tls_is_refused(export: Path) -> None:
    tcp = _listening_tcp("0.0.0.0")
    with tcp, activated([tcp], str(export)) as proc:
        assert proc.wait(15) == 2
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert "systemd:3" in err and "--insecure" in err, err


def test_activation_variables_are_consumed_and_only_for_this_pid() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert take_inherited_sockets(env) == []
    assert env == {"PATH": "/bin"}, "children must not see sockets meant for someone else either"
    assert take_inherited_sockets({"PATH": "/bin"}) == []


@pytest.mark.parametrize("tls_args", [["--tls-cert", "{junk}", "--tls-key", "{junk}"], ["--tls-client-ca", "{junk}"],
                                      ["--tls-map", "CN=a=1"]],
                         ids=["unreadable-cert", "ca-without-cert", "map-without-client-ca"])
def test_bad_tls_options_end_start_up_with_a_message(tmp_path: Path, tls_args: list[str]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM")
    args = [a.format(junk=junk) for a in tls_args]
    proc = subprocess.run([sys.executable, "-m", "ninep", "serve", "memory:", "--listen", "tcp:127.0.0.1:0", *args],
                          cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert b"ninep: TLS" in proc.stderr or b"needs --tls-" in proc.stderr, proc.stderr
