"""`ninep serve` as a user runs it: a real process, real sockets, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ninep.client import Client, ClientError
from ninep.protocol.numbers import L_O_RDONLY, L_O_WRONLY
from tests.kits.processes import wait_for_socket

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ninep", "serve", *args], cwd=REPO,
                            stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.fixture
def export(tmp_path: Path) -> Path:
    e = tmp_path / "export"
    e.mkdir()
    (e / "greeting.txt").write_text("hello over 9P\n")
    return e


def test_serve_unix_read_write_and_sigterm_shuts_down_cleanly(export: Path, tmp_path: Path) -> None:
    sock = tmp_path / "ninep.sock"
    proc = _serve(str(export), "--listen", f"unix:{sock}", "-v")
    try:
        wait_for_socket(sock, proc, 10)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                assert await c.read_file(root, "greeting.txt") == b"hello over 9P\n"
                await c.write_file(root, "new.txt", b"written by a client")

        trio.run(use)
        assert (export / "new.txt").read_bytes() == b"written by a client"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "shutting down" in err
        assert not sock.exists(), "the unix socket is removed at shutdown"
    finally:
        proc.kill()
        proc.wait()


def test_readonly_refuses_changes_with_erofs(export: Path, tmp_path: Path) -> None:
    sock = tmp_path / "ro.sock"
    proc = _serve(str(export), "--listen", f"unix:{sock}", "--readonly")
    try:
        wait_for_socket(sock, proc, 10)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                assert await c.read_file(root, "greeting.txt") == b"hello over 9P\n"
                with pytest.raises(ClientError) as e:
                    await c.write_file(root, "nope.txt", b"x")
                assert e.value.errno == 30  # EROFS
                with pytest.raises(ClientError) as e:
                    await c.open_file(root, "greeting.txt", L_O_WRONLY)
                assert e.value.errno == 30

        trio.run(use)
        assert not (export / "nope.txt").exists()
    finally:
        proc.kill()
        proc.wait()


def test_msize_option_clamps_negotiation(export: Path, tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    proc = _serve(str(export), "--listen", f"unix:{sock}", "--msize", "64K")
    try:
        wait_for_socket(sock, proc, 10)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}", msize=1 << 20) as c:
                assert c.msize == 64 * 1024

        trio.run(use)
    finally:
        proc.kill()
        proc.wait()


def test_fd_pair_serves_stdin_stdout_and_exits_when_peer_closes(export: Path) -> None:
    """`--listen fd:0,1`: one connection on inherited fds, as QEMU chardevs and trans=fd use."""
    import socket

    ours, theirs = socket.socketpair()
    proc = _serve(str(export), "--listen", "fd:0,1", stdin=theirs.fileno(), stdout=theirs.fileno())
    theirs.close()
    try:
        async def use() -> None:
            from transports.stream import FdPairChannel

            chan = FdPairChannel(ours.fileno(), ours.fileno())
            async with Client.connect(chan) as c:
                root = await c.attach()
                f = await c.open_file(root, "greeting.txt", L_O_RDONLY)
                assert await f.read() == b"hello over 9P\n"
                await f.close()

        trio.run(use)
        ours.close()
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_trace_logs_each_request_with_latency(export: Path, tmp_path: Path) -> None:
    sock = tmp_path / "t.sock"
    proc = _serve(str(export), "--listen", f"unix:{sock}", "--trace")
    try:
        wait_for_socket(sock, proc, 10)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                await c.getattr(root)

        trio.run(use)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "<- Tgetattr(" in err
        assert "-> Rgetattr(" in err and " ms)" in err
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("address", ["bogus:1", "tcp:127.0.0.1:notaport", "tcp:0.0.0.0:5999"])
def test_bad_or_unsafe_listen_address_is_refused_with_a_message(export: Path, address: str) -> None:
    proc = _serve(str(export), "--listen", address)
    assert proc.wait(timeout=15) == 2
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "ninep:" in err


def test_missing_export_is_a_clear_error(tmp_path: Path) -> None:
    proc = _serve(str(tmp_path / "nope"), "--listen", f"unix:{tmp_path}/x.sock")
    assert proc.wait(timeout=15) != 0
    assert b"not a directory" in (proc.stderr.read() if proc.stderr else b"")


def test_python_dash_m_and_console_script_agree() -> None:
    out = subprocess.run([sys.executable, "-m", "ninep", "serve", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--listen" in out.stdout
    exe = Path(sys.executable).with_name("ninep")
    if exe.exists():  # installed by `pip install -e .`
        out2 = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True)
        assert out2.stdout == out.stdout


def test_mapped_xattr_fmode_dmode_set_host_modes_and_keep_client_modes(tmp_path: Path) -> None:
    export = tmp_path / "mapped"
    export.mkdir()
    sock = tmp_path / "mapped.sock"
    proc = _serve(str(export), "--listen", f"unix:{sock}", "--security-model", "mapped-xattr",
                  "--fmode", "0640", "--dmode", "0750")
    try:
        wait_for_socket(sock, proc, 10)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                await c.write_file(root, "f", b"x", mode=0o4755)
                await c.mkdir(root, "d", 0o700)
                f, _ = await c.walk(root, ["f"])
                assert (await c.getattr(f)).mode & 0o7777 == 0o4755  # what the client asked for

        trio.run(use)
        assert (export / "f").stat().st_mode & 0o7777 == 0o640  # what the host keeps
        assert (export / "d").stat().st_mode & 0o7777 == 0o750
    finally:
        proc.kill()
        proc.wait()


def test_fmode_with_a_model_that_has_no_use_for_it_is_refused(export: Path, tmp_path: Path) -> None:
    proc = _serve(str(export), "--listen", f"unix:{tmp_path}/x.sock", "--security-model", "none", "--fmode", "0644")
    assert proc.wait(timeout=15) != 0
    assert b"fmode" in (proc.stderr.read() if proc.stderr else b"")
