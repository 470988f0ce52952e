"""`ninep check-config` and `ninep serve --config` as a user runs them: real processes, real
sockets, SIGHUP."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from ninep.cli.main import main
from ninep.client import Client, ClientError

REPO = Path(__file__).resolve().parents[3]


def ninep(*args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ninep", *args], cwd=REPO, **kw)  # type: ignore[call-overload]


def test_check_config_accepts_the_example_file() -> None:
    p = subprocess.run([sys.executable, "-m", "ninep", "check-config", "contrib/exports.toml"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ok: 3 exports\n")
    assert "home: aname 'home' -> /home (mapped-xattr, read-only; local)" in p.stdout


def test_check_config_names_the_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "e.toml"
    f.write_text(f'[exports.a]\npath = "{tmp_path}"\nread_only = true\n')
    assert main(["check-config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ninep: {f}:3: exports.a.read_only: unknown key"
    f.write_text(f'[exports.a]\npath = "{tmp_path}"\n')
    assert main(["check-config", str(f)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 export\n")


def test_serve_refuses_a_bad_file_and_mixed_arguments(tmp_path: Path) -> None:
    f = tmp_path / "e.toml"
    f.write_text('[exports.a]\npath = "a"\nbogus = 1\n')
    (tmp_path / "a").mkdir()
    p = subprocess.run([sys.executable, "-m", "ninep", "serve", "--config", str(f)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"{f}:3: exports.a.bogus: unknown key" in p.stderr
    f.write_text('[exports.a]\npath = "a"\n')
    for extra in (["/tmp"], ["--readonly"], ["--security-model", "none"]):
        p = subprocess.run([sys.executable, "-m", "ninep", "serve", "--config", str(f), *extra], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, extra
        assert "not both" in p.stderr or "set this per export in the file" in p.stderr, p.stderr


def _wait_for(cond: object, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"server exited while waiting for {what}: {log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log.read_text()}")
        time.sleep(0.05)


def test_sighup_reloads_without_touching_unchanged_exports(tmp_path: Path) -> None:
    for name, text in (("keep", "kept"), ("old", "old version"), ("new", "new version"), ("added", "added")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "v").write_text(text)
    sock = tmp_path / "s.sock"
    cfg = tmp_path / "exports.toml"
    log = tmp_path / "server.log"
    head = f'[listeners]\nmain = "unix:{sock}"\n[exports.keep]\npath = "keep"\n'
    cfg.write_text(head + '[exports.chg]\npath = "old"\n[exports.gone]\npath = "old"\naname = "g"\n')
    with open(log, "wb") as logf:
        proc = ninep("serve", "--config", str(cfg), "-v", stderr=logf)
    reloads = 0

    def hup() -> None:
        nonlocal reloads
        reloads += 1
        n = reloads
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: log.read_text().count("reload") >= n, f"reload {n}", proc, log)

    try:
        _wait_for(sock.exists, "the socket", proc, log)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                keep, chg, gone = await c.attach("keep"), await c.attach("chg"), await c.attach("g")
                assert await c.read_file(keep, "v") == b"kept"
                f = await c.open_file(keep, "v")
                # Add an export, change one, remove one, while this connection stays up.
                cfg.write_text(head + '[exports.chg]\npath = "new"\n[exports.added]\npath = "added"\n')
                await trio.to_thread.run_sync(hup)
                assert await f.read() == b"kept"  # an open file of the unchanged export
                assert await c.read_file(keep, "v") == b"kept"
                assert await c.read_file(chg, "v") == b"old version"  # attached before: old export
                assert await c.read_file(gone, "v") == b"old version"  # removed, but already attached
                with pytest.raises(ClientError) as e:
                    await c.attach("g")
                assert e.value.errno == errno.ENOENT
                async with Client.connect(f"unix:{sock}") as c2:
                    assert await c2.read_file(await c2.attach("chg"), "v") == b"new version"
                    assert await c2.read_file(await c2.attach("added"), "v") == b"added"
                # A broken file keeps the running exports.
                cfg.write_text(head + '[exports.chg]\npath = "new"\nbogus = true\n')
                await trio.to_thread.run_sync(hup)
                async with Client.connect(f"unix:{sock}") as c2:
                    assert await c2.read_file(await c2.attach("added"), "v") == b"added"
                assert await c.read_file(keep, "v") == b"kept"
                await c.write_file(keep, "w", b"still writable")
                await f.close()

        trio.run(use)
        assert (tmp_path / "keep" / "w").read_bytes() == b"still writable"
        text = log.read_text()
        assert "reloaded " + str(cfg) + ": added added; removed gone; changed chg" in text
        assert f"reload of {cfg} failed, keeping the running exports: {cfg}:7: exports.chg.bogus: unknown key" in text, text
        assert "attach 'g' as root refused: no such export" in text
        # The connection that held the old exports ended: their backend is closed.
        _wait_for(lambda: "export chg: closing its old backend" in log.read_text(), "the old backend closed", proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
