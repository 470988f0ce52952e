"""systemd socket activation: serve the listening sockets a service manager passed in.

The protocol (sd_listen_fds(3)): `LISTEN_PID` is our pid, `LISTEN_FDS=N` means fds 3..3+N-1 are
listening sockets, and `LISTEN_FDNAMES` optionally names them (colon-separated, from
`FileDescriptorName=` in the .socket unit). The variables are removed from the environment as
they are read, so processes we start (the proxy helper) do not take the sockets for theirs, and
the fds are made close-on-exec for the same reason.

Each socket becomes a `transports.stream.SocketListener` named `systemd:NAME`: unix sockets as
they are, TCP ones under the same rules as `--listen tcp:` (TLS when configured; a non-loopback
address needs TLS client authentication or --insecure). The listener never unlinks an inherited
unix socket's path: it belongs to the service manager.

This module must never bind or create sockets, and must never touch sockets meant for another
process (LISTEN_PID not ours).
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from transports.options import AddressError, ListenOptions, check_exposure
from transports.stream import STREAM_MAX_MESSAGE, SocketListener
from transports.tls import tcp_upgrade

LISTEN_FDS_START = 3


def take_inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """(name, socket) for each socket passed to this process; [] when none were. Unsets the
    LISTEN_* variables either way. Raises AddressError for an fd that is not a listening stream
    socket (a unit passing a datagram socket, say): serving it would fail obscurely later."""
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    names_var = env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise AddressError(f"LISTEN_FDS={count!r} is not a number")
    n = int(count)
    names = names_var.split(":") if names_var else []
    found: list[tuple[str, socket.socket]] = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise AddressError(f"inherited fd {fd} (LISTEN_FDS={n}) is not a socket: {e}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise AddressError(f"inherited fd {fd} is not a listening stream socket")
        name = names[i] if i < len(names) and names[i] else str(fd)
        found.append((name, sock))
    return found


def listeners_from_sockets(inherited: list[tuple[str, socket.socket]], options: ListenOptions) -> list[SocketListener]:
    limit = min(options.max_msize, STREAM_MAX_MESSAGE)
    listeners = []
    for name, sock in inherited:
        address = f"systemd:{name}"
        sockname = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            path = sockname.decode(errors="replace") if isinstance(sockname, bytes) else sockname
            listeners.append(SocketListener(address, socket.AF_UNIX, path or "(unnamed)", limit, inherited=sock))
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                check_exposure(sockname[0], options)
            except AddressError as e:
                raise AddressError(f"{address}: {e}") from None
            listeners.append(SocketListener(address, sock.family, sockname[:2], limit, inherited=sock,
                                            upgrade=tcp_upgrade(options, limit)))
        else:
            raise AddressError(f"{address}: unsupported socket family {sock.family!r}")
    return listeners
