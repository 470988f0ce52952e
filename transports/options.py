"""What a caller tells the transports: listen and connect options, TLS configuration, the
direct-I/O policy, the address error, and the plain checks on a TCP address (parse it, is it
loopback, may 9P be served on it with these options).

A leaf: everything else in `transports` (and `ninep.metrics`, which listens on the same kind of
addresses) imports it, so it must never import another transports module, open a socket, or
load a certificate before a listener or channel asks for the `ssl.SSLContext`.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

#: A client has this long to finish its handshake (slow peers must not pin a task forever).
HANDSHAKE_TIMEOUT = 10.0


class AddressError(ValueError):
    """An address that names no transport or is malformed."""


@dataclass(frozen=True, slots=True)
class ServerTLS:
    cert: str
    key: str
    #: CA file the client certificates must chain to; None: no client certificate asked for.
    client_ca: str | None = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            ctx.load_verify_locations(cafile=self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True, slots=True)
class ClientTLS:
    #: CA file the server certificate must chain to; None: the system's trusted CAs.
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    #: Name the server certificate must carry; None: the host of the address.
    server_name: str | None = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True, slots=True)
class DirectIOPolicy:
    """The numbers a device transport's direct I/O (transports/ring/direct.c) applies, owned by
    others and passed in by the composition root: the transports hold no copy of them."""

    #: Size of the latency histogram of requests served by direct I/O (the metrics' bucket count;
    #: bucket i counts requests whose microseconds have bit length i, the last takes the rest).
    latency_buckets: int
    #: A direct write that slept and took longer than this (seconds) turns direct writes off for
    #: `write_backoff` seconds (the local backend's inline-write policy).
    write_slow: float
    write_backoff: float


@dataclass(slots=True)
class ListenOptions:
    #: Largest msize the server will agree to (the transport may lower it further).
    max_msize: int = 4 * 1024 * 1024
    #: Mount tag presented by device transports (virtio config, Xen `tag` node).
    tag: str = "ninep"
    #: Allow non-loopback TCP binds without TLS client authentication.
    insecure: bool = False
    #: TLS on every TCP listener (transports.tls); None: plain TCP.
    tls: ServerTLS | None = None
    #: Longest spin (µs) of a vhost-user queue on its ring before sleeping until a kick
    #: (transports.virtio.polling); None: the default for this machine, 0: never spin.
    poll_us: int | None = None
    #: Direct I/O on vhost-user queues under this policy; None: every request goes to the session.
    direct_io: DirectIOPolicy | None = None


@dataclass(slots=True)
class ConnectOptions:
    max_msize: int = 4 * 1024 * 1024
    tag: str = "ninep"
    #: TLS for `tcp:` addresses (transports.tls); None: plain TCP.
    tls: ClientTLS | None = None


def parse_tcp(rest: str) -> tuple[str, int]:
    """(host, port) from the part of a `tcp:HOST:PORT` address after `tcp:`."""
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise AddressError(f"tcp address must be tcp:HOST:PORT, not tcp:{rest}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, options: ListenOptions) -> None:
    """Plain 9P carries no authentication: only loopback, unless TLS with client certificates
    guards the port or the user said --insecure."""
    authenticated = options.tls is not None and options.tls.client_ca is not None
    if not is_loopback(host) and not options.insecure and not authenticated:
        raise AddressError(f"refusing to serve 9P without TLS client authentication on non-loopback {host}; "
                           "give --tls-cert/--tls-key/--tls-client-ca, or pass --insecure to do it anyway")
