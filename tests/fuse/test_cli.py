"""`ninep mount`: foreground and daemon modes, clean unmounts, options passed through, sources."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import (
    PY,
    REPO,
    free_port,
    is_mounted,
    start_mount,
    start_ninep_server,
    stop,
    unmount,
)

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def wait_unmounted(mnt: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while is_mounted(mnt):
        assert time.monotonic() < deadline, f"{mnt} still mounted"
        time.sleep(0.05)


def mount_line(mnt: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        return next(ln for ln in f if ln.split()[4] == str(mnt))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path: Path, sig: int) -> None:
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    m = start_mount(str(export), mnt, tmp_path / "log", kind="local", host=export)
    try:
        (mnt / "f").write_bytes(b"data")
        m.proc.send_signal(sig)
        assert m.proc.wait(15) == 0
        wait_unmounted(mnt)
        assert (export / "f").read_bytes() == b"data"
        assert "unmounted" in (tmp_path / "log").read_text()
    finally:
        unmount(mnt)
        stop(m.proc)


def test_fusermount_u_ends_the_process(tmp_path: Path) -> None:
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    m = start_mount(str(export), mnt, tmp_path / "log", kind="local", host=export)
    try:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert m.proc.wait(15) == 0
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)
        stop(m.proc)


def test_daemon_returns_once_mounted(tmp_path: Path) -> None:
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    mnt.mkdir()
    (export / "hello").write_text("world")
    r = subprocess.run(
        [PY, "-m", "ninep", "mount", str(export), str(mnt), "--daemon"],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        assert r.returncode == 0, r.stderr
        pid = int(r.stdout.strip())
        assert is_mounted(mnt)  # already up when the command returned
        assert (mnt / "hello").read_text() == "world"
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "daemon did not exit after unmount"
    finally:
        unmount(mnt)


def test_options_readonly_and_debug(tmp_path: Path) -> None:
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    (export / "f").write_text("x")
    m = start_mount(
        str(export),
        mnt,
        tmp_path / "log",
        "--readonly",
        "--debug",
        "-o",
        "allow_other",
        kind="local",
        host=export,
    )
    try:
        line = mount_line(mnt)
        assert "allow_other" in line and "default_permissions" in line
        assert " ro," in line or " ro " in line
        assert (mnt / "f").read_text() == "x"
        with pytest.raises(OSError) as e:
            (mnt / "g").write_text("y")
        assert e.value.errno == errno.EROFS
        log = (tmp_path / "log").read_text()
        assert "lookup(1, b'f'" in log and "read(" in log  # --debug logs every call
    finally:
        unmount(mnt)
        stop(m.proc)


def test_unix_socket_source(tmp_path: Path) -> None:
    """`unix:PATH` mounts a ninep server listening on a unix socket."""
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    (export / "over-unix").write_text("yes")
    sock = tmp_path / "9p.sock"
    server = subprocess.Popen(
        [PY, "-m", "ninep", "serve", str(export), "--listen", f"unix:{sock}"],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        m = start_mount(f"unix:{sock}", mnt, tmp_path / "log", kind="ninep", host=export)
        try:
            assert (mnt / "over-unix").read_text() == "yes"
            (mnt / "back").write_text("ok")
            assert (export / "back").read_text() == "ok"
        finally:
            unmount(mnt)
            stop(m.proc)
    finally:
        stop(server)


def test_aname_selects_subtree(tmp_path: Path) -> None:
    export, mnt = tmp_path / "e", tmp_path / "m"
    (export / "sub").mkdir(parents=True)
    (export / "sub" / "inside").write_text("deep")
    port = free_port()
    server = start_ninep_server(export, port, tmp_path / "server.log")
    try:
        m = start_mount(f"9p://127.0.0.1:{port}/sub", mnt, tmp_path / "log", kind="ninep")
        try:
            assert os.listdir(mnt) == ["inside"]
        finally:
            unmount(mnt)
            stop(m.proc)
    finally:
        stop(server)


@pytest.mark.parametrize(
    "source,why",
    [("/nonexistent/dir", "not a directory"), ("9p://", "no host")],
)
def test_bad_source_fails_fast(tmp_path: Path, source: str, why: str) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    r = subprocess.run(
        [PY, "-m", "ninep", "mount", source, str(mnt)],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert why in r.stderr
    assert not is_mounted(mnt)


def test_server_going_away_unmounts(tmp_path: Path) -> None:
    """When the 9P server disappears the mount ends (exit status 1) instead of failing every
    call forever."""
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    port = free_port()
    server = start_ninep_server(export, port, tmp_path / "server.log")
    m = start_mount(f"9p://127.0.0.1:{port}/", mnt, tmp_path / "log", kind="ninep")
    try:
        (mnt / "f").write_text("x")
        server.kill()
        server.wait(10)
        assert m.proc.wait(20) == 1
        wait_unmounted(mnt)
        assert "connection to the 9P server lost" in (tmp_path / "log").read_text()
    finally:
        unmount(mnt)
        stop(m.proc)
        stop(server)


def _wait_path(p: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 15
    while not p.exists():
        assert time.monotonic() < deadline, f"{p} never appeared"
        assert all(x.poll() is None for x in procs), "a helper exited"
        time.sleep(0.05)


def _serve_and_mount(
    tmp_path: Path, listen: str, source: str, helper: list[str] | None, ready: Path
) -> None:
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    (export / "hello").write_text("over the ring")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str]) -> None:
        out = subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=out, stderr=out))

    try:
        if helper is not None:
            spawn(helper)
            _wait_path(ready, procs)
        spawn([PY, "-m", "ninep", "serve", str(export), "--listen", listen])
        if helper is None:
            _wait_path(ready, procs)
        for attempt in range(3):  # the back-end may still be announcing itself
            try:
                m = start_mount(source, mnt, tmp_path / f"log{attempt}", kind="ninep", host=export)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(1)
        try:
            assert (mnt / "hello").read_text() == "over the ring"
            (mnt / "back").write_bytes(b"z" * 300_000)
            assert (export / "back").read_bytes() == b"z" * 300_000
        finally:
            unmount(mnt)
            stop(m.proc)
    finally:
        for p in reversed(procs):
            stop(p)


def test_vhost_user_source(tmp_path: Path) -> None:
    """`vhost-user:SOCK`: the mount plays VMM and guest driver to a ninep vhost-user back-end."""
    sock = tmp_path / "vu.sock"
    _serve_and_mount(tmp_path, f"vhost-user:{sock}", f"vhost-user:{sock}", None, sock)


def test_xen_source(tmp_path: Path) -> None:
    """`xen:DOMID/DEVID`: the mount plays a guest's 9pfs frontend on the emulated Xen platform."""
    xs = tmp_path / "xs.sock"
    addr = f"xen:1/0,xenstore={xs}"
    emu = [PY, "-m", "ninep", "xenstore-emu", "--socket", str(xs)]
    _serve_and_mount(tmp_path, addr, addr, emu, xs)


def test_proxy_security_model(tmp_path: Path) -> None:
    """`--security-model proxy`: the confined helper (forked before trio starts) serves the mount."""
    export, mnt = tmp_path / "e", tmp_path / "m"
    export.mkdir()
    (export / "in").write_text("from host")
    m = start_mount(str(export), mnt, tmp_path / "log", "--security-model", "proxy", kind="local")
    try:
        assert (mnt / "in").read_text() == "from host"
        (mnt / "out").write_text("through the helper")
        assert (export / "out").read_text() == "through the helper"
        assert "proxy helper" in (tmp_path / "log").read_text()
    finally:
        unmount(mnt)
        stop(m.proc)
