"""A real Linux guest mounts ninep with trans=virtio: QEMU (sid's 11.x, unpacked by
`tests.kits.sidqemu`) presents `vhost-user-test-device-pci,virtio-id=9` devices whose back-ends
are `ninep serve --listen vhost-user:SOCK` processes, and the guest runs the guest suite's
correctness job on them (a cache=none and a cache=mmap mount). A second boot against the same
server processes checks the VMM reconnect path and that the first boot's files persisted.

Slow (two TCG boots, about a minute and a half); marked `guest`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kits.sidqemu import ensure_sid_qemu, qemu_command, qemu_version

guestvm = pytest.importorskip("tests.guest.guestvm", reason="the guest harness lands with the guest branch")

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[3]
TAGS = ("vt0", "vt1")


@pytest.fixture(scope="module")
def qemu() -> list[str]:
    guestvm.ensure_host_tools()
    cmd = qemu_command(ensure_sid_qemu())
    assert qemu_version(cmd) >= (10, 2), "vhost-user virtio-9p needs QEMU >= 10.2"
    return cmd


@pytest.fixture(scope="module")
def image():  # noqa: ANN201
    return guestvm.build_image()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Path], list[Path]]]:
    """One export, two `ninep serve` vhost-user back-ends (one per guest mount)."""
    tmp = tmp_path_factory.mktemp("vhost")
    export = tmp / "export"
    export.mkdir()
    guestvm.seed_export(export)
    socks = [tmp / f"{tag}.sock" for tag in TAGS]
    logs = [tmp / f"{tag}.log" for tag in TAGS]
    procs = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        for sock, tag, log in zip(socks, TAGS, logs, strict=True):
            # Also on a unix socket: the F_GETLK test locks a file through another 9P connection.
            cmd = [sys.executable, "-m", "ninep", "serve", str(export), "--listen", f"vhost-user:{sock}",
                   "--listen", f"unix:{_unix(sock)}",
                   # The job's POSIX checks include a setuid chmod (QEMU allows it; ninep's policy
                   # refuses it under passthrough unless asked).
                   "--tag", tag, "--security-model", "passthrough", "--allow-setid", "-v"]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 20
        for sock, proc in zip(socks, procs, strict=True):
            while not sock.exists():
                assert proc.poll() is None, f"ninep serve exited: {logs[0].read_text()[-2000:]}"
                assert time.monotonic() < deadline, "ninep serve did not create its socket"
                time.sleep(0.05)
        yield export, socks, logs
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _unix(vhost_sock: Path) -> Path:
    """The unix socket the back-end of `vhost_sock` also listens on."""
    return vhost_sock.with_suffix(".unix")


def _boot(image, qemu: list[str], socks: list[Path], script: str, logdir: Path):  # noqa: ANN001, ANN202
    setup = guestvm.vhost_user_9p("ninep-vhost-user", socks, list(TAGS), qemu)
    return guestvm.run_job(image, setup, script, timeout=600, log=logdir / "console.log")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_guest_job_over_trans_virtio(image, qemu, served, tmp_path: Path) -> None:  # noqa: ANN001
    export, socks, logs = served
    job = (REPO / "tests/guest/job.sh").read_text()
    run = _boot(image, qemu, socks, job, tmp_path)
    context = run.console_tail(40) + "\n--- server ---\n" + logs[0].read_text()[-3000:]
    assert run.rc == 0, context
    assert run.fails == [], context
    assert "mount /mnt" in run.oks and "mount /mnt2" in run.oks, context
    mounts = [line for line in run.lines if line.startswith("info mount ")]
    assert any("trans=virtio" in line and TAGS[0] in line for line in mounts), mounts
    # What the guest wrote is on the host, byte for byte.
    checked = 0
    for line in run.lines:
        parts = line.split()
        if parts[:2] == ["info", "md5"]:
            assert _md5(export / parts[2]) == parts[3], line
            checked += 1
    assert checked >= 3


def test_second_boot_reconnects_and_sees_the_files(image, qemu, served, tmp_path: Path) -> None:  # noqa: ANN001
    export, socks, logs = served
    (export / "from-host").write_bytes(b"written on the host\n")
    script = (
        'cat /mnt/from-host && echo "ok host-file"\n'
        'echo second-boot > /mnt/from-guest && echo "ok guest-file"\n'
        'cat /mnt2/from-guest | grep -q second-boot && echo "ok seen-on-second-mount"\n'
    )
    first = _boot(image, qemu, socks, script, tmp_path)
    (export / "from-guest").unlink()
    second = _boot(image, qemu, socks, script, tmp_path)  # the same back-ends, a new VMM
    for run in (first, second):
        context = run.console_tail(40) + "\n--- server ---\n" + logs[0].read_text()[-3000:]
        assert run.fails == [] and run.rc == 0, context
        assert {"host-file", "guest-file", "seen-on-second-mount"} <= set(run.oks), context
    assert (export / "from-guest").read_bytes() == b"second-boot\n"
    log = logs[0].read_text()
    assert log.count("VMM connected") >= 2 and log.count("VMM disconnected") >= 2


def test_guest_reboot_resets_the_device_on_the_same_connection(image, served, tmp_path: Path) -> None:  # noqa: ANN001
    export, socks, logs = served
    qemu = qemu_command(ensure_sid_qemu(), allow_reboot=True)
    before = logs[0].read_text()
    script = (
        "if [ ! -e /mnt/rebooted ]; then\n"
        '  echo first > /mnt/rebooted && echo "ok first-boot"\n'
        "  umount /mnt; umount /mnt2; reboot -f\n"
        "fi\n"
        'grep -q first /mnt/rebooted && echo "ok second-boot"\n'
    )
    (export / "rebooted").unlink(missing_ok=True)
    run = _boot(image, qemu, socks, script, tmp_path)
    log = logs[0].read_text()[len(before) :]
    context = run.console_tail(40) + "\n--- server ---\n" + log[-3000:]
    assert run.rc == 0 and run.fails == [], context
    assert {"first-boot", "second-boot"} <= set(run.oks), context
    # One VMM connection; the reboot stopped the queue and started it again with a new session.
    assert log.count("VMM connected") == 1, context
    assert log.count("queue 0 started") == 2, context


@pytest.fixture(scope="module", params=["bookworm", "sid"])
def kernel_image(request: pytest.FixtureRequest):  # noqa: ANN201
    """The guest image for each kernel (bookworm 6.1, sid 7.x)."""
    return guestvm.build_image(kernel=str(request.param))


def test_guest_getlk_over_trans_virtio(kernel_image, qemu, served, tmp_path: Path) -> None:  # noqa: ANN001
    """fcntl(F_GETLK) in the guest over trans=virtio (tests/guest/getlk.sh): unlocked, host
    process read / write locks, a lock through another 9P connection (the back-end's unix
    socket), another guest process through the second mount, the process's own lock. Each
    mount has its own back-end process here, so the second mount's lock reaches the first
    back-end as another host process's OFD lock: right type and range, pid 0 (OFD locks have
    no owning process)."""
    from tests.guest import test_guest_getlk as g

    export, socks, logs = served
    g.seed(export)
    with g.host_locks(export) as pid, g.conn_lock(_unix(socks[0])):
        setup = guestvm.vhost_user_9p("ninep-vhost-user", socks, list(TAGS), qemu)
        run = guestvm.run_job(kernel_image, setup, g.JOB.read_text(), {"HOSTPID": str(pid), "OTHER_SERVER": "1"},
                              timeout=600, log=tmp_path / "console.log")
    g.check(run, g.STEPS_ALL, logs[0], kernel_image.kernel_version)
