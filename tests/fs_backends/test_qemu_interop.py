"""An export written under a mapped security model by QEMU's own 9p server reads the same
through ninep's LocalBackend, and the other way round.

One TCG boot per model of the guest from tests/guest: QEMU (the system's qemu-system-x86_64)
serves the export with `-fsdev local,security_model=MODEL`; the guest prints what it sees of the
files ninep wrote beforehand and creates its own (owners, modes, device nodes, a fifo, a symlink,
a hard link, a rename); afterwards the host reads those through LocalBackend under the same model.
Slow (a boot each); marked `guest`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from fs_backends.base import Cred
from fs_backends.local import LocalBackend
from fs_backends.security import Credentials, MappedFileCredentials, MappedXattrCredentials
from ninep.protocol import numbers as P

guestvm = pytest.importorskip("tests.guest.guestvm", reason="needs the guest harness")

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

MODELS = {"mapped-xattr": MappedXattrCredentials, "mapped-file": MappedFileCredentials}

JOB = r"""
M=/mnt
for f in $M/fromninep/*; do
	echo "info stat $(stat -c '%n %u %g %f %t %T' "$f")"
done
echo "info link $(readlink $M/fromninep/s)"
echo "info data $(cat $M/fromninep/f)"
mkdir $M/fromguest && cd $M/fromguest || exit 1
mkdir d && chown 1001:1002 d && chmod 750 d
echo hello > f && chown 1000:100 f && chmod 4755 f
mknod c c 1 5 && chown 7:8 c && chmod 620 c
mknod b b 8 1 && chmod 600 b
mkfifo p && chmod 640 p
ln -s ../some/target s
ln f hl
mkdir d/sub && echo x > d/sub/x && chown 3:4 d/sub/x
mv d/sub d/sub2
echo "ok created"
"""


# name -> (mode, uid, gid, rdev) ninep writes and QEMU must show
WRITTEN = {
    "f": (stat.S_IFREG | 0o4755, 1000, 100, 0),
    "d": (stat.S_IFDIR | 0o750, 1001, 1002, 0),
    "c": (stat.S_IFCHR | 0o620, 7, 8, os.makedev(1, 5)),
    "b": (stat.S_IFBLK | 0o600, 0, 0, os.makedev(8, 1)),
    "p": (stat.S_IFIFO | 0o640, 0, 0, 0),
    "s": (stat.S_IFLNK | 0o777, 5, 6, 0),
}


async def ninep_writes(export: Path, creds: Credentials) -> None:
    b = LocalBackend(str(export), credentials=creds)
    root = await b.attach("", Cred(0, 0))
    await b.mkdir(root, "fromninep", 0o755, Cred(0, 0))
    d = (await b.walk(root, ["fromninep"]))[0]
    n, f = await b.create(d, "f", P.L_O_RDWR, 0o4755, Cred(1000, 100))
    await b.write(f, 0, b"written by ninep")
    await b.close(f)
    await b.mkdir(d, "d", 0o750, Cred(1001, 1002))
    await b.mknod(d, "c", stat.S_IFCHR | 0o620, 1, 5, Cred(7, 8))
    await b.mknod(d, "b", stat.S_IFBLK | 0o600, 8, 1, Cred(0, 0))
    await b.mknod(d, "p", stat.S_IFIFO | 0o640, 0, 0, Cred(0, 0))
    await b.symlink(d, "s", "../some/target", Cred(5, 6))
    await b.aclose()


async def ninep_reads(export: Path, creds: Credentials) -> dict[str, tuple[int, int, int, int]]:
    b = LocalBackend(str(export), credentials=creds)
    root = await b.attach("", Cred(0, 0))
    out: dict[str, tuple[int, int, int, int]] = {}
    for path in ("d", "f", "c", "b", "p", "s", "hl", "d/sub2", "d/sub2/x"):
        nodes = await b.walk(root, ["fromguest", *path.split("/")])
        assert len(nodes) == 1 + path.count("/") + 1, path
        a = await b.getattr(nodes[-1], P.GETATTR_ALL)
        out[path] = (a.mode, a.uid, a.gid, a.rdev)
        if path == "s":
            out["s->"] = (0, 0, 0, 0)
            assert await b.readlink(nodes[-1]) == "../some/target"
        if path == "hl":
            f = await b.open(nodes[-1], P.L_O_RDONLY, Cred(0, 0))
            assert await b.read(f, 0, 100) == b"hello\n"
            await b.close(f)
            assert a.nlink == 2
    await b.aclose()
    return out


@pytest.fixture(scope="module")
def image():  # noqa: ANN201
    return guestvm.build_image()


@pytest.mark.parametrize("model", list(MODELS))
def test_qemu_and_ninep_read_each_others_exports(image, model: str, tmp_path: Path) -> None:  # noqa: ANN001
    export = tmp_path / "export"
    export.mkdir()
    trio.run(ninep_writes, export, MODELS[model]())

    setup = guestvm.qemu_local(export, security_model=model)
    run = guestvm.run_job(image, setup, JOB, timeout=600, log=tmp_path / "console.log")
    context = run.console_tail(60)
    assert run.rc == 0 and "created" in run.oks, context

    # What QEMU shows of ninep's files.
    seen: dict[str, tuple[int, int, int, int]] = {}
    for line in run.lines:
        parts = line.split()
        if parts[:2] == ["info", "stat"] and len(parts) == 8:
            name = parts[2].rsplit("/", 1)[-1]
            uid, gid = int(parts[3]), int(parts[4])
            mode, major, minor = int(parts[5], 16), int(parts[6], 16), int(parts[7], 16)
            rdev = os.makedev(major, minor) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
            seen[name] = (mode, uid, gid, rdev)
    assert seen == WRITTEN, context
    assert "info link ../some/target" in run.lines, context
    assert "info data written by ninep" in run.lines, context

    # What ninep shows of QEMU's files.
    got = trio.run(ninep_reads, export, MODELS[model]())
    assert got["d"] == (stat.S_IFDIR | 0o750, 1001, 1002, 0)
    assert got["f"] == (stat.S_IFREG | 0o4755, 1000, 100, 0)
    assert got["hl"] == got["f"]
    assert got["c"] == (stat.S_IFCHR | 0o620, 7, 8, os.makedev(1, 5))
    assert got["b"][0] == stat.S_IFBLK | 0o600 and got["b"][3] == os.makedev(8, 1)
    assert got["p"][0] == stat.S_IFIFO | 0o640
    assert got["s"][0] == stat.S_IFLNK | 0o777
    assert stat.S_ISDIR(got["d/sub2"][0])
    assert got["d/sub2/x"][:3] == (stat.S_IFREG | 0o644, 3, 4)
    # On the host these are all plain files and directories owned by the server.
    for name in ("c", "b", "p", "s"):
        assert stat.S_ISREG(os.lstat(export / "fromguest" / name).st_mode), name
