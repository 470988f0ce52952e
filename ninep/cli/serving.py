"""Running a Server until SIGINT/SIGTERM (and reloading on SIGHUP): the loop `ninep serve` ends
in, with or without an exports file.

This module must never build backends or parse arguments: it is handed a ready Server.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import trio

from ninep.cli import stats as stats_cli
from ninep.metrics.counters import NBUCKETS
from ninep.server.server import Server
from transports.address import listener_from_address
from transports.base import Listener
from transports.options import DirectIOPolicy, ListenOptions

log = logging.getLogger("ninep")


def direct_io_policy() -> DirectIOPolicy:
    """Direct I/O on vhost-user queues by the numbers of their owners: the metrics' latency
    histogram size and the local backend's inline-write back-off (its fds are the ones served)."""
    from fs_backends.local import LocalBackend

    return DirectIOPolicy(latency_buckets=NBUCKETS, write_slow=LocalBackend.INLINE_SLOW,
                          write_backoff=LocalBackend.INLINE_BACKOFF)


async def run_server(server: Server, addresses: Sequence[str], args: argparse.Namespace, *,
                 lopts: ListenOptions, names: Sequence[str] | None = None,
                 reload: Callable[[], Awaitable[None]] | None = None, inherited: Sequence[Listener] = ()) -> None:
    """`inherited`: listeners on sockets from systemd (transports.activation), served first and
    named by their address (systemd:NAME) for the exports' listener rules."""
    listeners = [*inherited, *(listener_from_address(a, lopts) for a in addresses)]
    if names is not None:
        names = [*(x.address for x in inherited), *names]
    only_fd = not inherited and all(a.startswith("fd:") for a in addresses)
    sigs = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if reload is not None else ()))
    with trio.open_signal_receiver(*sigs) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for sig in signals:
                    log.info("received %s", signal.Signals(sig).name)
                    if sig == signal.SIGHUP and reload is not None:
                        await reload()
                        continue
                    server.shutdown()
                    return

            nursery.start_soon(on_signal)

            async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(listeners, names=names, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(run)
            await stats_cli.start_endpoints(nursery, server.metrics, args)
            for export in server.exports:
                listening = getattr(export.backend, "listening", None)
                if listening is not None:
                    # Listeners are bound: a backend may now shed privileges (the proxy does).
                    listening()
            if only_fd:
                # An fd pair is a single connection: when it ends, the server is done.
                await trio.sleep(0.05)
                while server.sessions:
                    await trio.sleep(0.05)
                server.shutdown()


__all__ = ["run_server"]
