"""TLS on TCP: 9P stream framing over trio's SSLStream, with mutual authentication.

Server side: `ServerTLS` (certificate, key, and the CA that signs client certificates; declared in
`transports.options` with `ClientTLS`) becomes a
handshake run on every accepted TCP connection, in that connection's own task and under a time
limit. A failed handshake (no client certificate, a certificate from another CA, an expired one,
plain 9P sent to the TLS port, a client that never speaks) is one log line with the peer and the
reason, and only that connection closes. The Channel of a good handshake carries `identity`: the
verified client certificate's subject as an RFC 4514 string ("CN=alice,O=ninep"), which
`ninep.server.identity` maps to an export and a uid, and the session's log lines show next to the peer.

Client side: `ClientTLS` (CA to trust, optional client certificate and key) wraps a connected TCP
socket; the server's certificate must be valid for the host named in the address (or
`server_name`). A refused handshake raises the `ssl.SSLError` that says why.

This module must never interpret 9P messages (framing is `transports.stream`'s) or map
identities to users (that is `ninep.server.identity`).
"""

from __future__ import annotations

import logging
import re

import trio

from transports.base import Channel
from transports.options import ClientTLS, ListenOptions, ServerTLS
from transports.stream import STREAM_MAX_MESSAGE, StreamChannel, Upgrade, grow_send_buffer

log = logging.getLogger("ninep.transport")

# --- identities ---------------------------------------------------------------------------------

#: OpenSSL long names → the short names RFC 4514 (and `openssl x509 -nameopt RFC2253`) print.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    out = re.sub(r'([\\",+;<>])', r"\\\1", value)
    # Control characters as \XX: a subject must never break a log line in two.
    out = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\{ord(m.group()):02x}", out)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def rfc4514(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """A subject as `ssl.getpeercert()` gives it (RDNs in certificate order) as an RFC 4514
    string, which lists them last first: O=ninep then CN=alice prints "CN=alice,O=ninep"."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in reversed(subject)
    )


def _identity(stream: trio.SSLStream[trio.SocketStream]) -> str | None:
    cert = stream.getpeercert()
    subject = cert.get("subject") if cert else None
    return rfc4514(subject) if subject else None


def _reason(e: BaseException) -> str:
    """The OpenSSL reason behind a failed handshake, without the C source location."""
    cause = e.__cause__ or e
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(cause) or type(cause).__name__)


class TLSChannel(StreamChannel):
    """A 9P Channel over an established SSLStream; `identity` is the verified client subject."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], peer: str, identity: str | None,
                 max_message_size: int = STREAM_MAX_MESSAGE) -> None:
        # The session's log lines add the identity to the peer (ninep.server.session.Session.identity).
        super().__init__(stream, stream, peer, max_message_size)
        self.identity = identity
        self._stream = stream
        self._closed = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # close_notify is a courtesy: a peer that stopped reading must not hold us up.
        with trio.move_on_after(1.0):
            try:
                await self._stream.aclose()
                return
            except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(self._stream.transport_stream)


def server_upgrade(cfg: ServerTLS, max_message_size: int) -> Upgrade:
    """The per-connection handshake for `transports.stream.SocketListener` (loads the
    certificates now, so a bad file fails when the listener is made)."""
    ctx = cfg.context()

    async def upgrade(conn: trio.socket.SocketType, peer: str) -> Channel | None:
        grow_send_buffer(conn, min(max_message_size, 2 * 1024 * 1024) + 64 * 1024)
        stream = trio.SSLStream(trio.SocketStream(conn), ctx, server_side=True)
        try:
            with trio.fail_after(cfg.handshake_timeout):
                await stream.do_handshake()
        except trio.TooSlowError:
            log.warning("%s: TLS handshake refused: no handshake within %.0f s", peer, cfg.handshake_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.warning("%s: TLS handshake refused: %s", peer, _reason(e))
        else:
            channel = TLSChannel(stream, peer, _identity(stream), max_message_size)
            log.info("%s: TLS %s established with %s", peer, stream.version(), channel.identity or "no client certificate")
            return channel
        await trio.aclose_forcefully(stream.transport_stream)
        return None

    return upgrade


def tcp_upgrade(options: ListenOptions, max_message_size: int) -> Upgrade | None:
    """The TLS handshake for TCP connections when TLS is configured (loads the certificates now,
    so a bad file fails at start-up)."""
    if options.tls is None:
        return None
    return server_upgrade(options.tls, max_message_size)


async def client_channel(sock: trio.socket.SocketType, host: str, address: str, cfg: ClientTLS,
                         max_message_size: int = STREAM_MAX_MESSAGE) -> TLSChannel:
    """Runs the client handshake on a connected TCP socket; raises the `ssl.SSLError` (an
    OSError) that says why a server was not trusted, `TimeoutError` if it never answered."""
    grow_send_buffer(sock, min(max_message_size, 2 * 1024 * 1024) + 64 * 1024)
    stream = trio.SSLStream(trio.SocketStream(sock), cfg.context(), server_hostname=cfg.server_name or host)
    try:
        with trio.fail_after(cfg.handshake_timeout):
            await stream.do_handshake()
    except BaseException as e:
        await trio.aclose_forcefully(stream.transport_stream)
        if isinstance(e, trio.TooSlowError):
            raise TimeoutError(f"{address}: no TLS handshake within {cfg.handshake_timeout:.0f} s") from None
        if isinstance(e, trio.BrokenResourceError) and isinstance(e.__cause__, OSError):
            raise e.__cause__ from None
        raise
    return TLSChannel(stream, address, None, max_message_size)
