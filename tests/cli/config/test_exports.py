"""Several exports in one server, chosen by aname; listener rules; reloading the export table.

A real server on unix sockets, reached with ninep.client, in one trio run.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fs_backends.local import LocalBackend
from ninep.cli.config import parse
from ninep.cli.config_serve import make_exports
from ninep.client import Client, ClientError
from ninep.protocol.numbers import L_O_WRONLY
from ninep.server.exports import Export, ExportTable
from ninep.server.policy import OperationPolicy
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.address import listener_from_address
from transports.options import ListenOptions


class Tracked(LocalBackend):
    """A LocalBackend that counts how often it was closed."""

    closes = 0

    async def aclose(self) -> None:
        self.closes += 1
        await super().aclose()


def tree(root: Path, name: str, files: dict[str, str]) -> Path:
    d = root / name
    d.mkdir()
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


@asynccontextmanager
async def serving(tmp: Path, exports: Sequence[Export]) -> AsyncIterator[Server]:
    """The server on two unix listeners named 'one' and 'two' (sockets tmp/one.sock, tmp/two.sock)."""
    server = Server(ExportTable(exports), SessionOptions(drain_seconds=1))
    listeners = [listener_from_address(f"unix:{tmp}/{n}.sock", ListenOptions()) for n in ("one", "two")]
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: server.serve(listeners, names=["one", "two"], task_status=task_status))
        try:
            yield server
        finally:
            server.shutdown()


def on(tmp: Path, listener: str = "one") -> Client:
    return Client.connect(f"unix:{tmp}/{listener}.sock")  # type: ignore[return-value]


async def attach_fails(c: Client, aname: str) -> int:
    with pytest.raises(ClientError) as e:
        await c.attach(aname)
    return e.value.errno or 0


def test_two_exports_are_chosen_by_aname(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = Tracked(str(tree(tmp_path, "a", {"who": "export a"})))
    b = Tracked(str(tree(tmp_path, "b", {"who": "export b", "sub/who": "b's sub"})))
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with serving(tmp_path, [Export("a", "a", a), Export("b", "srv/b", b)]), on(tmp_path) as c:
            ra = await c.attach("a")
            rb = await c.attach("/srv/b/")
            assert await c.read_file(ra, "who") == b"export a"
            assert await c.read_file(rb, "who") == b"export b"
            # An aname longer than an export's names a directory inside it.
            rs = await c.attach("srv/b/sub")
            assert await c.read_file(rs, "who") == b"b's sub"
            assert await attach_fails(c, "srv/b/missing") == errno.ENOENT
            for bad in ("", "c", "srv", "srv/a", "a/../b"):
                assert await attach_fails(c, bad) == errno.ENOENT, bad
            # Writes land in the right export.
            await c.write_file(rb, "new", b"into b")

    trio.run(main)
    assert (tmp_path / "b" / "new").read_text() == "into b" and not (tmp_path / "a" / "new").exists()
    assert "attach 'c' as root refused: no such export" in caplog.text
    assert a.closes == 1 and b.closes == 1, "shutdown closes every export's backend"


def test_root_export_catches_unmatched_anames(tmp_path: Path) -> None:
    root = LocalBackend(str(tree(tmp_path, "root", {"who": "root", "x/who": "root's x"})))
    named = LocalBackend(str(tree(tmp_path, "named", {"who": "named"})))

    async def main() -> None:
        async with serving(tmp_path, [Export("root", "", root), Export("named", "x", named)]), on(tmp_path) as c:
            assert await c.read_file(await c.attach(""), "who") == b"root"
            assert await c.read_file(await c.attach("/"), "who") == b"root"
            assert await c.read_file(await c.attach("x"), "who") == b"named"  # the export wins
            assert await attach_fails(c, "nope") == errno.ENOENT  # a path inside root that is not there

    trio.run(main)


def test_listener_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pub = LocalBackend(str(tree(tmp_path, "pub", {"f": "public"})))
    priv = LocalBackend(str(tree(tmp_path, "priv", {"f": "private"})))
    exports = [Export("pub", "pub", pub), Export("priv", "priv", priv, listeners=frozenset({"one"}))]

    async def main() -> None:
        async with serving(tmp_path, exports):
            async with on(tmp_path, "one") as c:
                assert await c.read_file(await c.attach("priv"), "f") == b"private"
            async with on(tmp_path, "two") as c:
                assert await c.read_file(await c.attach("pub"), "f") == b"public"
                assert await attach_fails(c, "priv") == errno.EACCES

    trio.run(main)
    assert "attach 'priv' as root refused: export priv is not offered on two" in caplog.text


def test_fids_of_different_exports_do_not_mix(tmp_path: Path) -> None:
    """link/rename across exports would hand one backend another's node: EXDEV. A read-only
    policy on one export does not make the other read-only."""
    a = LocalBackend(str(tree(tmp_path, "a", {"f": "a"})))
    b = LocalBackend(str(tree(tmp_path, "b", {"f": "b"})))
    exports = [Export("a", "a", a), Export("b", "b", b, OperationPolicy(readonly=True))]

    async def main() -> None:
        async with serving(tmp_path, exports), on(tmp_path) as c:
            ra, rb = await c.attach("a"), await c.attach("b")
            fa, _ = await c.walk(ra, ["f"])
            with pytest.raises(ClientError) as e:
                await c.rename(fa, rb, "moved")
            assert e.value.errno == errno.EXDEV
            with pytest.raises(ClientError) as e:
                await c.link(rb, fa, "linked")
            assert e.value.errno == errno.EXDEV
            with pytest.raises(ClientError) as e:
                await c.renameat(ra, "f", rb, "moved")
            assert e.value.errno == errno.EXDEV
            with pytest.raises(ClientError) as e:
                await c.open_file(rb, "f", L_O_WRONLY)
            assert e.value.errno == errno.EROFS
            await c.write_file(ra, "g", b"a is writable")

    trio.run(main)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["f"]
    assert (tmp_path / "a" / "g").exists() and (tmp_path / "a" / "f").exists()


def test_replacing_exports_keeps_live_fids_on_their_export(tmp_path: Path) -> None:
    keep = Tracked(str(tree(tmp_path, "keep", {"v": "kept"})))
    gone = Tracked(str(tree(tmp_path, "gone", {"v": "going"})))
    old = Tracked(str(tree(tmp_path, "old", {"v": "old version"})))
    new = Tracked(str(tree(tmp_path, "new", {"v": "new version"})))
    added = Tracked(str(tree(tmp_path, "added", {"v": "added"})))
    e_keep, e_gone, e_old = Export("keep", "keep", keep), Export("gone", "gone", gone), Export("chg", "chg", old)

    async def main() -> None:
        async with serving(tmp_path, [e_keep, e_gone, e_old]) as server:
            async with on(tmp_path) as c:
                rk, rg, ro = await c.attach("keep"), await c.attach("gone"), await c.attach("chg")
                changes = await server.replace_exports([e_keep, Export("chg", "chg", new), Export("add", "add", added)])
                assert (changes.added, changes.removed, changes.changed, changes.unchanged) == (
                    ["add"], ["gone"], ["chg"], ["keep"])
                assert str(changes) == "added add; removed gone; changed chg"
                # Fids attached before keep their export, whatever happened to it.
                assert await c.read_file(rk, "v") == b"kept"
                assert await c.read_file(rg, "v") == b"going"
                assert await c.read_file(ro, "v") == b"old version"
                # New attaches see the new table, on this connection and on new ones.
                assert await attach_fails(c, "gone") == errno.ENOENT
                assert await c.read_file(await c.attach("chg"), "v") == b"new version"
                async with on(tmp_path) as c2:
                    assert await c2.read_file(await c2.attach("add"), "v") == b"added"
                    assert await attach_fails(c2, "gone") == errno.ENOENT
                assert (gone.closes, old.closes) == (0, 0), "still used by live fids"
            # The connection that used them ended: the retired backends are closed, no other.
            await trio.sleep(0.1)
            assert (gone.closes, old.closes) == (1, 1)
            assert (keep.closes, new.closes, added.closes) == (0, 0, 0)
            with pytest.raises(ValueError):
                await server.replace_exports([Export("x", "keep", keep), Export("y", "keep", new)])
            async with on(tmp_path) as c:  # a refused table changed nothing
                assert await c.read_file(await c.attach("keep"), "v") == b"kept"
        assert (keep.closes, new.closes, added.closes, gone.closes) == (1, 1, 1, 1)

    trio.run(main)


def test_make_exports_reuses_unchanged_exports_and_backends(tmp_path: Path) -> None:
    tree(tmp_path, "a", {})
    tree(tmp_path, "b", {})
    first = parse('[exports.same]\npath = "a"\n[exports.pol]\npath = "b"\n[exports.moved]\npath = "a"\n',
                  str(tmp_path / "x.toml"))
    exports, made = make_exports(first)
    # Two exports with the same backend settings share one backend.
    assert len(made) == 2 and exports[0].backend is exports[2].backend
    second = parse('[exports.same]\npath = "a"\n[exports.pol]\npath = "b"\n[exports.pol.policy]\nallow_setid = true\n'
                   '[exports.moved]\npath = "b"\n', str(tmp_path / "x.toml"))
    again, made2 = make_exports(second, exports)
    by = {e.name: e for e in exports}
    now = {e.name: e for e in again}
    assert now["same"] is by["same"]
    # A policy change is a new Export on the same backend; a path change opens a new one... unless
    # another export already has a backend on exactly those settings.
    assert now["pol"] is not by["pol"] and now["pol"].backend is by["pol"].backend
    assert now["pol"].policy.allow_setid
    assert now["moved"].backend is by["pol"].backend and made2 == []

    async def close() -> None:
        for b in made:
            await b.aclose()

    trio.run(close)
