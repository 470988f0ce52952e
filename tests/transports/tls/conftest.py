"""Certificates made at test time (trustme) and a ninep server with TLS on 127.0.0.1.

`pki` writes, under a temporary directory: the CA that signs the server and the good clients
(`ca.pem`), the server certificate for 127.0.0.1 (`server.pem`, key and chain in one file),
`alice.pem` (CN=alice,O=ninep), `bob.pem` (CN=bob,O=ninep), `expired.pem` (alice, expired a day
ago), and `rogue-alice.pem` (alice again, but signed by another CA, `rogue-ca.pem`).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509

from fs_backends.base import Backend
from fs_backends.memory import MemoryBackend
from ninep.server.exports import ExportTable
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.address import listener_from_address
from transports.options import ClientTLS, ListenOptions, ServerTLS


@dataclass(frozen=True)
class PKI:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def server(self) -> ServerTLS:
        return ServerTLS(cert=self.path("server.pem"), key=self.path("server.pem"), client_ca=self.path("ca.pem"),
                         handshake_timeout=4.0)

    def client(self, who: str | None = "alice", ca: str = "ca.pem") -> ClientTLS:
        cert = self.path(f"{who}.pem") if who else None
        return ClientTLS(ca=self.path(ca), cert=cert, key=cert)


def subject_of(pem: str) -> str:
    """A certificate's subject as the server should report it (cryptography's RFC 4514 form;
    trustme adds a random OU, so tests never spell subjects out)."""
    return x509.load_pem_x509_certificate(Path(pem).read_bytes()).subject.rfc4514_string()


def make_pki(root: Path) -> PKI:
    ca, rogue = trustme.CA(organization_name="ninep test CA"), trustme.CA(organization_name="rogue CA")
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    rogue.cert_pem.write_to_path(str(root / "rogue-ca.pem"))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(root / "server.pem"))
    rogue.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(root / "rogue-server.pem"))
    for who in ("alice", "bob"):
        leaf = ca.issue_cert(f"{who}.clients.ninep.test", common_name=who, organization_name="ninep")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(root / f"{who}.pem"))
    now = datetime.datetime.now(datetime.UTC)
    old = ca.issue_cert("alice.clients.ninep.test", common_name="alice", organization_name="ninep",
                        not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    old.private_key_and_cert_chain_pem.write_to_path(str(root / "expired.pem"))
    fake = rogue.issue_cert("alice.clients.ninep.test", common_name="alice", organization_name="ninep")
    fake.private_key_and_cert_chain_pem.write_to_path(str(root / "rogue-alice.pem"))
    return PKI(root)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _transport_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ninep")


@asynccontextmanager
async def tls_server(tls: ServerTLS, backend: Backend | ExportTable | None = None,
                     options: SessionOptions | None = None) -> AsyncIterator[str]:
    """Serves `backend` or an export table (default: an empty memory tree) with TLS on 127.0.0.1; yields tcp:H:P."""
    server = Server(backend or MemoryBackend(), options or SessionOptions())
    listener = listener_from_address("tcp:127.0.0.1:0", ListenOptions(tls=tls))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [listener])
        host, port = listener.bound  # type: ignore[attr-defined]
        yield f"tcp:{host}:{port}"
        server.shutdown()
