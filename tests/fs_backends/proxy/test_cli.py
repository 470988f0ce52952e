"""`ninep proxy-helper` started by hand on a socket fd, as the brief for operators describes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from fs_backends.base import Cred
from fs_backends.proxy import wire as W
from fs_backends.proxy.backend import Connection

REPO = Path(__file__).resolve().parents[3]


def test_ninep_proxy_helper_by_hand(site: tuple[Path, Path]) -> None:
    export, _ = site
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        [sys.executable, "-m", "ninep", "proxy-helper", "--socket-fd", str(theirs.fileno()),
         "--model", "none", str(export)],
        pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    try:
        c = Connection(mine, p.pid, 1)
        c.handshake()
        assert c.facts["confinement"] == "userns" and c.facts["model"] == "none"
        mine.send(W.message(W.ATTACH, 1, W.Writer().str("").cred(Cred(0, 0, "root")).body()))
        while True:
            h, body = W.parse(mine.recv(W.HEADER.size + W.MAX_REPLY))
            if h.op != W.CHILD:
                break
        r = W.Reader(body)
        assert h.rid == 1 and r.u32() == 0 and r.u32() > 0
    finally:
        mine.close()
        assert p.wait(timeout=20) == 0  # the helper exits when its socket closes


def test_help_lists_proxy_options() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "ninep", "serve", "--help"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    assert "--proxy-model" in out and "--user" in out
    out = subprocess.run([sys.executable, "-m", "ninep", "proxy-helper", "--help"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    assert "--socket-fd" in out and "--model" in out
