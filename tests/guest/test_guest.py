"""A real Linux guest mounts the export with its kernel 9p client and runs tests/guest/job.sh.

The job runs against QEMU's own 9p server (the control: a step failing there is a wrong test)
and against ninep over trans=fd (virtio-serial port -> unix socket) for each security model,
one boot per server/model with every step in that boot. After the guest powers off, the host
checks what it left in keep/: contents, times, xattrs and ownership as the model stores them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import sys
import time
from pathlib import Path

import pytest

from tests.guest import guestvm

pytestmark = [pytest.mark.guest, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("job.sh")
MSIZE = 512000
RUN_TIMEOUT = 360.0
# Steps that need files the host put in the export before boot (a memory: export has none).
SEEDED = {"readdir", "times"}


def job_steps() -> list[str]:
    m = re.search(r"^for s in (.*?); do$", JOB.read_text(), re.M | re.S)
    assert m, "job.sh lost its step list"
    return m.group(1).replace("\\\n", " ").split() + ["cleanup"]


def run_and_check(run: guestvm.GuestRun, expect: list[str], server_log: Path | None = None) -> None:
    missing = [s for s in expect if s not in run.oks]
    if run.fails or missing or run.rc != 0:
        lines = [f"{run.setup} ({run.accel}): {len(run.fails)} FAIL, missing {missing}, rc {run.rc}"]
        lines += [f"  FAIL {f}" for f in run.fails]
        if server_log is not None and server_log.exists():
            lines.append("server log tail:\n" + "\n".join(server_log.read_text().splitlines()[-30:]))
        lines.append("console tail:\n" + run.console_tail(40))
        pytest.fail("\n".join(lines), pytrace=False)


def reported_md5(run: guestvm.GuestRun) -> dict[str, str]:
    out = {}
    for line in run.lines:
        parts = line.split()
        if parts[:2] == ["info", "md5"] and len(parts) == 4:
            out[parts[2]] = parts[3]
    return out


def check_host_side(export: Path, run: guestvm.GuestRun, model: str) -> None:
    """What the guest wrote must be on the host as the security model stores it."""
    import hashlib

    small = (export / "keep/small").stat()  # before reading it: the read moves atime
    md5s = reported_md5(run)
    assert set(md5s) >= {"keep/small", "keep/1m", "keep/overmsize", "keep/sparse"}, md5s
    for rel, digest in md5s.items():
        assert hashlib.md5((export / rel).read_bytes()).hexdigest() == digest, rel
    assert (small.st_atime_ns, small.st_mtime_ns) == (1300000000 * 10**9, 1300000001 * 10**9)
    assert os.getxattr(export / "keep/small", "user.kept") == b"kept-value"
    owned = export / "keep/owned"
    if model in ("passthrough", "none"):
        st = owned.stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    elif model == "mapped-xattr":
        uid = struct.unpack("<I", os.getxattr(owned, "user.virtfs.uid"))[0]
        gid = struct.unpack("<I", os.getxattr(owned, "user.virtfs.gid"))[0]
        assert (uid, gid) == (1234, 5678)
    elif model == "mapped-file":
        meta = (export / "keep/.virtfs_metadata/owned").read_text()
        assert "virtfs.uid=1234" in meta and "virtfs.gid=5678" in meta, meta


def make_export(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    guestvm.seed_export(export)
    return export


def test_qemu_control(guest_image: guestvm.GuestImage, accel: guestvm.Accel, tmp_path: Path) -> None:
    """QEMU's server under mapped-xattr: every step must pass (else the step is wrong).

    mapped-xattr rather than passthrough: bookworm's QEMU 7.2 refuses mkfifo under passthrough
    (its CVE-2023-2861 fix rejects the O_PATH open of the new fifo while setting its mode).
    """
    export = make_export(tmp_path)
    run = guestvm.run_job(guest_image, guestvm.qemu_local(export, "mapped-xattr", MSIZE),
                          JOB.read_text(), {"MSIZE": str(MSIZE)}, timeout=RUN_TIMEOUT,
                          accel=accel, log=tmp_path / "console.log")
    print(f"qemu control: boot {run.boot_seconds:.1f} s, job {run.job_seconds:.1f} s ({accel.name})")
    run_and_check(run, ["mount /mnt", "mount /mnt2", *job_steps()])
    check_host_side(export, run, "mapped-xattr")


def _ninep_run(guest_image: guestvm.GuestImage, accel: guestvm.Accel, tmp_path: Path,
               export: str, model: str | None, env: dict[str, str]) -> tuple[guestvm.GuestRun, Path]:
    sock = tmp_path / "ninep.sock"
    log = tmp_path / "server.log"
    # The job checks POSIX behaviour, a setuid chmod included (QEMU allows it): ninep's policy
    # refuses that under passthrough/none unless asked.
    with guestvm.ninep_server(ROOT, export, sock, model, MSIZE, log=log, python=sys.executable,
                              extra=("--allow-setid",)):
        run = guestvm.run_job(guest_image, guestvm.virtio_serial_fd("ninep", [sock, sock], MSIZE),
                              JOB.read_text(), {"MSIZE": str(MSIZE), **env}, timeout=RUN_TIMEOUT,
                              accel=accel, log=tmp_path / "console.log")
    print(f"ninep {export if export == 'memory:' else model}: boot {run.boot_seconds:.1f} s, "
          f"job {run.job_seconds:.1f} s ({accel.name})")
    return run, log


def test_ninep_memory(guest_image: guestvm.GuestImage, accel: guestvm.Accel, tmp_path: Path) -> None:
    """ninep serving an in-memory tree over trans=fd: every step that needs no host seed
    (the memory backend keeps files dense, so the sparse step checks only contents)."""
    steps = [s for s in job_steps() if s not in SEEDED]
    run, log = _ninep_run(guest_image, accel, tmp_path, "memory:", None, {"STEPS": " ".join(steps), "SPARSE_BLOCKS": "0"})
    run_and_check(run, ["mount /mnt", "mount /mnt2", *steps], log)


def _model_missing(model: str) -> bool:
    try:
        from fs_backends.security import credentials_for_model

        credentials_for_model(model)
    except (ImportError, ValueError):
        return True
    return False


# A model this build lacks is an expected failure that turns into an error (strict) the day it
# lands, so the test cannot silently stay off.
MODELS = [
    pytest.param(m, marks=pytest.mark.xfail(_model_missing(m), strict=True, raises=guestvm.GuestError,
                                            reason=f"security model {m} not in fs_backends.security yet"))
    for m in ("passthrough", "none", "mapped-xattr", "mapped-file")
]


@pytest.mark.parametrize("model", MODELS)
def test_ninep_local(guest_image: guestvm.GuestImage, accel: guestvm.Accel, tmp_path: Path,
                     model: str) -> None:
    """ninep exporting a host directory under each security model, over trans=fd."""
    if importlib.util.find_spec("fs_backends.local") is None:
        pytest.skip("fs_backends.local (the host-directory backend) is not in this tree yet")
    export = make_export(tmp_path)
    run, log = _ninep_run(guest_image, accel, tmp_path, str(export), model, {})
    run_and_check(run, ["mount /mnt", "mount /mnt2", *job_steps()], log)
    check_host_side(export, run, model)


def test_hung_guest_is_killed_with_console_tail(guest_image: guestvm.GuestImage,
                                                accel: guestvm.Accel) -> None:
    """A job that never ends must not hang the suite: QEMU is killed at the timeout and the
    error carries what the console showed (here: the job's own last words)."""
    setup = guestvm.Setup("hang", [], [])
    script = 'echo "about to hang"\nsleep 100000\n'
    t0 = time.monotonic()
    with pytest.raises(guestvm.GuestError) as info:
        guestvm.run_job(guest_image, setup, script, timeout=30, accel=accel)
    assert time.monotonic() - t0 < 45
    assert "timed out" in str(info.value) and "about to hang" in str(info.value)
