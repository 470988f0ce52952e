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
import sys
from collections.abc import Sequence

import trio

from ninep.cli import stats as stats_cli
from ninep.cli.backends import make_backend
from ninep.cli.parsing import DEFAULT_MSIZE, MAX_MSIZE, parse_size
from ninep.cli.serving import direct_io_policy, run_server
from ninep.cli.spec import add_backend_arguments, spec_from_args
from ninep.server.identity import IdentityRule, parse_map
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.address import listener_from_address
from transports.options import AddressError, ListenOptions

log = logging.getLogger("ninep")

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
        value = parse_size(text)
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


def _setup_logging(verbose: int, trace: bool) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose or trace else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if trace:
        logging.getLogger("ninep.trace").setLevel(logging.INFO)


def _poll_us(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError("--poll-us must be 0..100000")
    return value


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
    args.msize = min(parse_size(str(args.msize or DEFAULT_MSIZE)), MAX_MSIZE)
    try:
        # Before the backend: a proxy helper forked by make_backend must not inherit the sockets.
        from transports.activation import listeners_from_sockets, take_inherited_sockets

        lopts = _listen_options(args)
        inherited = listeners_from_sockets(take_inherited_sockets(), lopts)
        spec = spec_from_args(args.export, args)
        backend = make_backend(spec)
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
    options = SessionOptions(policy=spec.policy, max_msize=args.msize, trace=args.trace,
                             direct_io=args.direct_io, tls_identities=dict(args.tls_map),
                             **{name: getattr(args, name) for name in LIMITS})
    trio.run(lambda: run_server(Server(backend, options), addresses, args, lopts=lopts,
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
