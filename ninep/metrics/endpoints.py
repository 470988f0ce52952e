"""The server's two metrics endpoints, each a small trio listener next to the 9P ones.

- The control socket (`ninep serve --stats unix:PATH`): a client connects and reads, to end of
  file, one JSON document — `Metrics.snapshot()` — then the server closes. Nothing is read from
  the client, so there is nothing to parse and nothing to get wrong; `ninep stats` and `ninep top`
  are its clients (`fetch_snapshot`). A unix socket is made owner-only (0600): the snapshot names
  peers and exports.
- Prometheus (`ninep serve --metrics tcp:127.0.0.1:9640`): a minimal HTTP/1.0 responder. GET
  /metrics answers the text exposition format; anything else is 404 or 405. One request per
  connection, a bounded request head, and a time limit, so a slow or hostile scraper costs
  nothing.

Both take `unix:PATH` or `tcp:HOST:PORT`; TCP binds to a non-loopback address only with
`--insecure`, as for 9P listeners. This module must never touch 9P sessions beyond reading
their metrics, and never block the event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ninep.metrics.counters import Metrics, prometheus_text
from transports.options import AddressError, is_loopback, parse_tcp

log = logging.getLogger("ninep.metrics")

#: Largest HTTP request head accepted, and how long a client may take to send it.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]


def check_address(address: str, *, insecure: bool = False) -> None:
    """Raises AddressError for an address the endpoints cannot or may not listen on."""
    scheme, _, rest = address.partition(":")
    if scheme == "unix":
        if not rest:
            raise AddressError("unix address must be unix:PATH")
    elif scheme == "tcp":
        host, _ = parse_tcp(rest)
        if not is_loopback(host) and not insecure:
            raise AddressError(f"refusing to serve metrics on non-loopback {host}; pass --insecure to do it anyway")
    else:
        raise AddressError(f"metrics address must be unix:PATH or tcp:HOST:PORT, not {address!r}")


async def _serve_stream(address: str, handler: StreamHandler, insecure: bool,
                        task_status: trio.TaskStatus[str]) -> None:
    """Listens on `address` and runs `handler` per connection; reports the bound address."""
    check_address(address, insecure=insecure)
    scheme, _, rest = address.partition(":")
    if scheme == "tcp":
        host, port = parse_tcp(rest)
        sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        bound = sock.getsockname()
        where = f"tcp:{bound[0]}:{bound[1]}"
        path = None
    else:
        path = rest
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        where = address
    sock.listen(64)
    try:
        log.info("metrics: listening on %s", where)
        task_status.started(where)
        await trio.serve_listeners(_guarded(handler), [trio.SocketListener(sock)])
    finally:
        sock.close()
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _guarded(handler: StreamHandler) -> StreamHandler:
    async def run(stream: trio.SocketStream) -> None:
        # A client that goes away mid-answer is its own problem, never the server's.
        try:
            async with stream:
                await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("metrics client went away: %s", e)

    return run


async def serve_control(metrics: Metrics, address: str, *, insecure: bool = False,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """The control socket: every connection gets one JSON snapshot, then end of file."""

    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(json.dumps(metrics.snapshot()).encode() + b"\n")

    await _serve_stream(address, answer, insecure, task_status)


async def serve_prometheus(metrics: Metrics, address: str, *, insecure: bool = False,
                           task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """GET /metrics over HTTP/1.0 in the Prometheus text format."""

    async def answer(stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_REQUEST_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        line = head.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2 or not parts[0].isalpha():
            await _respond(stream, 400, "Bad Request", b"bad request\n")
        elif parts[0] not in ("GET", "HEAD"):
            await _respond(stream, 405, "Method Not Allowed", b"only GET\n", extra="Allow: GET, HEAD\r\n")
        elif parts[1].split("?", 1)[0] != "/metrics":
            await _respond(stream, 404, "Not Found", b"try /metrics\n")
        else:
            body = prometheus_text(metrics.snapshot()).encode()
            await _respond(stream, 200, "OK", body, content_type=PROMETHEUS_CONTENT_TYPE,
                           head_only=parts[0] == "HEAD")

    await _serve_stream(address, answer, insecure, task_status)


async def _respond(stream: trio.SocketStream, code: int, reason: str, body: bytes, *,
                   content_type: str = "text/plain; charset=utf-8", extra: str = "",
                   head_only: bool = False) -> None:
    header = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    await stream.send_all(header.encode() + (b"" if head_only else body))


async def fetch_snapshot(address: str) -> dict[str, Any]:
    """A snapshot from a control socket (`unix:PATH`, `tcp:HOST:PORT`, or a bare path)."""
    scheme, _, rest = address.partition(":")
    if scheme == "tcp":
        host, port = parse_tcp(rest)
        stream: trio.SocketStream = await trio.open_tcp_stream(host, port)
    else:
        stream = await trio.open_unix_socket(rest if scheme == "unix" else address)
    chunks = []
    async with stream:
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    data: dict[str, Any] = json.loads(b"".join(chunks))
    return data
