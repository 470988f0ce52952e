"""`ninep xenstore-emu`: the subcommand that runs the emulated Xen platform daemon.

Registered by `ninep.cli.main` (it imports this module and calls `add_parser`). Must never hold any
daemon logic itself; that lives in `transports.xen.emu`.
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

import trio

from transports.xen.emu import serve_xenstore
from transports.xen.platform import default_socket


async def _serve_until_signalled(socket: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_xenstore, socket)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def run(args: argparse.Namespace) -> int:
    """Serves until SIGINT or SIGTERM, then removes the socket and exits 0."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    trio.run(_serve_until_signalled, args.socket)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "xenstore-emu",
        help="run the emulated Xen platform (xenstore, grants, event channels) for xen: addresses",
    )
    p.add_argument(
        "--socket",
        default=default_socket(),
        help="unix socket to listen on (default: $NINEP_XENSTORE or %(default)s)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)
