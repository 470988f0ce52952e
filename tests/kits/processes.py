"""Waiting for a server process the tests started (`ninep serve`, `ninep xenstore-emu`...)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_socket(path: Path | str, proc: subprocess.Popen[str] | subprocess.Popen[bytes],
                    timeout: float = 30, log: Path | None = None) -> None:
    """Returns once `path` exists; fails with what the process said (its piped stderr, or
    `log`) if it exits first, or when `timeout` seconds pass."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            said = proc.stderr.read() if proc.stderr else (log.read_text(errors="replace") if log else "")
            raise AssertionError(f"server exited with {proc.returncode} before {path} appeared: {said!s}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
