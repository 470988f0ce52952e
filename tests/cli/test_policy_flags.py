"""The operation-policy flags of `ninep serve` and `ninep mount` as a user runs them: a device
node or a setuid bit refused by default (with its log line on stderr / in the log file) and
allowed with --allow-devices / --allow-setid. The refusals themselves, per model, are in
tests/fs_backends/proxy/test_hostile_clients.py."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ninep.client import Client, ClientError
from tests.cli.test_serve import REPO, _serve
from tests.kits.processes import wait_for_socket

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real device nodes need root")


@pytest.mark.parametrize("flags", [(), ("--allow-devices", "--allow-setid")], ids=["default", "allowed"])
def test_serve_flags(tmp_path: Path, flags: tuple[str, ...]) -> None:
    export = tmp_path / "export"
    export.mkdir()
    sock = tmp_path / "9p.sock"
    proc = _serve(str(export), "--listen", f"unix:{sock}", "--security-model", "passthrough", *flags)
    errs: list[int] = []
    try:
        wait_for_socket(sock, proc, 10)

        async def use() -> None:
            async with Client.connect(f"unix:{sock}") as c:
                root = await c.attach()
                for coro in (c.mknod(root, "chr", stat.S_IFCHR | 0o600, 1, 3),
                             c.mknod(root, "sgid", stat.S_IFIFO | 0o2600)):
                    try:
                        await coro
                        errs.append(0)
                    except ClientError as e:
                        errs.append(e.errno or -1)

        trio.run(use)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if flags:
        assert errs == [0, 0]
        assert stat.S_ISCHR(os.lstat(export / "chr").st_mode)
        assert os.lstat(export / "sgid").st_mode & stat.S_ISGID
        assert "refused" not in err
    else:
        assert errs == [errno.EPERM, errno.EPERM]
        assert sorted(os.listdir(export)) == []
        # Logged even without -v: a refusal is a warning.
        assert "refused Tmknod 'chr' by uid 0 (root): EPERM: char device nodes not allowed" in err
        assert "refused Tmknod 'sgid' by uid 0 (root): EPERM: setuid/setgid mode 2600" in err


@pytest.mark.parametrize("flags", [(), ("--allow-devices", "--allow-setid")], ids=["default", "allowed"])
def test_mount_flags(tmp_path: Path, flags: tuple[str, ...]) -> None:
    pytest.importorskip("pyfuse3")
    from tests.fuse.conftest import close_mount, start_mount

    export, mnt, log = tmp_path / "export", tmp_path / "mnt", tmp_path / "mount.log"
    export.mkdir()
    m = start_mount(str(export), mnt, log, "--security-model", "passthrough", *flags, kind="local", host=export)
    try:
        if flags:
            os.mknod(mnt / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            (mnt / "f").write_bytes(b"x")
            os.chmod(mnt / "f", 0o4755)
            assert stat.S_ISCHR(os.lstat(export / "chr").st_mode)
            assert os.lstat(export / "f").st_mode & stat.S_ISUID
        else:
            with pytest.raises(PermissionError):
                os.mknod(mnt / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            (mnt / "f").write_bytes(b"x")
            with pytest.raises(PermissionError):
                os.chmod(mnt / "f", 0o4755)
            assert sorted(os.listdir(export)) == ["f"] and not os.lstat(export / "f").st_mode & stat.S_ISUID
    finally:
        close_mount(m)
    text = log.read_text()
    assert ("refused mknod 'chr'" in text) == (not flags), text


def test_help_lists_the_flags() -> None:
    for cmd in ("serve", "mount"):
        out = subprocess.run([sys.executable, "-m", "ninep", cmd, "--help"], capture_output=True, text=True, cwd=REPO)
        for flag in ("--allow-devices", "--allow-setid", "--allow-privileged-xattrs", "--readonly"):
            assert flag in out.stdout, (cmd, flag)
