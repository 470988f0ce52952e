"""Hostile 9P clients against a live server, under every security model, on the local backend
and through the chroot proxy: escapes by `..`, by symlinks (stored, planted, swapped in during a
walk), by hard links and renames, privileged and reserved xattrs, device nodes and setid bits.

Every refusal is checked for its errno and its one log line; the canary directory beside the
export (contents, modes, owners, nlinks, xattrs, mtimes) is hashed before and after every test.
The raw helper protocol (a hijacked server) is attacked in test_attacker.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fs_backends.base import Backend
from ninep.client import Client, ClientError
from ninep.protocol.numbers import (
    DMDEVICE,
    DMSETUID,
    L_O_CREAT,
    L_O_DIRECTORY,
    L_O_RDONLY,
    L_O_RDWR,
    OREAD,
    QTSYMLINK,
    SETATTR_MODE,
    V9P2000_U,
)
from ninep.server.policy import DEFAULT_POLICY, OperationPolicy
from ninep.server.session import SessionOptions
from tests.fs_backends.proxy.conftest import AVAILABLE_MODELS, OWNER, tree_digest
from tests.kits.e2e import fails
from tests.kits.harness import client_for, served

SECRET = b"top secret\n"
MAPPED = ("mapped-xattr", "mapped-file")
KINDS = [(b, m) for b in ("local", "proxy") for m in AVAILABLE_MODELS]


@pytest.fixture(params=KINDS, ids=[f"{b}-{m}" for b, m in KINDS])
def kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture(autouse=True)
def canary_unchanged(site: tuple[Path, Path]) -> Iterator[None]:
    export, canary = site
    os.setxattr(canary / "secret", "user.colour", b"red")
    os.setxattr(canary / "secret", "trusted.canary", b"1")
    before = tree_digest(canary)
    beside = sorted(os.listdir(export.parent))
    yield
    assert tree_digest(canary) == before, "the canary beside the export changed"
    assert sorted(os.listdir(export.parent)) == beside, "something appeared beside the export"


def own(*paths: Path) -> None:
    """Files the test makes belong to the export's owner, as the site's do (the unprivileged
    proxy helpers act as that user)."""
    for p in paths:
        os.lchown(p, OWNER, OWNER)


def make_backend(kind: tuple[str, str], export: Path) -> Backend:
    backend, model = kind
    if backend == "proxy":
        from fs_backends.proxy import proxy_backend

        return proxy_backend(str(export), model)
    from fs_backends.local import backend_for_model

    return backend_for_model(str(export), model=model)


Scenario = Callable[[Client, Callable[[], Awaitable[Client]]], Awaitable[None]]


def run(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path, scenario: Scenario,
        policy: OperationPolicy = DEFAULT_POLICY, dialect: str = "9P2000.L") -> None:
    """`scenario(client, another)` against a live server on a unix socket; `another()` opens a
    second connection (closed with the first)."""

    async def main() -> None:
        with trio.fail_after(120):
            opts = SessionOptions(policy=policy, max_msize=1 << 20)
            async with (
                served(make_backend(kind, site[0]), "unix", tmp_path, opts) as (_, connect),
                contextlib.AsyncExitStack() as stack,
            ):
                c = await stack.enter_async_context(client_for(connect, dialect=dialect))

                async def another() -> Client:
                    return await stack.enter_async_context(client_for(connect))

                await scenario(c, another)

    trio.run(main)


def refused_logged(caplog: pytest.LogCaptureFixture, op: str, name: str, code: str) -> None:
    """Exactly the one line the session writes for a policy refusal (consumed: a second refusal
    of the same kind needs a line of its own)."""
    lines = [r.getMessage() for r in caplog.records if r.name == "ninep.policy"]
    want = f"refused {op} {name!r} by uid 0 (root): {code}:"
    hits = [r for r in caplog.records if r.name == "ninep.policy" and want in r.getMessage()]
    assert hits, f"no {want!r} in {lines}"
    msg = hits[0].getMessage()
    assert msg.startswith("connection ") and " from unix:" in msg
    caplog.records.remove(hits[0])


def policy_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ninep.policy"]


async def root_qid_path(c: Client, root: int) -> int:
    return (await c.getattr(root)).qid.path


# --- escapes through names --------------------------------------------------------------------


def test_dotdot_at_the_root_stays_at_the_root(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path) -> None:
    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        rp = await root_qid_path(c, root)
        f, qids = await c.walk(root, [".."] * 16)
        assert all(q.path == rp for q in qids) and await root_qid_path(c, f) == rp
        await fails(errno.ENOENT, c.walk(root, ["..", "canary", "secret"]))
        await fails(errno.ENOENT, c.walk(root, ["..", "..", "canary"]))
        d, _ = await c.walk(root, ["dir", "..", "..", ".."])
        assert await root_qid_path(c, d) == rp
        for aname in ("..", "../..", "/..", "dir/../.."):
            # An aname that climbs selects no export (the export table refuses it outright).
            await fails(errno.ENOENT, c.attach(aname))

    run(kind, site, tmp_path, scenario)


def test_symlinks_pointing_out_are_never_followed(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path) -> None:
    export, canary = site

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        # Made by the client: absolute and relative targets outside, stored as given.
        await c.symlink(root, "evil_abs", str(canary / "secret"))
        await c.symlink(root, "evil_rel", "../canary/secret")
        await c.symlink(root, "evil_dir", "../canary")
        # Planted on the host (real symlinks, in every model): abs_secret, rel_secret, outdir, slash.
        for name, target in (("evil_abs", str(canary / "secret")), ("evil_rel", "../canary/secret"),
                             ("abs_secret", str(canary / "secret")), ("rel_secret", "../canary/secret")):
            ln, (q,) = await c.walk(root, [name])
            assert q.type & QTSYMLINK
            assert await c.readlink(ln) == target  # reading the target is fine
            for flags in (L_O_RDONLY, L_O_RDWR, L_O_RDONLY | L_O_DIRECTORY):
                await fails((errno.ELOOP, errno.ENXIO, errno.ENOTDIR), c.lopen(ln, flags))
            await fails((errno.ENOTDIR, errno.ELOOP), c.lcreate(ln, "x", L_O_RDWR | L_O_CREAT, 0o644))
            await fails((errno.ENOTDIR, errno.ELOOP), c.mkdir(ln, "x"))
        for name in ("evil_dir", "outdir", "slash"):
            # Walking through a symlink stops at it: the client sees a partial walk.
            for rest in (["secret"], ["sub", "deep"], ["etc", "passwd"]):
                await fails(errno.ENOENT, c.walk(root, [name, *rest]))
            ln, _ = await c.walk(root, [name])
            await fails((errno.ENOTDIR, errno.ELOOP), c.lcreate(ln, "planted", L_O_RDWR | L_O_CREAT, 0o644))
            await fails((errno.ENOTDIR, errno.ELOOP), c.symlink(ln, "planted", "x"))
            await fails((errno.ENOTDIR, errno.ELOOP), c.renameat(root, "file", ln, "planted"))
        # Renaming a file over a symlink replaces the symlink, never its target.
        await c.renameat(root, "file", root, "abs_secret")
        assert (export / "abs_secret").read_bytes() == b"inside\n"

    run(kind, site, tmp_path, scenario)


def test_symlink_swapped_in_for_a_directory_during_walks(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path) -> None:
    """A host thread keeps swapping `race` between a real directory and a symlink to the canary
    while the client walks through it, opens, creates and removes inside it."""
    export, canary = site
    (export / "race").mkdir()
    (export / "race" / "secret").write_bytes(b"harmless\n")
    os.symlink(str(canary), export / "race_link")
    own(export / "race", export / "race" / "secret", export / "race_link")
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        while not stop.is_set():
            for a, b in (("race", "race_dir"), ("race_link", "race")):
                with contextlib.suppress(FileNotFoundError):  # mid-swap: the other half
                    os.rename(export / a, export / b)
            for a, b in (("race", "race_link"), ("race_dir", "race")):
                with contextlib.suppress(FileNotFoundError):  # mid-swap: the other half
                    os.rename(export / a, export / b)
            swaps[0] += 1

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        reached = 0
        for i in range(150):
            try:
                f, _ = await c.walk(root, ["race", "secret"])
                await c.lopen(f, L_O_RDONLY)
                data = await c.read(f, 0, 100)
                assert data != SECRET, "read the canary through a swapped-in symlink"
                reached += 1
                await c.clunk(f)
            except ClientError:
                pass
            try:
                d, _ = await c.walk(root, ["race"])
                await c.lcreate(d, f"new{i}", L_O_RDWR | L_O_CREAT, 0o644)
                await c.clunk(d)
            except ClientError:
                pass
            try:
                d, _ = await c.walk(root, ["race"])
                await c.unlinkat(d, "secret")
                await c.mknod(d, "secret", stat.S_IFIFO | 0o600)
            except ClientError:
                pass
        assert swaps[0] > 0

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        run(kind, site, tmp_path, scenario)
    finally:
        stop.set()
        t.join()


def test_hard_links_never_reach_outside(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path) -> None:
    export, canary = site

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        for name in ("abs_secret", "outdir"):
            ln, _ = await c.walk(root, [name])
            # The link is to the symlink itself (a name inside the export), not to its target.
            await c.link(root, ln, f"hard_{name}")
            assert os.path.islink(export / f"hard_{name}")
            ln2, _ = await c.walk(root, [f"hard_{name}"])
            await fails((errno.ELOOP, errno.ENXIO), c.lopen(ln2, L_O_RDONLY))
        d, _ = await c.walk(root, ["dir"])
        await fails(errno.EPERM, c.link(root, d, "dirlink"))  # no hard links to directories
        # A hard link planted by the admin to a file outside is only that file's bytes: the
        # client cannot get at anything else beside it (no '..' from a file).
        await fails((errno.ENOENT, errno.ENOTDIR), c.walk(root, ["file", ".."]))

    run(kind, site, tmp_path, scenario)
    assert os.stat(canary / "secret").st_nlink == 1


def test_directory_renamed_under_an_open_fid(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path) -> None:
    """The client moves a directory while another fid has it open and walked into: the fid
    follows the directory, keeps working inside the export, and `..` from it stops at the root."""
    export, _ = site
    (export / "dir" / "sub").mkdir()
    (export / "dir" / "sub" / "f").write_bytes(b"in sub\n")
    own(export / "dir" / "sub", export / "dir" / "sub" / "f")

    async def scenario(c: Client, another: Callable[[], Awaitable[Client]]) -> None:
        root = await c.attach()
        rp = await root_qid_path(c, root)
        sub, _ = await c.walk(root, ["dir", "sub"])
        opened, _ = await c.walk(sub, [])
        await c.lopen(opened, L_O_RDONLY | L_O_DIRECTORY)
        other = await another()
        oroot = await other.attach()
        await other.renameat(oroot, "dir", oroot, "moved")
        d2, _ = await other.walk(oroot, ["moved"])
        await other.renameat(d2, "sub", oroot, "sub_at_root")
        # The walked fid and the open one still name the moved directory...
        names = {e[3] for e in await c.readdir_all(opened)}
        assert "f" in names
        await c.lcreate((await c.walk(sub, []))[0], "made_after", L_O_RDWR | L_O_CREAT, 0o644)
        assert (export / "sub_at_root" / "made_after").exists()
        # ... and its parent is where it is now, never above the root.
        up, _ = await c.walk(sub, [".."])
        assert await root_qid_path(c, up) == rp
        up3, _ = await c.walk(sub, ["..", "..", ".."])
        assert await root_qid_path(c, up3) == rp
        await fails(errno.ENOENT, c.walk(sub, ["..", "..", "canary"]))

    run(kind, site, tmp_path, scenario)


# --- what the policy refuses ------------------------------------------------------------------


def test_privileged_and_reserved_xattrs(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    export, _ = site
    _, model = kind
    os.setxattr(export / "file", "trusted.planted", b"host only")
    os.setxattr(export / "file", "security.planted", b"host only")
    if model in MAPPED:
        os.setxattr(export / "file", "user.virtfs.uid", (1234).to_bytes(4, "little"))

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        f, _ = await c.walk(root, ["file"])
        caplog.set_level(logging.DEBUG, logger="ninep.policy")
        for name in ("trusted.x", "security.x", "trusted.planted"):
            await fails(errno.EPERM, c.xattr_set(f, name, b"v"))
            refused_logged(caplog, "Txattrcreate", name, "EPERM")
        await fails(errno.EPERM, c.xattr_set(f, "trusted.planted", b"", 2))  # removexattr
        refused_logged(caplog, "Txattrcreate", "trusted.planted", "EPERM")
        for name in ("trusted.planted", "security.planted"):
            await fails(errno.ENODATA, c.xattr_get(f, name))  # looks absent, as Linux says
            refused_logged(caplog, "Txattrwalk", name, "ENODATA")
        listed = await c.xattr_list(f)
        assert not [n for n in listed if n.startswith(("trusted.", "security.", "user.virtfs."))], listed
        if model in MAPPED:
            # The models' own metadata: never readable or writable by the client.
            await fails(errno.ENODATA, c.xattr_get(f, "user.virtfs.uid"))
            await fails(errno.EACCES, c.xattr_set(f, "user.virtfs.mode", (0o104755).to_bytes(4, "little")))
        await c.xattr_set(f, "user.fine", b"ok")
        assert await c.xattr_get(f, "user.fine") == b"ok"
        assert not policy_lines(caplog)

    run(kind, site, tmp_path, scenario)
    assert os.getxattr(export / "file", "trusted.planted") == b"host only"
    if model in MAPPED:
        assert os.getxattr(export / "file", "user.virtfs.uid") == (1234).to_bytes(4, "little")


def test_privileged_xattrs_allowed_only_for_passthrough(kind: tuple[str, str], site: tuple[Path, Path],
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    export, _ = site
    backend, model = kind

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        f, _ = await c.walk(root, ["file"])
        if model != "passthrough":
            await fails(errno.EPERM, c.xattr_set(f, "trusted.x", b"v"))
            refused_logged(caplog, "Txattrcreate", "trusted.x", "EPERM")
            return
        if backend == "proxy":
            # The passthrough helper keeps no CAP_SYS_ADMIN (which trusted.* needs): the kernel
            # refuses, cleanly, with the errno Linux gives an unprivileged caller.
            await fails(errno.EPERM, c.xattr_set(f, "trusted.x", b"v"))
            await fails(errno.ENODATA, c.xattr_get(f, "trusted.planted"))
            return
        await c.xattr_set(f, "trusted.x", b"v")
        assert await c.xattr_get(f, "trusted.x") == b"v"
        assert await c.xattr_get(f, "trusted.planted") == b"host only"
        assert "trusted.x" in await c.xattr_list(f)

    os.setxattr(export / "file", "trusted.planted", b"host only")
    run(kind, site, tmp_path, scenario, OperationPolicy(allow_privileged_xattrs=True))
    if model == "passthrough" and backend == "local":
        assert os.getxattr(export / "file", "trusted.x") == b"v"


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow-devices"])
def test_device_nodes(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path,
                      caplog: pytest.LogCaptureFixture, allowed: bool) -> None:
    export, _ = site
    backend, model = kind
    caplog.set_level(logging.WARNING, logger="ninep.policy")
    outcome: dict[str, int] = {}

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        await c.mknod(root, "fifo", stat.S_IFIFO | 0o600)  # fifos and sockets are always fine
        await c.mknod(root, "sock", stat.S_IFSOCK | 0o600)
        for name, fmt in (("blk", stat.S_IFBLK), ("chr", stat.S_IFCHR)):
            try:
                await c.mknod(root, name, fmt | 0o666, 8, 0)
                outcome[name] = 0
            except ClientError as e:
                outcome[name] = e.errno or -1

    run(kind, site, tmp_path, scenario, OperationPolicy(allow_devices=allowed))
    assert stat.S_ISFIFO(os.lstat(export / "fifo").st_mode) or model in MAPPED
    if model in MAPPED:
        # Metadata only: the host gets a plain 0600 file owned by the server, whatever the flag.
        assert outcome == {"blk": 0, "chr": 0}
        for name in ("blk", "chr"):
            assert stat.S_ISREG(os.lstat(export / name).st_mode)
        assert not policy_lines(caplog)
    elif not allowed:
        assert outcome == {"blk": errno.EPERM, "chr": errno.EPERM}
        assert not (export / "blk").exists() and not (export / "chr").exists()
        refused_logged(caplog, "Tmknod", "blk", "EPERM")
        refused_logged(caplog, "Tmknod", "chr", "EPERM")
        assert not policy_lines(caplog)  # one line per refusal, no more
    elif backend == "proxy" and model == "none":
        # Allowed by the policy, but the helper is an unprivileged user in its own user
        # namespace: the kernel says no (and nothing else happens).
        assert outcome == {"blk": errno.EPERM, "chr": errno.EPERM}
        assert not policy_lines(caplog)
    else:  # passthrough (and none, running as root) make real device nodes
        assert outcome == {"blk": 0, "chr": 0}
        assert stat.S_ISBLK(os.lstat(export / "blk").st_mode)
        assert os.lstat(export / "blk").st_rdev == os.makedev(8, 0)


def test_device_nodes_dotu(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    """9P2000.u creates devices with Tcreate DMDEVICE: the same policy."""
    export, _ = site
    _, model = kind
    caplog.set_level(logging.WARNING, logger="ninep.policy")

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        d, _ = await c.walk(root, [])
        if model in MAPPED:
            await c.create(d, "null", DMDEVICE | 0o666, OREAD, "c 1 3")
        else:
            await fails(errno.EPERM, c.create(d, "null", DMDEVICE | 0o666, OREAD, "c 1 3"))
            refused_logged(caplog, "Tcreate", "null", "EPERM")
            await fails(errno.EPERM, c.create(d, "suid", DMSETUID | 0o755, OREAD))
            refused_logged(caplog, "Tcreate", "suid", "EPERM")

    run(kind, site, tmp_path, scenario, dialect=V9P2000_U)
    assert not (export / "null").exists() or stat.S_ISREG(os.lstat(export / "null").st_mode)


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow-setid"])
def test_setid_bits(kind: tuple[str, str], site: tuple[Path, Path], tmp_path: Path,
                    caplog: pytest.LogCaptureFixture, allowed: bool) -> None:
    export, _ = site
    backend, model = kind
    caplog.set_level(logging.WARNING, logger="ninep.policy")
    refusals: list[str] = []

    async def attempt(name: str, coro: Awaitable[Any]) -> None:
        try:
            await coro
        except ClientError as e:
            assert e.errno == errno.EPERM, (name, e)
            refusals.append(name)

    async def scenario(c: Client, _: Any) -> None:
        root = await c.attach()
        d, _ = await c.walk(root, [])
        await attempt("suid", c.lcreate(d, "suid", L_O_RDWR | L_O_CREAT, 0o4755))
        await attempt("sgid_fifo", c.mknod(root, "sgid_fifo", stat.S_IFIFO | 0o2666))
        f, _ = await c.walk(root, ["file"])
        await attempt("file", c.setattr(f, SETATTR_MODE, mode=0o6755))
        # setgid on a directory only steers group inheritance: always allowed.
        await c.mkdir(root, "shared", 0o2775)
        sh, _ = await c.walk(root, ["shared"])
        await c.setattr(sh, SETATTR_MODE, mode=0o2770)

    run(kind, site, tmp_path, scenario, OperationPolicy(allow_setid=allowed))
    host_bits = {p.name: os.lstat(p).st_mode & (stat.S_ISUID | stat.S_ISGID) for p in export.iterdir()}
    if model in MAPPED:
        # The bits are the client's metadata; the host files never carry them.
        assert refusals == []
        assert not any(host_bits[n] for n in ("suid", "sgid_fifo", "file")), host_bits
        assert not policy_lines(caplog)
    elif not allowed:
        assert refusals == ["suid", "sgid_fifo", "file"]
        assert "suid" not in host_bits and "sgid_fifo" not in host_bits and host_bits["file"] == 0
        for op, name in (("Tlcreate", "suid"), ("Tmknod", "sgid_fifo"), ("Tsetattr", "file")):
            refused_logged(caplog, op, name, "EPERM")
        assert not policy_lines(caplog)
    else:
        assert refusals == []
        assert host_bits["suid"] == stat.S_ISUID and host_bits["file"] == stat.S_ISUID | stat.S_ISGID
    if model not in MAPPED:
        assert os.lstat(export / "shared").st_mode & stat.S_ISGID
