"""Client-certificate identities held to an export and a uid (ninep.server.identity) over real TLS."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from fs_backends.memory import MemoryBackend
from ninep.client import Client, ClientError
from ninep.server.exports import Export, ExportTable
from ninep.server.identity import IdentityRule, parse_map
from ninep.server.session import SessionOptions
from transports.options import ConnectOptions

from .conftest import PKI, subject_of, tls_server


async def _uid_of_new_file(c: Client, root: int, name: str) -> int:
    await c.write_file(root, name, b"x")
    fid = await c.walk_path(root, name)
    try:
        return (await c.getattr(fid)).uid
    finally:
        await c.clunk(fid)


def _table() -> ExportTable:
    return ExportTable([Export("home", "home", MemoryBackend()), Export("alice", "home/alice", MemoryBackend()),
                        Export("shared", "shared", MemoryBackend()), Export("scratch", "", MemoryBackend())])


def test_identity_is_held_to_its_export_and_uid(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    alice = subject_of(pki.path("alice.pem"))
    options = SessionOptions(tls_identities={alice: IdentityRule(export="alice", uid=1234)})

    async def main() -> None:
        async with tls_server(pki.server, _table(), options) as addr:
            async with Client.connect(addr, options=ConnectOptions(tls=pki.client("bob"))) as c:
                # bob has no rule: he attaches where he likes, as whom he says.
                assert await _uid_of_new_file(c, await c.attach("shared", "root", 0), "by-bob") == 0
                with pytest.raises(ClientError) as e:
                    await c.attach("home/bob")  # export "home", directory bob: absent, not forbidden
                assert e.value.errno == errno.ENOENT
            async with Client.connect(addr, options=ConnectOptions(tls=pki.client("alice"))) as c:
                # alice claims root: the rule makes her 1234, wherever in her export she attaches.
                mine = await c.attach("/home/alice/", "root", 0)
                assert await _uid_of_new_file(c, mine, "by-alice") == 1234
                await c.mkdir(mine, "sub")
                sub = await c.attach("home/alice/sub", "root", 0)
                assert await _uid_of_new_file(c, sub, "deeper") == 1234
                for other in ("", "scratch-dir", "shared", "home", "home/bob"):
                    with pytest.raises(ClientError) as e:
                        await c.attach(other, "root", 0)
                    assert e.value.errno == errno.EACCES
                # The refusals did not cost her the connection.
                assert await c.read_file(mine, "by-alice") == b"x"

    trio.run(main)
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(refused) == 5 and all(alice in line and "only export alice" in line for line in refused), refused


def test_uid_only_rule_allows_every_export(pki: PKI) -> None:
    alice = subject_of(pki.path("alice.pem"))
    options = SessionOptions(tls_identities={alice: IdentityRule(uid=4321)})

    async def main() -> None:
        async with tls_server(pki.server, MemoryBackend(), options) as addr, \
                Client.connect(addr, options=ConnectOptions(tls=pki.client("alice"))) as c:
            root = await c.attach("", "nobody-in-particular", 0)
            assert await _uid_of_new_file(c, root, "f") == 4321

    trio.run(main)


def test_tls_map_syntax() -> None:
    assert parse_map("CN=alice,O=ninep=1000") == ("CN=alice,O=ninep", IdentityRule(uid=1000))
    for bad in ("alice=1000", "CN=alice", "CN=alice,O=ninep=x", "=5", f"CN=a={0xFFFFFFFF}"):
        with pytest.raises(ValueError):
            parse_map(bad)
