"""fcntl(F_GETLK) in a real Linux guest (issue 20, item 1): tests/guest/getlk.sh asks about an
unlocked file, files a host process holds read / write POSIX locks on, a file locked through
another 9P connection (the host's ninep.client on the server's unix socket), a lock of another
guest process through the second mount, and the asking process's own lock.

Linux sends every such question as a Tgetlock of type UNLCK; ninep must answer the conflicting
lock of another owner. Runs over trans=fd for each security model, the proxy and a memory:
export, and against QEMU's own server (the control: it keeps no locks and always answers
UNLCK, so getlk.sh expects "unlck" from it where a real lock table reports the lock). The
trans=virtio run is in tests/transports/virtio/test_guest_virtio.py. One short boot each.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.guest import guestvm
from tests.guest.lockholder import holding

pytestmark = [pytest.mark.guest, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("getlk.sh")
MSIZE = 512000
RUN_TIMEOUT = 240.0
#: The proc_id / client_id the other 9P connection locks lkconn as (getlk.sh expects pid -4242).
CONN_PROC_ID = 4242
STEPS_ALL = ["getlk-free", "getlk-self", "getlk-mount", "getlk-hostrd", "getlk-hostwr", "getlk-conn"]


def seed(export: Path) -> None:
    for name in ("lkrd", "lkwr"):
        (export / name).write_bytes(b"x" * 200)


@contextmanager
def host_locks(export: Path) -> Iterator[int]:
    """A host process holding a read lock on lkrd [10,30) and a write lock on lkwr from 100 to
    end of file for the whole boot; yields its pid."""
    with holding("fcntl", export / "lkrd", "r", 10, 20, export / "lkwr", "w", 100, 0) as pid:
        yield pid


def conn_lock(sock: Path) -> contextlib.AbstractContextManager[int]:
    """Another 9P connection (to ninep's unix socket) write-locking lkconn [5,15) as proc_id 4242."""
    return holding("9p", f"unix:{sock}", "lkconn", "w", 5, 10, CONN_PROC_ID, "host-conn")


def check(run: guestvm.GuestRun, steps: list[str], log: Path | None = None, kernel: str = "") -> None:
    missing = [s for s in ["mount /mnt", "mount /mnt2", *steps] if s not in run.oks]
    if run.fails or missing or run.rc != 0:
        lines = [f"{run.setup}: {len(run.fails)} FAIL, missing {missing}, rc {run.rc}"]
        lines += [f"  FAIL {f}" for f in run.fails]
        if log is not None and log.exists():
            lines.append("server log tail:\n" + "\n".join(log.read_text().splitlines()[-30:]))
        lines.append("console tail:\n" + run.console_tail(40))
        pytest.fail("\n".join(lines), pytrace=False)
    info = [ln for ln in run.lines if ln.startswith("info ")]
    print(f"{run.setup} (Linux {kernel}): {len(steps)} steps ok, boot {run.boot_seconds:.1f} s, job {run.job_seconds:.1f} s; {info}")


def test_qemu_control(kernel_image: guestvm.GuestImage, accel: guestvm.Accel, tmp_path: Path) -> None:
    """QEMU's server: F_GETLK works and answers F_UNLCK everywhere (no lock table, no other
    connection to lock through), which getlk.sh expects with QEMU=1."""
    export = tmp_path / "export"
    export.mkdir()
    seed(export)
    with host_locks(export) as pid:
        run = guestvm.run_job(kernel_image, guestvm.qemu_local(export, "mapped-xattr", MSIZE), JOB.read_text(),
                              {"QEMU": "1", "CONN": "0", "HOSTPID": str(pid)}, timeout=RUN_TIMEOUT,
                              accel=accel, log=tmp_path / "console.log")
    check(run, [s for s in STEPS_ALL if s != "getlk-conn"], kernel=kernel_image.kernel_version)


# (export kind, security model): a host directory under each model, the proxy helper, memory:.
SERVERS = [("dir", m) for m in ("passthrough", "none", "mapped-xattr", "mapped-file", "proxy")] + [("memory", None)]


@pytest.mark.parametrize(("kind", "model"), SERVERS, ids=[m or k for k, m in SERVERS])
def test_ninep_trans_fd(kernel_image: guestvm.GuestImage, accel: guestvm.Accel, tmp_path: Path,
                        kind: str, model: str | None) -> None:
    sock = tmp_path / "ninep.sock"
    log = tmp_path / "server.log"
    export = tmp_path / "export"
    export.mkdir()
    seed(export)
    env = {"CONN": "1"}
    steps = list(STEPS_ALL)
    with ExitStack() as stack:
        if kind == "memory":
            env["HOST"] = "0"
            steps = [s for s in steps if not s.startswith("getlk-host")]
        else:
            env["HOSTPID"] = str(stack.enter_context(host_locks(export)))
        stack.enter_context(guestvm.ninep_server(ROOT, "memory:" if kind == "memory" else export, sock, model,
                                                 MSIZE, log=log, python=sys.executable))
        stack.enter_context(conn_lock(sock))
        run = guestvm.run_job(kernel_image, guestvm.virtio_serial_fd(f"ninep-{model or kind}", [sock, sock], MSIZE),
                              JOB.read_text(), env, timeout=RUN_TIMEOUT, accel=accel,
                              log=tmp_path / "console.log")
    check(run, steps, log, kernel_image.kernel_version)


def test_ninep_trans_fd_cache_loose(kernel_image: guestvm.GuestImage, accel: guestvm.Accel,
                                    tmp_path: Path) -> None:
    """The same with the main mount cache=loose (the guest caches pages and attributes; locks
    still go to the server): passthrough only, the lock path does not depend on the model."""
    sock = tmp_path / "ninep.sock"
    log = tmp_path / "server.log"
    export = tmp_path / "export"
    export.mkdir()
    seed(export)
    with host_locks(export) as pid, guestvm.ninep_server(ROOT, export, sock, "passthrough", MSIZE, log=log,
                                                         python=sys.executable), conn_lock(sock):
        setup = guestvm.virtio_serial_fd("ninep-passthrough-loose", [sock, sock], MSIZE)
        setup.mounts[0].options = setup.mounts[0].options.replace("cache=none", "cache=loose")
        run = guestvm.run_job(kernel_image, setup, JOB.read_text(), {"HOSTPID": str(pid)},
                              timeout=RUN_TIMEOUT, accel=accel, log=tmp_path / "console.log")
    check(run, STEPS_ALL, log, kernel_image.kernel_version)
    # 6.1 shows the mode as "loose", 7.x as the cache flags (CACHE_LOOSE = 0xf)
    mnt = [ln for ln in run.lines if ln.startswith("info mount ") and " /mnt 9p " in ln]
    assert mnt and any(w in mnt[0] for w in (",loose,", "cache=0xf")), mnt
