"""The exports file's [tls] and [[tls.client]] sections in a real `ninep serve --config`."""

from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from ninep.client import Client, ClientError
from transports.options import ConnectOptions

from .conftest import PKI, subject_of

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exports_file_tls_and_client_rules(pki: PKI, tmp_path: Path) -> None:
    port = _free_port()
    alice = subject_of(pki.path("alice.pem"))
    q = json.dumps  # a TOML basic string is a JSON string for these values
    conf = tmp_path / "exports.toml"
    conf.write_text(f"""
[listeners]
net = "tcp:127.0.0.1:{port}"

[exports.alice]
path = "memory:"
aname = "alice"

[exports.shared]
path = "memory:"
aname = "shared"

[tls]
cert = {q(pki.path("server.pem"))}
key = {q(pki.path("server.pem"))}
client_ca = {q(pki.path("ca.pem"))}

[[tls.client]]
subject = {q(alice)}
export = "alice"
uid = 1234
""")
    proc = subprocess.Popen([sys.executable, "-m", "ninep", "serve", "--config", str(conf), "-v"], cwd=REPO,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not listen"
                time.sleep(0.05)

        async def use() -> None:
            with trio.fail_after(30):
                async with Client.connect(f"tcp:127.0.0.1:{port}", options=ConnectOptions(tls=pki.client())) as c:
                    root = await c.attach("alice", "root", 0)
                    await c.write_file(root, "f", b"x")
                    fid = await c.walk_path(root, "f")
                    assert (await c.getattr(fid)).uid == 1234
                    with pytest.raises(ClientError) as e:
                        await c.attach("shared", "root", 0)
                    assert e.value.errno == errno.EACCES
                # bob has no rule; a client without a certificate does not get in at all.
                async with Client.connect(f"tcp:127.0.0.1:{port}", options=ConnectOptions(tls=pki.client("bob"))) as c:
                    await c.attach("shared", "root", 0)
                with pytest.raises(OSError):
                    async with Client.connect(f"tcp:127.0.0.1:{port}", options=ConnectOptions(tls=pki.client(None))) as c:
                        await c.attach("shared")

        trio.run(use)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "with TLS" in err and "peer did not return a certificate" in err
    assert f"({alice}): attach 'shared' as root refused: this client may attach only export alice" in err, err
