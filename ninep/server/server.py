"""The 9P server: serves a table of exports (one Backend each) on any number of Listeners.

Each connection gets a `Session` in its own task; a connection's failure never takes the server
down. Shutdown (`Server.shutdown`, SIGINT/SIGTERM in the CLI) stops accepting, lets in-flight
requests finish for a few seconds, then cancels them, clunks every fid and closes every backend.

`replace_exports` (SIGHUP in the CLI) installs a new export table for the next attaches. Fids
already attached keep the Export they were attached through, so connections to an export that did
not change are untouched, and ones to a removed or changed export keep working until the fids are
clunked; the backend of a retired Export is closed once no fid and no current export uses it.

This module must never parse messages or touch files itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from fs_backends.base import Backend
from ninep.metrics.counters import Metrics
from ninep.server.exports import Export, ExportTable
from ninep.server.handlers.tables import dialect_tables
from ninep.server.limits import refuse
from ninep.server.session import Session, SessionOptions, encode_error
from transports.base import Channel, Listener

log = logging.getLogger("ninep.server")


@dataclass(slots=True)
class ExportChanges:
    """What `replace_exports` did, by export name (for the reload log line)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if names]
        return "; ".join(parts) or "no export changed"


class Server:
    def __init__(self, exports: ExportTable | Backend, options: SessionOptions | None = None) -> None:
        self.options = options or SessionOptions()
        if not isinstance(exports, ExportTable):
            # One backend: the whole server is one export reached by any aname.
            # Named after what it serves, so logs and metrics say which directory it is.
            name = str(exports.info.extra.get("root") or exports.info.name)
            exports = ExportTable.single(exports, self.options.policy, name=name)
        self.exports = exports
        self.sessions: set[Session] = set()
        #: Built once, before any connection (and before a confined server chroots): every
        #: session gets the same tables.
        self.handlers = dialect_tables()
        #: Connections refused because max_connections were being served.
        self.refused = 0
        #: Exports replaced or removed by a reload whose backend may still be in use.
        self._retired: list[Export] = []
        self._stopped = trio.Event()
        # A connection counts under its export from its first attach; before, under the only one.
        only = list(exports)
        self.metrics = Metrics(only[0].name if len(only) == 1 else "(unattached)")

    @property
    def backend(self) -> Backend:
        """The backend of a single-export server (tests and tools that made it from one)."""
        return next(iter(self.exports)).backend

    async def handle(self, channel: Channel, listener: str = "") -> None:
        """Serve one connection (that came in on the listener named `listener`) until it ends."""
        if self._stopped.is_set():
            log.info("refusing connection from %s: shutting down", channel.peer)
            return
        if len(self.sessions) >= self.options.max_connections:
            self.refused += 1
            log.warning("refusing connection from %s: max-connections %d reached",
                        channel.peer, self.options.max_connections)
            await refuse(channel, "max-connections", encode_error)
            return
        session = Session(self.exports, channel, self.handlers, self.options, listener)
        self.sessions.add(session)
        self.metrics.connect(session)
        try:
            await session.run()
        except Exception:
            log.exception("connection %d from %s failed", session.conn_id, channel.peer)
        finally:
            self.sessions.discard(session)
            self.metrics.disconnect(session)
            if self._retired:
                with trio.CancelScope(shield=True):
                    await self._close_unused()

    async def replace_exports(self, exports: Iterable[Export]) -> ExportChanges:
        """Installs a new export table (raises ValueError, keeping the old one, if it is not
        consistent). An Export object present in both tables is unchanged; one whose name is in
        both but that is a different object is changed."""
        new = list(exports)
        old = {e.name: e for e in self.exports}
        self.exports.replace(new)
        changes = ExportChanges()
        for e in new:
            before = old.pop(e.name, None)
            if before is None:
                changes.added.append(e.name)
            elif before is e:
                changes.unchanged.append(e.name)
            else:
                changes.changed.append(e.name)
                self._retired.append(before)
        for e in old.values():
            changes.removed.append(e.name)
            self._retired.append(e)
        await self._close_unused()
        return changes

    async def _close_unused(self) -> None:
        """Closes the backends of retired exports that no fid and no live export uses."""
        in_use = {id(f.export) for s in self.sessions for f in s.fids}
        keep = [e for e in self._retired if id(e) in in_use]
        drop = [e for e in self._retired if id(e) not in in_use]
        self._retired = keep
        live = {id(e.backend) for e in (*self.exports, *keep)}
        closed: set[int] = set()
        for e in drop:
            b = e.backend
            if id(b) in live or id(b) in closed:
                continue
            closed.add(id(b))
            log.info("export %s: closing its old backend (no fid uses it any more)", e.name)
            try:
                await b.aclose()
            except Exception:
                log.exception("export %s: closing the old backend failed", e.name)

    async def serve(self, listeners: Sequence[Listener], *, names: Sequence[str] | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown`; returns after every connection has been cleaned up and every
        backend closed. `names[i]` names `listeners[i]` for the exports' listener rules (default:
        its address)."""
        async with trio.open_nursery() as nursery:
            for i, listener in enumerate(listeners):
                name = names[i] if names is not None else listener.address
                await nursery.start(listener.serve, partial(self.handle, listener=name))
            task_status.started()
            await self._stopped.wait()
            # New connections are refused from here on (see handle); live ones drain.
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as drains:
                    for s in list(self.sessions):
                        drains.start_soon(s.drain)
            nursery.cancel_scope.cancel()
        backends = {id(e.backend): e.backend for e in (*self.exports, *self._retired)}
        for b in backends.values():
            await b.aclose()

    def shutdown(self) -> None:
        log.info("shutting down: no new connections, draining %d", len(self.sessions))
        self._stopped.set()
