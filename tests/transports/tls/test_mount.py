"""`ninep mount` of a ninep server over mutual TLS, through FUSE (real processes, real mount)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fuse.conftest import (
    _WHY_NOT,
    PY,
    REPO,
    close_mount,
    free_port,
    start_mount,
    stop,
    wait_port,
)

from .conftest import PKI, subject_of

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or "")]


def _tls_server(pki: PKI, export: Path, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [PY, "-m", "ninep", "serve", str(export), "--listen", f"tcp:127.0.0.1:{port}", "-v",
           "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.pem"),
           "--tls-client-ca", pki.path("ca.pem"), *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc


def test_mount_over_mutual_tls_with_forced_uid(pki: PKI, tmp_path: Path) -> None:
    export, mnt = tmp_path / "export", tmp_path / "mnt"
    export.mkdir()
    (export / "hello.txt").write_text("over TLS\n")
    port = free_port()
    alice = subject_of(pki.path("alice.pem"))
    server = _tls_server(pki, export, port, tmp_path / "server.log", "--tls-map", f"{alice}=1234")
    try:
        m = start_mount(f"9p://127.0.0.1:{port}/", mnt, tmp_path / "mount.log", "--uname", "root",
                        "--tls-ca", pki.path("ca.pem"), "--tls-cert", pki.path("alice.pem"), kind="ninep",
                        host=export)
        m.servers.append(server)
        try:
            assert (mnt / "hello.txt").read_text() == "over TLS\n"
            data = os.urandom(3 * 1024 * 1024)
            (mnt / "big.bin").write_bytes(data)
            assert (export / "big.bin").read_bytes() == data
            # Root through the mount, but the certificate says alice: the server made it 1234's.
            assert (export / "big.bin").stat().st_uid == 1234
        finally:
            close_mount(m)
    finally:
        stop(server)
    assert f"({alice})" in (tmp_path / "server.log").read_text()


def test_mount_without_client_certificate_fails_cleanly(pki: PKI, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    port = free_port()
    server = _tls_server(pki, export, port, tmp_path / "server.log")
    try:
        log = tmp_path / "mount.log"
        with pytest.raises(RuntimeError, match="mount of .* failed"):
            start_mount(f"tcp:127.0.0.1:{port}", tmp_path / "mnt", log, "--tls-ca", pki.path("ca.pem"))
        assert "mount failed" in log.read_text()
        with pytest.raises(RuntimeError):  # nor does it trust a server signed by another CA
            start_mount(f"tcp:127.0.0.1:{port}", tmp_path / "mnt2", tmp_path / "mount2.log",
                        "--tls-ca", pki.path("rogue-ca.pem"), "--tls-cert", pki.path("alice.pem"))
        assert "certificate verify failed" in (tmp_path / "mount2.log").read_text()
    finally:
        stop(server)
    assert "peer did not return a certificate" in (tmp_path / "server.log").read_text()
