"""TLS on TCP: a mutually authenticated 9P session, and every way a handshake is refused.

Each refusal must be one log line naming the peer and the reason, close only that connection,
and leave a session already running over TLS untouched.
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from ninep.client import Client
from transports.address import listener_from_address
from transports.options import AddressError, ClientTLS, ConnectOptions, ListenOptions, ServerTLS

from .conftest import PKI, subject_of, tls_server


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "TLS handshake refused" in r.getMessage()]


def test_mutual_tls_session_carries_9p_and_logs_the_client_identity(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    alice = subject_of(pki.path("alice.pem"))

    async def main() -> None:
        async with tls_server(pki.server) as addr, Client.connect(addr, options=ConnectOptions(tls=pki.client())) as c:
            root = await c.attach()
            payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records per message
            await c.write_file(root, "f", payload)
            assert await c.read_file(root, "f") == payload

    trio.run(main)
    assert alice.startswith("CN=alice,") and alice.endswith(",O=ninep")
    connected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connection ")]
    assert any(f"({alice})" in line for line in connected), connected
    assert not refusals(caplog)


async def _attempt_no_client_cert(pki: PKI, addr: str) -> None:
    await _attempt(addr, pki.client(None))


async def _attempt_expired(pki: PKI, addr: str) -> None:
    await _attempt(addr, pki.client("expired"))


async def _attempt_other_ca(pki: PKI, addr: str) -> None:
    await _attempt(addr, pki.client("rogue-alice"))


async def _attempt(addr: str, tls: ClientTLS) -> None:
    # TLS 1.3: the client's side of the handshake may finish before the server has judged its
    # certificate; the refusal then shows as the connection closing on the first request.
    with pytest.raises(OSError):
        async with Client.connect(addr, options=ConnectOptions(tls=tls)) as c:
            await c.attach()


async def _raw(addr: str, data: bytes) -> bytes:
    _, host, port = addr.split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        if data:
            await stream.send_all(data)
        got = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                got += chunk
        return got


async def _attempt_plain_9p(pki: PKI, addr: str) -> None:
    version = b"9P2000.L"
    body = struct.pack("<BHIH", 100, 0xFFFF, 8192, len(version)) + version
    assert await _raw(addr, struct.pack("<I", 4 + len(body)) + body) == b""  # closed, no Rversion


async def _attempt_silent(pki: PKI, addr: str) -> None:
    assert await _raw(addr, b"") == b""  # the server gives up after handshake_timeout


@pytest.mark.parametrize(
    ("attempt", "reason"),
    [
        (_attempt_no_client_cert, "peer did not return a certificate"),
        (_attempt_expired, "certificate has expired"),
        (_attempt_other_ca, "unable to get local issuer certificate"),
        (_attempt_plain_9p, "wrong version number"),
        (_attempt_silent, "no handshake within"),
    ],
    ids=["no-client-cert", "expired", "other-ca", "plain-9p", "silent"],
)
def test_refused_handshake_is_one_log_line_and_spares_other_connections(
    pki: PKI, caplog: pytest.LogCaptureFixture, attempt: Callable[[PKI, str], Awaitable[None]], reason: str
) -> None:
    async def main() -> None:
        async with tls_server(pki.server) as addr, Client.connect(addr, options=ConnectOptions(tls=pki.client("bob"))) as good:
            root = await good.attach()
            await good.write_file(root, "before", b"1")
            await attempt(pki, addr)
            # The session that was already up goes on, and new good clients still get in.
            assert await good.read_file(root, "before") == b"1"
            async with Client.connect(addr, options=ConnectOptions(tls=pki.client())) as again:
                assert await again.read_file(await again.attach(), "before") == b"1"

    trio.run(main)
    lines = [r.getMessage() for r in refusals(caplog)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("tcp:127.0.0.1:") and reason in lines[0], lines[0]


def test_client_refuses_a_server_it_does_not_trust(pki: PKI) -> None:
    async def main() -> None:
        async with tls_server(pki.server) as addr:
            untrusted = ConnectOptions(tls=pki.client(ca="rogue-ca.pem"))
            with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
                async with Client.connect(addr, options=untrusted):
                    pass
            wrong_name = ClientTLS(ca=pki.path("ca.pem"), cert=pki.path("alice.pem"), key=pki.path("alice.pem"),
                                   server_name="files.example.org")
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
                async with Client.connect(addr, options=ConnectOptions(tls=wrong_name)):
                    pass

    trio.run(main)


def test_non_loopback_needs_tls_with_client_auth_or_insecure(pki: PKI) -> None:
    with pytest.raises(AddressError, match="--insecure"):
        listener_from_address("tcp:0.0.0.0:5640", ListenOptions())
    server_only = ServerTLS(cert=pki.path("server.pem"), key=pki.path("server.pem"))
    with pytest.raises(AddressError, match="--tls-client-ca"):
        listener_from_address("tcp:0.0.0.0:5640", ListenOptions(tls=server_only))
    # Mutual TLS is enough on its own; --insecure still allows plain TCP.
    listener_from_address("tcp:0.0.0.0:5640", ListenOptions(tls=pki.server))
    listener_from_address("tcp:0.0.0.0:5640", ListenOptions(insecure=True))


def test_unreadable_certificate_fails_when_the_listener_is_made(pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    bad = ServerTLS(cert=str(tmp_path / "junk.pem"), key=str(tmp_path / "junk.pem"), client_ca=pki.path("ca.pem"))
    with pytest.raises(ssl.SSLError):
        listener_from_address("tcp:127.0.0.1:0", ListenOptions(tls=bad))


def test_subject_rendering_matches_rfc4514_for_awkward_names(tmp_path: Path) -> None:
    import trustme

    from transports.tls import rfc4514

    ca = trustme.CA()
    pem = tmp_path / "odd.pem"
    ca.issue_cert("odd.test", common_name=' Doe, "J" <x>+y;z ', organization_name="#ninep\\labs").cert_chain_pems[0].write_to_path(str(pem))
    cert = ssl._ssl._test_decode_cert(str(pem))  # type: ignore[attr-defined]  # getpeercert()'s decoder
    assert rfc4514(cert["subject"]) == subject_of(str(pem))
    assert "\n" not in rfc4514(((("commonName", "evil\nWARNING forged"),),))


def test_shutdown_with_tls_clients_connected_finishes(pki: PKI) -> None:
    from fs_backends.memory import MemoryBackend
    from ninep.server.server import Server
    from ninep.server.session import SessionOptions

    async def main() -> None:
        server = Server(MemoryBackend(), SessionOptions(drain_seconds=1.0))
        listener = listener_from_address("tcp:127.0.0.1:0", ListenOptions(tls=pki.server))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            host, port = listener.bound  # type: ignore[attr-defined]
            async with Client.connect(f"tcp:{host}:{port}", options=ConnectOptions(tls=pki.client())) as c:
                root = await c.attach()
                with trio.fail_after(15):
                    server.shutdown()
                    while server.sessions:
                        await trio.sleep(0.05)
                with pytest.raises(OSError):
                    await c.read_file(root, "nothing")

    trio.run(main)
