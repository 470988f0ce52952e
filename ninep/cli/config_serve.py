"""`ninep serve --config FILE`: build the server an exports file describes, and reload it on SIGHUP.

Reload rules (`Reloader`):
- an export whose settings are unchanged keeps its Export object, hence its backend: its
  connections never notice the reload;
- a new export is offered to the next attach;
- a changed export (path, model, policy, listeners, ...) gets a new Export for new attaches; fids
  already attached through the old one keep using it (and its backend) until they are clunked;
  when only the policy or the listeners changed, the new Export shares the old backend;
- a removed export refuses new attaches (ENOENT, like any unknown aname), but fids already attached
  keep working until clunked or until their connection ends. We do not cut them off: the kernel
  client would turn a revoked fid into EIO in the middle of whatever a guest is doing (a write,
  a build), with no way to recover the mount; an administrator who wants them gone restarts the
  server or the guest unmounts. The old backend is closed once no fid uses it.
- a file that does not parse, or an export that cannot be opened, keeps the running config (the
  error is logged); changes to [server], [listeners], [limits] or the TLS files are logged as
  needing a restart and otherwise ignored; [[tls.client]] rules are reloaded.

This module must never parse the file itself (ninep.cli.config does) or touch messages.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable

import trio

from fs_backends.base import Backend
from ninep.cli.backends import make_backend
from ninep.cli.config import ConfigError, ExportConfig, ServerConfig, load
from ninep.cli.parsing import DEFAULT_MSIZE, MAX_MSIZE, parse_size
from ninep.cli.serving import direct_io_policy, run_server
from ninep.cli.spec import spec_from_export
from ninep.server.exports import Export, ExportTable
from ninep.server.server import Server
from ninep.server.session import SessionOptions
from transports.activation import listeners_from_sockets, take_inherited_sockets
from transports.address import listener_from_address
from transports.options import AddressError, ListenOptions, ServerTLS

log = logging.getLogger("ninep.config")

DEFAULT_LISTEN = "tcp:127.0.0.1:5640"



def make_exports(cfg: ServerConfig, previous: Iterable[Export] = ()) -> tuple[list[Export], list[Backend]]:
    """The Exports of `cfg`, reusing from `previous` every Export whose config is unchanged and
    every backend whose settings are. Returns them and the backends it opened (to close if the
    result is not used). Raises SystemExit with a message if a backend cannot be opened."""
    old = {e.name: e for e in previous}
    backends = {e.config.backend_key(): e.backend for e in old.values() if isinstance(e.config, ExportConfig)}
    exports: list[Export] = []
    made: list[Backend] = []
    try:
        for ec in cfg.exports:
            before = old.get(ec.name)
            if before is not None and before.config == ec:
                exports.append(before)
                continue
            backend = backends.get(ec.backend_key())
            if backend is None:
                try:
                    backend = make_backend(spec_from_export(ec))
                except SystemExit as e:
                    raise SystemExit(f"{e} (export {ec.name}, {cfg.file}:{ec.line})") from None
                made.append(backend)
                backends[ec.backend_key()] = backend
            exports.append(Export(ec.name, ec.aname, backend, ec.policy, ec.listeners, ec))
    except BaseException:
        _close_soon(made)
        raise
    return exports, made


def _close_soon(backends: list[Backend]) -> None:
    """Closes backends that were opened for nothing (outside or inside trio)."""
    async def close() -> None:
        for b in backends:
            await b.aclose()

    if not backends:
        return
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        trio.run(close)
        return
    trio.lowlevel.spawn_system_task(close)


def session_options(cfg: ServerConfig, msize: int, trace: bool) -> SessionOptions:
    kwargs: dict[str, object] = {"max_msize": msize, "trace": trace, **cfg.limits}
    if cfg.tls is not None and cfg.tls.identities:
        if cfg.tls.client_ca is None:
            raise ConfigError("[[tls.client]] rules need [tls] client_ca: identities come from client certificates",
                              cfg.file)
        kwargs["tls_identities"] = dict(cfg.tls.identities)
    return SessionOptions(**kwargs)  # type: ignore[arg-type]


def listen_options(cfg: ServerConfig, msize: int, args: argparse.Namespace) -> ListenOptions:
    tls = None
    if cfg.tls is not None and (cfg.tls.cert or cfg.tls.key or cfg.tls.client_ca):
        if not (cfg.tls.cert and cfg.tls.key):
            raise ConfigError("[tls] needs both cert and key", cfg.file)
        tls = ServerTLS(cert=cfg.tls.cert, key=cfg.tls.key, client_ca=cfg.tls.client_ca)
    return ListenOptions(max_msize=msize, tag=cfg.tag or args.tag, insecure=cfg.insecure or args.insecure, tls=tls,
                         poll_us=args.poll_us, direct_io=direct_io_policy())


class Reloader:
    """SIGHUP: re-read the file and install its exports (see the module docstring)."""

    def __init__(self, server: Server, cfg: ServerConfig) -> None:
        self.server, self.cfg = server, cfg

    async def __call__(self) -> None:
        file = self.cfg.file
        try:
            new = load(file)
        except ConfigError as e:
            log.error("reload of %s failed, keeping the running exports: %s", file, e)
            return
        try:
            exports, made = make_exports(new, self.server.exports)
        except SystemExit as e:
            log.error("reload of %s failed, keeping the running exports: %s", file, e)
            return
        try:
            changes = await self.server.replace_exports(exports)
        except ValueError as e:
            _close_soon(made)
            log.error("reload of %s failed, keeping the running exports: %s", file, e)
            return
        if new.server_wide() != self.cfg.server_wide():
            log.warning("reload of %s: changes to [server], [listeners], [limits] or the [tls] files "
                        "take effect only after a restart", file)
        if new.tls is not None:
            self.server.options.tls_identities = dict(new.tls.identities)
        self.cfg = new
        log.info("reloaded %s: %s", file, changes)


def serve_config(args: argparse.Namespace) -> int:
    """`ninep serve --config FILE [--listen ADDR ...]`."""
    if args.export is not None:
        print("ninep serve: give an EXPORT or --config FILE, not both", file=sys.stderr)
        return 2
    per_export = [flag for flag, given in (
        ("--readonly", args.readonly), ("--security-model", args.security_model is not None),
        ("--multidevs", args.multidevs != "remap"), ("--fmode", args.fmode is not None),
        ("--dmode", args.dmode is not None), ("--proxy", getattr(args, "proxy", False)),
    ) if given]
    if per_export:
        print(f"ninep serve: {', '.join(per_export)}: with --config, set this per export in the file",
              file=sys.stderr)
        return 2
    try:
        cfg = load(args.config)
        msize = min(parse_size(str(args.msize or cfg.msize or DEFAULT_MSIZE)), MAX_MSIZE)
        options = session_options(cfg, msize, bool(args.trace or cfg.trace))
        options.direct_io = getattr(args, "direct_io", True)
        lopts = listen_options(cfg, msize, args)
        # Before the backends: a proxy helper they fork must not inherit the sockets.
        inherited = listeners_from_sockets(take_inherited_sockets(), lopts)
        names = [lc.name for lc in cfg.listeners] + list(args.listen or [])
        addresses = [lc.address for lc in cfg.listeners] + list(args.listen or [])
        if not addresses and not inherited:
            names, addresses = [DEFAULT_LISTEN], [DEFAULT_LISTEN]
        for a in addresses:
            listener_from_address(a, lopts)  # validate early (and load the TLS certificates)
    except (ConfigError, AddressError) as e:
        print(f"ninep: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable or mismatched certificate or key (ssl.SSLError too)
        print(f"ninep: TLS: {e}", file=sys.stderr)
        return 2
    exports, _ = make_exports(cfg)
    server = Server(ExportTable(exports), options)
    for x in exports:
        log.info("export %s: aname %r -> %s (%s)", x.name, x.aname, x.config.path if isinstance(x.config, ExportConfig) else "?",
                 x.backend.info.name)
    log.info("serving %d exports from %s on %s", len(exports), cfg.file,
             ", ".join([*(x.address for x in inherited), *addresses]))
    trio.run(lambda: run_server(server, addresses, args, names=names, lopts=lopts, reload=Reloader(server, cfg),
                            inherited=inherited))
    return 0


__all__ = ["Reloader", "make_exports", "serve_config"]
