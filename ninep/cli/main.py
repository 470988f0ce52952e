"""The `ninep` command: serve an export, mount one with FUSE, run the proxy helper and friends.

    ninep serve EXPORT --listen tcp:127.0.0.1:5640 [--listen unix:/run/9p.sock] [--readonly] ...
    ninep serve --config exports.toml          (several exports; SIGHUP reloads; see ninep.cli.config)
    ninep check-config exports.toml
    ninep mount SOURCE MOUNTPOINT ...          (FUSE; see ninep.cli.mount)

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
from collections.abc import Awaitable, Callable, Sequence

import trio

from fs_backends.base import Backend
from ninep.cli import stats as stats_cli
from ninep.metrics.counters import NBUCKETS
from ninep.server.identity import IdentityRule, parse_map
from ninep.server.policy import add_policy_arguments, policy_from_args
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.address import listener_from_address
from transports.base import Listener
from transports.options import AddressError, DirectIOPolicy, ListenOptions

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
    p.add_argument("--inline-metadata", action=argparse.BooleanOptionalAction, default=None,
                   help="run metadata syscalls and writes on the event loop while they do not block (saves "
                        "a thread handoff per request); default: on for exports on local filesystems (ext4, xfs, "
                        "btrfs, tmpfs...), off for network and FUSE ones")
    p.add_argument("--fmode", type=_octal, default=None,
                   help="host mode of new files in the mapped models (octal, default 0600)")
    p.add_argument("--dmode", type=_octal, default=None,
                   help="host mode of new directories in the mapped models (octal, default 0700)")
    add_policy_arguments(p)


#: SessionOptions fields set by `--max-…` options, with their help text.
LIMITS = {
    "max_connections": "connections served at once; more are refused with EUSERS and a log line",
    "max_fids": "fids one connection may hold; past it requests answer EMFILE",
    "max_inflight": "requests in flight per connection; past it the connection is not read until replies drain",
    "max_conn_memory": "bytes of request/reply buffers per connection (K/M suffixes); past it the "
                       "connection is not read until replies drain",
}


def _positive_size(text: str) -> int:
    try:
        value = _size(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    defaults = SessionOptions()
    for name, text in LIMITS.items():
        default = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=_positive_size, default=default,
                       help=f"{text} (default {default})")


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
        from ninep.cli.proxy_serve import make_proxy_backend

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


async def _serve(server: Server, addresses: Sequence[str], args: argparse.Namespace, *,
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


def _poll_us(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError("--poll-us must be 0..100000")
    return value


def direct_io_policy() -> DirectIOPolicy:
    """Direct I/O on vhost-user queues by the numbers of their owners: the metrics' latency
    histogram size and the local backend's inline-write back-off (its fds are the ones served)."""
    from fs_backends.local import LocalBackend

    return DirectIOPolicy(latency_buckets=NBUCKETS, write_slow=LocalBackend.INLINE_SLOW,
                          write_backoff=LocalBackend.INLINE_BACKOFF)


