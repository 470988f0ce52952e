"""A server process taken over by an attacker: it talks to the helper directly, with any request it
likes. Nothing outside the export may be read or written, and the unprivileged models must not
let it create a setuid-root file. The canary directory beside the export is hashed before and
after every test."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import stat
import struct
from pathlib import Path

import pytest

from fs_backends.base import Cred, SetAttr
from fs_backends.proxy import wire as W
from ninep.protocol import numbers as P
from tests.fs_backends.proxy.conftest import AVAILABLE_MODELS, OWNER, RawHelper, tree_digest

ROOT = Cred(0, 0, "root")
SECRET = b"top secret"


@pytest.fixture(autouse=True)
def canary_unchanged(site: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    export, canary = site
    before = tree_digest(canary)
    parent_before = sorted(os.listdir(export.parent))
    yield
    assert tree_digest(canary) == before, "the canary beside the export changed"
    assert sorted(os.listdir(export.parent)) == parent_before, "something appeared beside the export"


def attach(h: RawHelper, aname: str = "") -> tuple[int, W.Reader]:
    r, _ = h.ok(W.ATTACH, W.Writer().str(aname).cred(ROOT))
    return r.u32(), r


def walk(h: RawHelper, node: int, *names: str | bytes) -> tuple[int, list[int]]:
    w = W.Writer().u32(node).u16(len(names))
    for n in names:
        w.str(n)
    err, r, _ = h.call(W.WALK, w)
    if err:
        return err, []
    return 0, [(r.u32(), r.qid())[0] for _ in range(r.u16())]


def root_path(h: RawHelper, node: int) -> int:
    r, _ = h.ok(W.GETATTR, W.Writer().u32(node).u64(P.GETATTR_ALL))
    return W.get_attr(r).qid.path


def read_all_fds(fds: list[int]) -> bytes:
    out = b""
    for fd in fds:
        with contextlib.suppress(OSError):
            out += os.pread(fd, 1 << 16, 0)
        os.close(fd)
    return out


def test_helper_is_confined(raw: RawHelper, model: str) -> None:
    f = raw.facts
    assert f["NoNewPrivs"] == "1"
    if model == "passthrough":
        assert f["confinement"] == "mountns"
        assert int(f["CapEff"], 16) == sum(1 << c for c in (0, 1, 3, 4, 27))
    else:
        assert f["confinement"] == "userns"
        assert int(f["CapEff"], 16) == 0 and int(f["CapBnd"], 16) == 0
        assert f["uid"] == str(OWNER)
    assert sorted(os.listdir(f"/proc/{raw.child_pid}/root")) == ["export", "proc"]
    assert os.readlink(f"/proc/{raw.child_pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{raw.child_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    st = Path(f"/proc/{raw.child_pid}/status").read_text()
    uid_line = next(line for line in st.splitlines() if line.startswith("Uid:"))
    if model != "passthrough":
        assert uid_line.split()[1:] == [str(OWNER)] * 4


def test_names_that_climb_or_escape(raw: RawHelper, site: tuple[Path, Path]) -> None:
    root, _ = attach(raw)
    rp = root_path(raw, root)
    # '..' at the root stays at the root, however often.
    err, nodes = walk(raw, root, "..", "..", "..")
    assert err == 0 and all(root_path(raw, n) == rp for n in nodes)
    # attach names that try to leave, or go through symlinks.
    for aname in ("..", "../..", "/.."):
        h, _ = attach(raw, aname)
        assert root_path(raw, h) == rp
    for aname in ("../canary", "outdir", "outdir/sub", "slash/etc", "abs_secret", str(site[1])):
        err, _, _ = raw.call(W.ATTACH, W.Writer().str(aname).cred(ROOT))
        assert err in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP), aname
    # Names with slashes, NULs, '.', '' are refused before any lookup.
    for bad in (b"../canary", b"/etc", b"a/b", b"a\0b", b".", b""):
        assert walk(raw, root, bad)[0] == errno.EINVAL, bad
    # Symlinks are walked to as themselves, never through.
    for link in ("outdir", "slash"):
        err, nodes = walk(raw, root, link, "secret")
        assert err != 0 or len(nodes) == 1, link
    for link in ("abs_secret", "rel_secret"):
        err, nodes = walk(raw, root, link)
        assert err == 0 and len(nodes) == 1
        err, _, fds = raw.call(W.OPEN, W.Writer().u32(nodes[0]).u32(P.L_O_RDONLY).cred(ROOT))
        assert err == errno.ELOOP and not fds
        err, r, _ = raw.call(W.XATTR_LIST, W.Writer().u32(nodes[0]))
        r2, _ = raw.ok(W.GETATTR, W.Writer().u32(nodes[0]).u64(P.GETATTR_ALL))
        assert stat.S_ISLNK(W.get_attr(r2).mode)
        # Creating beneath a symlink (as if it were a directory) is refused.
        err, _, _ = raw.call(
            W.CREATE, W.Writer().u32(nodes[0]).str("x").u32(P.L_O_RDWR).u32(0o644).cred(ROOT)
        )
        assert err == errno.ENOTDIR
        err, _, _ = raw.call(W.MKDIR, W.Writer().u32(nodes[0]).str("x").u32(0o755).cred(ROOT))
        assert err == errno.ENOTDIR


def test_new_names_must_be_one_component(raw: RawHelper) -> None:
    root, _ = attach(raw)
    for bad in ("..", "../escape", "/tmp/escape", "a/b", ".", "", "x\0y"):
        for op, w in (
            (W.CREATE, W.Writer().u32(root).str(bad).u32(P.L_O_RDWR).u32(0o644).cred(ROOT)),
            (W.MKDIR, W.Writer().u32(root).str(bad).u32(0o755).cred(ROOT)),
            (W.SYMLINK, W.Writer().u32(root).str(bad).str("/etc/passwd").cred(ROOT)),
            (W.MKNOD, W.Writer().u32(root).str(bad).u32(stat.S_IFIFO | 0o644).u32(0).u32(0).cred(ROOT)),
            (W.RENAMEAT, W.Writer().u32(root).str("file").u32(root).str(bad)),
            (W.UNLINKAT, W.Writer().u32(root).str(bad).u32(0)),
        ):
            err, _, fds = raw.call(op, w)
            assert err == errno.EINVAL and not fds, (W.OP_NAMES[op], bad)


def test_symlink_out_is_stored_never_followed(raw: RawHelper, model: str, site: tuple[Path, Path]) -> None:
    export, canary = site
    root, _ = attach(raw)
    raw.ok(W.SYMLINK, W.Writer().u32(root).str("evil").str(str(canary / "secret")).cred(ROOT))
    raw.ok(W.SYMLINK, W.Writer().u32(root).str("evil2").str("../canary").cred(ROOT))
    for name, follow in (("evil", []), ("evil2", ["secret"]), ("evil2", ["sub", "deep"])):
        err, nodes = walk(raw, root, name, *follow)
        assert err == 0 and len(nodes) == 1  # stops at the symlink itself
        for flags in (P.L_O_RDONLY, P.L_O_RDWR | P.L_O_TRUNC, P.L_O_WRONLY | P.L_O_APPEND):
            err, _, fds = raw.call(W.OPEN, W.Writer().u32(nodes[0]).u32(flags).cred(ROOT))
            assert err == errno.ELOOP and not fds
        sa = W.Writer().u32(nodes[0])
        W.put_setattr(sa, SetAttr(P.SETATTR_SIZE, size=0))
        err, _, _ = raw.call(W.SETATTR, sa.cred(ROOT))
        assert err != 0
        err, _, _ = raw.call(W.XATTR_SET, W.Writer().u32(nodes[0]).str("user.x").blob(b"v").u32(0))
        if not model.startswith("mapped"):  # mapped models keep symlinks as plain files
            assert err != 0


def test_hard_links_and_renames_stay_inside(raw: RawHelper, site: tuple[Path, Path]) -> None:
    root, _ = attach(raw)
    _, (link,) = walk(raw, root, "abs_secret")
    raw.ok(W.LINK, W.Writer().u32(root).str("hard").u32(link))  # links the symlink itself
    assert os.path.islink(site[0] / "hard")
    err, (d,) = walk(raw, root, "dir")
    raw.ok(W.RENAME, W.Writer().u32(link).u32(d).str("moved"))
    assert os.path.islink(site[0] / "dir" / "moved")
    # The root itself cannot be renamed or removed (it would leave the export).
    err, _, _ = raw.call(W.RENAME, W.Writer().u32(root).u32(d).str("root"))
    assert err == errno.EBUSY
    err, _, _ = raw.call(W.REMOVE, W.Writer().u32(root))
    assert err == errno.EBUSY


def test_bad_handles(raw: RawHelper) -> None:
    root, _ = attach(raw)
    r, fds = raw.ok(W.OPEN, W.Writer().u32(root).u32(P.L_O_RDONLY).cred(ROOT))
    fh = r.u32()
    read_all_fds(fds)
    for h in (0, 0xFFFFFFFF, 123456, fh):  # fh is a file handle, not a node
        err, _, _ = raw.call(W.GETATTR, W.Writer().u32(h).u64(P.GETATTR_ALL))
        assert err == errno.EBADF, h
    for h in (0, 0xFFFFFFFF, root):  # root is a node handle, not a file
        err, _, _ = raw.call(W.READDIR, W.Writer().u32(h).u64(0).u32(10))
        assert err == errno.EBADF
        err, _, fds = raw.call(W.LOCKFD, W.Writer().u32(h))
        assert err == errno.EBADF and not fds
    raw.ok(W.CLOSE, W.Writer().u32(fh))
    err, _, _ = raw.call(W.CLOSE, W.Writer().u32(fh))
    assert err == errno.EBADF
    raw.ok(W.RELEASE, W.Writer().u32(root))
    err, _, _ = raw.call(W.RELEASE, W.Writer().u32(root))
    assert err == errno.EBADF
    err, _, _ = raw.call(W.WALK, W.Writer().u32(root).u16(0))
    assert err == errno.EBADF


def test_malformed_messages(raw: RawHelper) -> None:
    root, _ = attach(raw)
    # Unknown ops, including reply and announcement numbers sent as requests.
    for op in (0, W.LOCKFD + 1, 999, W.REPLY | W.GETATTR, W.HELLO, 0x7FFF):
        err, _, _ = raw.call(op, W.Writer().u32(root))
        assert err == errno.ENOSYS, op
    # Wrong version.
    raw.send_raw(struct.pack("<HHII", 99, W.GETATTR, 7, 12) + struct.pack("<IQ", root, 0))
    h, r, _ = raw.recv()
    assert h.rid == 7 and r.u32() == errno.EPROTO
    # Header length that does not match the datagram (both ways).
    for claimed in (0, 11, 13, 1 << 20, 0xFFFFFFFF):
        raw.send_raw(struct.pack("<HHII", W.VERSION, W.GETATTR, 8, claimed) + struct.pack("<IQ", root, 0))
        h, r, _ = raw.recv()
        assert h.rid == 8 and r.u32() == errno.EBADMSG
    # Truncated bodies and trailing garbage.
    full = W.Writer().u32(root).u64(P.GETATTR_ALL).body()
    for body in (full[:3], full[:11], full + b"\0"):
        err, _, _ = raw.call(W.GETATTR, body)
        assert err == errno.EBADMSG
    # A string length running past the end; a walk with 17 names; a huge xattr value length.
    err, _, _ = raw.call(W.WALK, struct.pack("<IHH", root, 1, 200) + b"abc")
    assert err == errno.EBADMSG
    err, _, _ = raw.call(W.WALK, W.Writer().u32(root).u16(17).body())
    assert err == errno.E2BIG
    err, _, _ = raw.call(W.XATTR_SET, W.Writer().u32(root).str("user.a").body() + struct.pack("<I", 0xFFFFFFF0))
    assert err == errno.E2BIG
    err, _, _ = raw.call(W.ATTACH, W.Writer().str("x" * 5000).cred(ROOT))
    assert err == errno.ENAMETOOLONG
    # A datagram bigger than any request.
    raw.send_raw(W.message(W.GETATTR, 9, b"\0" * (W.MAX_REQUEST + 100)))
    h, r, _ = raw.recv()
    assert h.rid == 9 and r.u32() == errno.EMSGSIZE
    # Too short to carry a header: answered EBADMSG under id 0; the helper keeps serving.
    raw.send_raw(b"\x01\x00\x04")
    h, r, _ = raw.recv()
    assert h.rid == 0 and r.u32() == errno.EBADMSG
    assert root_path(raw, root) > 0


def test_fds_sent_to_the_helper_are_refused(raw: RawHelper, site: tuple[Path, Path]) -> None:
    root, _ = attach(raw)
    outside = os.open(site[1], os.O_RDONLY | os.O_DIRECTORY)
    try:
        raw.send_raw(W.message(W.GETATTR, 5, W.Writer().u32(root).u64(0).body()), [outside])
        h, r, _ = raw.recv()
        assert h.rid == 5 and r.u32() == errno.EBADMSG
    finally:
        os.close(outside)


# passthrough is left out: giving clients real ownership is what it is for (and it needs root).
@pytest.mark.parametrize("model", [m for m in AVAILABLE_MODELS if m != "passthrough"])
def test_no_setuid_root_file(raw: RawHelper, model: str, site: tuple[Path, Path]) -> None:
    export, _ = site
    root, _ = attach(raw)
    r, fds = raw.ok(W.CREATE, W.Writer().u32(root).str("suid").u32(P.L_O_RDWR).u32(0o4755).cred(ROOT))
    nh = r.u32()
    for fd in fds:
        os.write(fd, b"#!/bin/sh\nid\n")
        os.close(fd)
    sa = W.Writer().u32(nh)
    W.put_setattr(sa, SetAttr(P.SETATTR_UID | P.SETATTR_GID, uid=0, gid=0))
    raw.call(W.SETATTR, sa.cred(ROOT))
    sa = W.Writer().u32(nh)
    W.put_setattr(sa, SetAttr(P.SETATTR_MODE, mode=0o6755))
    raw.call(W.SETATTR, sa.cred(ROOT))
    raw.call(W.MKNOD, W.Writer().u32(root).str("dev").u32(stat.S_IFBLK | 0o4666).u32(8).u32(0).cred(ROOT))
    raw.call(W.MKDIR, W.Writer().u32(root).str("sgid").u32(0o2777).cred(ROOT))
    for p in export.rglob("*"):
        st = os.lstat(p)
        assert not (st.st_uid == 0 and st.st_mode & (stat.S_ISUID | stat.S_ISGID)), p
        assert not stat.S_ISBLK(st.st_mode) and not stat.S_ISCHR(st.st_mode), p


def test_random_requests(raw: RawHelper, site: tuple[Path, Path]) -> None:
    """A few hundred random requests with plausible handles; the helper must keep answering and
    every fd it hands out must be a file inside the export."""
    export, _ = site
    rng = random.Random(1234)
    root, _ = attach(raw)
    inside = {(st.st_dev, st.st_ino) for p in [export, *export.rglob("*")] if (st := os.lstat(p))}
    for i in range(400):
        op = rng.choice(list(W.OP_NAMES))
        parts = []
        for _ in range(rng.randrange(0, 6)):
            kind = rng.randrange(4)
            if kind == 0:
                parts.append(struct.pack("<I", rng.choice([root, 0, 1, 2, 3, rng.getrandbits(32)])))
            elif kind == 1:
                s = rng.choice([b"..", b"file", b"dir", b"outdir", b"abs_secret", b"/etc/passwd", b"x" * rng.randrange(300)])
                parts.append(struct.pack("<H", len(s)) + s)
            elif kind == 2:
                parts.append(struct.pack("<I", rng.choice([0, 2, 0o4755, 0xFFFFFFFF])))
            else:
                parts.append(rng.randbytes(rng.randrange(1, 20)))
        raw.rid += 1
        raw.send_raw(W.message(op, raw.rid, b"".join(parts)))
        h, r, fds = raw.recv()
        assert h.rid == raw.rid
        for fd in fds:
            st = os.fstat(fd)
            os.close(fd)
            inside |= {(s.st_dev, s.st_ino) for p in [export, *export.rglob("*")] if (s := os.lstat(p))}
            assert (st.st_dev, st.st_ino) in inside, f"request {i}: fd outside the export"
    assert root_path(raw, root) > 0


def test_helper_has_no_network_and_sees_no_host_process(raw: RawHelper) -> None:
    if "net" in raw.facts["namespaces"]:
        assert os.readlink(f"/proc/{raw.child_pid}/ns/net") != os.readlink("/proc/self/ns/net")
    # Its /proc is its own pid namespace: pid 1 is itself.
    root = f"/proc/{raw.child_pid}/root/proc"
    pids = sorted(int(p) for p in os.listdir(root) if p.isdigit())
    assert pids == [1]


def test_socket_type_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    p = subprocess.run(
        [sys.executable, "-m", "fs_backends.proxy", "--socket-fd", str(b.fileno()), str(tmp_path)],
        pass_fds=(b.fileno(),), env=env, capture_output=True, timeout=30,
    )
    a.close()
    b.close()
    assert p.returncode == 2 and b"SOCK_SEQPACKET" in p.stderr
