"""Host processes holding POSIX locks while a guest boots, for the guest's F_GETLK steps.

    python -m tests.guest.lockholder fcntl PATH r|w START LEN [PATH r|w START LEN ...]
    python -m tests.guest.lockholder 9p ADDRESS NAME r|w START LEN PROC_ID CLIENT_ID

`fcntl` takes classic fcntl locks the way any host program does (the server knows nothing of
them); `9p` connects to a ninep server (e.g. unix:SOCK), creates NAME in the export root if it
is missing and takes a Tlock as PROC_ID/CLIENT_ID, so the lock belongs to another 9P connection
than the guest's. Both print "locked" once the locks are held and keep them until stdin closes.
`holding()` runs one for the length of a `with` block.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fcntl_locks(args: Sequence[str]) -> list[int]:
    fds = []
    for i in range(0, len(args), 4):
        path, kind, start, length = args[i], args[i + 1], int(args[i + 2]), int(args[i + 3])
        fd = os.open(path, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_SH if kind == "r" else fcntl.LOCK_EX, length, start)
        fds.append(fd)
    return fds


async def _ninep_lock(address: str, name: str, kind: str, start: int, length: int, proc_id: int,
                      client_id: str) -> None:
    import trio

    from ninep.client import Client, ClientError
    from ninep.protocol.numbers import (
        L_O_CREAT,
        L_O_RDWR,
        LOCK_SUCCESS,
        LOCK_TYPE_RDLCK,
        LOCK_TYPE_WRLCK,
    )

    async with Client.connect(address) as c:
        root = await c.attach()
        try:
            f, _ = await c.walk(root, [name])
            await c.lopen(f, L_O_RDWR)
        except ClientError:  # not there yet (a memory: export)
            f, _ = await c.walk(root, [])
            await c.lcreate(f, name, L_O_RDWR | L_O_CREAT, 0o644)
        type_ = LOCK_TYPE_RDLCK if kind == "r" else LOCK_TYPE_WRLCK
        status = await c.lock(f, type_, start, length, proc_id=proc_id, client_id=client_id)
        if status != LOCK_SUCCESS:
            raise SystemExit(f"Tlock answered status {status}")
        print("locked", flush=True)
        # Hold the connection (and so the lock) until our stdin closes.
        await trio.to_thread.run_sync(sys.stdin.read)


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["fcntl"]:
        fds = _fcntl_locks(argv[1:])
        print("locked", flush=True)
        sys.stdin.read()
        for fd in fds:
            os.close(fd)
    elif argv[:1] == ["9p"] and len(argv) == 8:
        import trio

        a = argv[1:]
        trio.run(_ninep_lock, a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), a[6])
    else:
        raise SystemExit(__doc__)


@contextlib.contextmanager
def holding(*args: object) -> Iterator[int]:
    """Runs `lockholder ARGS...` until the block ends; yields its pid once the locks are held."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "tests.guest.lockholder", *map(str, args)],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "locked":
            proc.kill()
            raise RuntimeError(f"lockholder {args} did not lock (exit {proc.wait()}, said {line!r})")
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