def _listen_options(args: argparse.Namespace) -> ListenOptions:
    if args.tls_map and not args.tls_client_ca:
        raise AddressError("--tls-map needs --tls-client-ca: identities come from client certificates")
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise AddressError("TLS needs both --tls-cert and --tls-key")
        from transports.options import ServerTLS

        tls = ServerTLS(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    return ListenOptions(max_msize=args.msize, tag=args.tag, insecure=args.insecure, tls=tls, poll_us=args.poll_us,
                         direct_io=direct_io_policy())


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, args.trace)
    if args.config is not None:
        from ninep.cli.config_serve import serve_config

        return serve_config(args)
    if args.export is None:
        print("ninep serve: give an EXPORT directory or --config FILE", file=sys.stderr)
        return 2
    args.msize = min(_size(str(args.msize or DEFAULT_MSIZE)), MAX_MSIZE)
    try:
        # Before the backend: a proxy helper forked by make_backend must not inherit the sockets.
        from transports.activation import listeners_from_sockets, take_inherited_sockets

        lopts = _listen_options(args)
        inherited = listeners_from_sockets(take_inherited_sockets(), lopts)
        backend = make_backend(args.export, args)
        addresses = args.listen or ([] if inherited else ["tcp:127.0.0.1:5640"])
        for a in addresses:
            listener_from_address(a, lopts)  # validate early (and load certificates)
        stats_cli.check_serve_arguments(args)
    except AddressError as e:
        print(f"ninep: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable or mismatched certificate or key (ssl.SSLError too)
        print(f"ninep: TLS: {e}", file=sys.stderr)
        return 2
    log.info("serving %s (%s) on %s", args.export, backend.info.name,
             ", ".join([*(x.address for x in inherited), *addresses]))
    options = SessionOptions(policy=policy_from_args(args), max_msize=args.msize, trace=args.trace,
                             direct_io=args.direct_io, tls_identities=dict(args.tls_map),
                             **{name: getattr(args, name) for name in LIMITS})
    trio.run(lambda: _serve(Server(backend, options), addresses, args, lopts=lopts,
                            inherited=inherited))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from ninep.cli.config import ConfigError, load

    try:
        cfg = load(args.file)
    except ConfigError as e:
        print(f"ninep: {e}", file=sys.stderr)
        return 2
    print(f"ok: {len(cfg.exports)} export{'s' if len(cfg.exports) != 1 else ''}")
    for ec in cfg.exports:
        reach = ", ".join(sorted(ec.listeners)) if ec.listeners is not None else "every listener"
        print(f"  {ec.name}: aname {ec.aname!r} -> {ec.path} ({ec.security_model or 'default model'}"
              f"{', read-only' if ec.readonly else ''}; {reach})")
    return 0


def _tls_map(text: str) -> tuple[str, IdentityRule]:
    try:
        return parse_map(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ninep", description="A 9P2000.L file server for VMs and developers.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="export a directory over 9P")
    s.add_argument("export", nargs="?", help="host directory to export (or memory: for an in-memory tree)")
    s.add_argument("--config", metavar="FILE",
                   help="serve the exports an exports file describes instead of EXPORT (SIGHUP reloads it)")
    s.add_argument("--listen", "-l", action="append", metavar="ADDR",
                   help="tcp:HOST:PORT, unix:PATH, fd:RFD,WFD, vhost-user:SOCK or xen:DOMID/DEVID "
                        "(repeatable; default tcp:127.0.0.1:5640)")
    s.add_argument("--msize", "--max-msize", default=None,
                   help="largest message size to agree to (default 512K, max 4M)")
    add_limit_arguments(s)
    s.add_argument("--tag", default="ninep", help="mount tag for virtio/Xen transports")
    s.add_argument("--poll-us", type=_poll_us, default=None, metavar="US",
                   help="vhost-user: spin up to US microseconds on an empty ring before sleeping until the "
                        "guest kicks (adaptive; default 400 with two CPUs or more, 0 never spins)")
    s.add_argument("--insecure", action="store_true",
                   help="allow TCP on non-loopback addresses without TLS client authentication")
    s.add_argument("--tls-cert", metavar="PEM", help="serve TCP with TLS: the server certificate (chain)")
    s.add_argument("--tls-key", metavar="PEM", help="the server certificate's private key (may be the same file)")
    s.add_argument("--tls-client-ca", metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--tls-map", metavar="SUBJECT=UID", type=_tls_map, action="append", default=[],
                   help="force the uid of clients whose certificate subject is SUBJECT, as logged "
                        "(e.g. 'CN=alice,O=ninep=1000'; repeatable)")
    s.add_argument("--trace", action="store_true", help="log every request and reply with its latency")
    s.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True,
                   help="let virtqueues answer reads and writes on open files themselves, in C "
                        "(default: on; --no-direct-io sends every request through the session)")
    s.add_argument("-v", "--verbose", action="count", default=0)
    add_backend_arguments(s)
    stats_cli.add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)
    stats_cli.add_parser(sub)

    c = sub.add_parser("check-config", help="validate an exports file without serving it")
    c.add_argument("file", help="the exports file (TOML)")
    c.set_defaults(func=cmd_check_config)

    for module in ("ninep.cli.mount", "ninep.cli.proxy", "ninep.cli.xen"):
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
