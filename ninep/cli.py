"""The `ninep` command: serve an export, mount one with FUSE, run the proxy helper and friends.

    ninep serve EXPORT --listen tcp:127.0.0.1:5640 [--listen unix:/run/9p.sock] [--readonly] ...
    ninep mount SOURCE MOUNTPOINT ...          (FUSE; see ninep.fuse_cli)

This module parses arguments and wires parts together; it must never contain protocol or
filesystem logic.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from fs_backends.base import Backend
from ninep.server import Server
from ninep.session import SessionOptions
from transports.address import AddressError, ListenOptions, listener_from_address

log = logging.getLogger("ninep")

DEFAULT_MSIZE = 512 * 1024
MAX_MSIZE = 4 * 1024 * 1024
SECURITY_MODELS = ("passthrough", "none", "mapped-xattr", "mapped-file", "proxy")


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    t = text.strip().lower().rstrip("ib")
    mult = units.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in units else t) * mult


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--readonly", action="store_true", help="refuse every change to the export")
    p.add_argument("--security-model", choices=SECURITY_MODELS, default=None,
                   help="how client credentials meet the host (default: passthrough as root, none otherwise)")
    p.add_argument("--multidevs", choices=("remap", "forbid", "warn"), default="remap",
                   help="what to do when the export spans several host filesystems")
    p.add_argument("--inline-metadata", action="store_true",
                   help="run metadata syscalls on the event loop while they stay under 2 ms (saves a thread "
                        "handoff per request; meant for exports on local disks)")
    p.add_argument("--fmode", type=_octal, default=None,
                   help="host mode of new files in the mapped models (octal, default 0600)")
    p.add_argument("--dmode", type=_octal, default=None,
                   help="host mode of new directories in the mapped models (octal, default 0700)")


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


def make_backend(export: str, args: argparse.Namespace) -> Backend:
    """A Backend for a host directory (or `memory:` for an in-memory tree)."""
    if export == "memory:":
        from fs_backends.memory import MemoryBackend

        return MemoryBackend(readonly=args.readonly)
    if args.security_model == "proxy" or getattr(args, "proxy", False):
        from fs_backends.proxy.serve import make_proxy_backend

        return make_proxy_backend(export, args)
    local = importlib.import_module("fs_backends.local")
    if not os.path.isdir(export):
        raise SystemExit(f"ninep: export {export!r} is not a directory")
    model = args.security_model
    factory = getattr(local, "backend_for_model", None)
    if factory is not None:
        try:
            backend: Backend = factory(export, model=model, readonly=args.readonly, multidevs=args.multidevs, options=args)
        except (ValueError, PermissionError) as e:
            raise SystemExit(f"ninep: {e}") from None
        return backend
    if model not in (None, "none", "passthrough"):
        raise SystemExit(f"ninep: security model {model!r} is not available in this build")
    if model == "passthrough" and os.geteuid() != 0:
        raise SystemExit("ninep: --security-model passthrough needs root (use 'none' or a mapped model)")
    local_backend: Backend = local.LocalBackend(export, readonly=args.readonly, multidevs=args.multidevs)
    return local_backend


def _setup_logging(verbose: int, trace: bool) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose or trace else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if trace:
        logging.getLogger("ninep.trace").setLevel(logging.INFO)


async def _serve(backend: Backend, addresses: Sequence[str], args: argparse.Namespace) -> None:
    options = SessionOptions(readonly=args.readonly, max_msize=args.msize, trace=args.trace)
    lopts = ListenOptions(max_msize=args.msize, tag=args.tag, insecure=args.insecure)
    listeners = [listener_from_address(a, lopts) for a in addresses]
    server = Server(backend, options)
    only_fd = all(a.startswith("fd:") for a in addresses)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for sig in signals:
                    log.info("received %s", signal.Signals(sig).name)
                    server.shutdown()
                    return

            nursery.start_soon(on_signal)

            async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(run)
            listening = getattr(backend, "listening", None)
            if listening is not None:
                # Listeners are bound: a backend may now shed privileges (the proxy does).
                listening()
            if only_fd:
                # An fd pair is a single connection: when it ends, the server is done.
                await trio.sleep(0.05)
                while server.sessions:
                    await trio.sleep(0.05)
                server.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, args.trace)
    args.msize = min(_size(str(args.msize)), MAX_MSIZE)
    try:
        backend = make_backend(args.export, args)
        addresses = args.listen or ["tcp:127.0.0.1:5640"]
        for a in addresses:
            listener_from_address(a, ListenOptions(insecure=args.insecure))  # validate early
    except AddressError as e:
        print(f"ninep: {e}", file=sys.stderr)
        return 2
    log.info("serving %s (%s) on %s", args.export, backend.info.name, ", ".join(addresses))
    trio.run(_serve, backend, addresses, args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ninep", description="A 9P2000.L file server for VMs and developers.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="export a directory over 9P")
    s.add_argument("export", help="host directory to export (or memory: for an in-memory tree)")
    s.add_argument("--listen", "-l", action="append", metavar="ADDR",
                   help="tcp:HOST:PORT, unix:PATH, fd:RFD,WFD, vhost-user:SOCK or xen:DOMID/DEVID "
                        "(repeatable; default tcp:127.0.0.1:5640)")
    s.add_argument("--msize", default=DEFAULT_MSIZE, help="largest message size to agree to (default 512K, max 4M)")
    s.add_argument("--tag", default="ninep", help="mount tag for virtio/Xen transports")
    s.add_argument("--insecure", action="store_true", help="allow unencrypted TCP on non-loopback addresses")
    s.add_argument("--trace", action="store_true", help="log every request and reply with its latency")
    s.add_argument("-v", "--verbose", action="count", default=0)
    add_backend_arguments(s)
    s.set_defaults(func=cmd_serve)

    for module in ("ninep.fuse_cli", "ninep.proxy_cli", "transports.xen.cli"):
        # Optional parts register their own subcommands; a part that is not built is absent.
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
