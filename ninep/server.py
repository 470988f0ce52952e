"""The 9P server: serves one Backend on any number of Listeners.

Each connection gets a `Session` in its own task; a connection's failure never takes the server
down. Shutdown (`Server.shutdown`, SIGINT/SIGTERM in the CLI) stops accepting, lets in-flight
requests finish for a few seconds, then cancels them and clunks every fid.

This module must never parse messages or touch files itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from fs_backends.base import Backend
from ninep.limits import refuse
from ninep.session import Session, SessionOptions, encode_error
from transports.base import Channel, Listener

log = logging.getLogger("ninep.server")


class Server:
    def __init__(self, backend: Backend, options: SessionOptions | None = None) -> None:
        self.backend = backend
        self.options = options or SessionOptions()
        self.sessions: set[Session] = set()
        #: Connections refused because max_connections were being served.
        self.refused = 0
        self._stopped = trio.Event()

    async def handle(self, channel: Channel) -> None:
        """Serve one connection until it ends."""
        if self._stopped.is_set():
            log.info("refusing connection from %s: shutting down", channel.peer)
            return
        if len(self.sessions) >= self.options.max_connections:
            self.refused += 1
            log.warning("refusing connection from %s: max-connections %d reached",
                        channel.peer, self.options.max_connections)
            await refuse(channel, "max-connections", encode_error)
            return
        session = Session(self.backend, channel, self.options)
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:
            log.exception("connection %d from %s failed", session.conn_id, channel.peer)
        finally:
            self.sessions.discard(session)

    async def serve(self, listeners: Sequence[Listener], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown`; returns after every connection has been cleaned up."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                await nursery.start(listener.serve, self.handle)
            task_status.started()
            await self._stopped.wait()
            # New connections are refused from here on (see handle); live ones drain.
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as drains:
                    for s in list(self.sessions):
                        drains.start_soon(s.drain)
            nursery.cancel_scope.cancel()
        await self.backend.aclose()

    def shutdown(self) -> None:
        log.info("shutting down: no new connections, draining %d", len(self.sessions))
        self._stopped.set()
