"""`ninep mount SOURCE MOUNTPOINT`: show a backend (or a running 9P server) as a directory.

SOURCE is
- a host directory: served directly through `fs_backends.local.LocalBackend` under
  `--security-model`;
- `9p://HOST[:PORT][/ANAME]` or `tcp:HOST:PORT`, `unix:PATH`, `vhost-user:SOCK`, `xen:…`: a 9P
  server reached through `transports.address.connect_address` and `fs_backends.remote`;
- `memory:`: an empty in-memory tree (for trying things out).

Runs in the foreground with logs (Ctrl-C / SIGTERM / `fusermount3 -u MOUNTPOINT` unmount
cleanly); `--daemon` returns once the mount is up. SIGUSR1 logs the size of the inode and handle
tables. `ninep/cli/main.py` wires `add_parser`/`run` in as the `mount` subcommand; `python -m
ninep.cli.mount` runs it alone.

This module must never implement filesystem behaviour itself: it only parses, connects, mounts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from fs_backends.base import Backend, Cred, Node
from transports.options import ClientTLS

if TYPE_CHECKING:
    from fs_backends.remote import RemoteBackend
    from ninep.fuse.operations import FuseOperations

log = logging.getLogger("ninep.mount")

DEFAULT_9P_PORT = 564
REMOTE_SCHEMES = ("tcp:", "unix:", "fd:", "vhost-user:", "xen:")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "mount",
        help="mount a directory or a 9P server with FUSE",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", help="host directory, 9p://HOST:PORT/ANAME, unix:PATH, tcp:H:P, memory:"
    )
    p.add_argument("mountpoint", help="an existing directory to mount on")
    from ninep.cli.spec import add_backend_arguments

    add_backend_arguments(p)  # --readonly, --security-model, --multidevs (host directories)
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT…]",
        help="FUSE mount options passed through (allow_other, default_permissions, …)",
    )
    p.add_argument("--aname", default=None, help="attach name for a 9P server (default: from URL)")
    p.add_argument("--uname", default=None, help="user name sent in Tattach (default: $USER)")
    p.add_argument("--msize", type=int, default=1024 * 1024, help="9P msize to ask for")
    p.add_argument("--timeout", type=float, default=1.0, help="kernel attribute/entry cache (s)")
    p.add_argument(
        "--max-inodes",
        type=int,
        default=None,
        help="inodes to keep before asking the kernel to forget old ones (default: from the "
        "fd limit for a host directory, 40000 for a 9P server)",
    )
    p.add_argument(
        "--tls-ca", metavar="PEM", help="TLS to a tcp: server: the CA its certificate must chain to"
    )
    p.add_argument(
        "--tls-cert", metavar="PEM", help="TLS client certificate (for servers that ask for one)"
    )
    p.add_argument(
        "--tls-key", metavar="PEM", help="its private key (default: in the --tls-cert file)"
    )
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the server certificate must carry (default: the host of SOURCE)",
    )
    p.add_argument("--debug", action="store_true", help="log every FUSE call")
    p.add_argument("--daemon", action="store_true", help="detach once the mount is up")
    p.add_argument("--log-file", default=None, help="log here (with --daemon: instead of nowhere)")


@dataclass(slots=True)
class Source:
    kind: str  # "local" | "remote" | "memory"
    path: str = ""
    address: str = ""
    aname: str = ""


def parse_source(source: str, aname: str | None = None) -> Source:
    """Classify SOURCE (see the module docstring)."""
    if source.startswith("9p://"):
        u = urlsplit("ninep" + source[2:])  # urlsplit wants a scheme starting with a letter
        if not u.hostname:
            raise ValueError(f"no host in {source!r}")
        host = u.hostname
        if ":" in host:
            host = f"[{host}]"
        addr = f"tcp:{host}:{u.port or DEFAULT_9P_PORT}"
        return Source("remote", address=addr, aname=aname if aname is not None else u.path)
    if source.startswith(REMOTE_SCHEMES):
        return Source("remote", address=source, aname=aname or "")
    if source == "memory:":
        return Source("memory")
    return Source("local", path=source)


def client_tls(args: argparse.Namespace) -> ClientTLS | None:
    """TLS settings from --tls-*, or None when none was given (plain 9P)."""
    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert")
    return ClientTLS(
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key or args.tls_cert,
        server_name=args.tls_server_name,
    )


def raise_fd_limit() -> None:
    """Every inode the kernel holds keeps a backend handle (often an fd): allow many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = max(hard, min(int(f.read()), 1 << 20))
        except OSError:
            pass
    for want in (target, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return
        except (ValueError, OSError):
            continue


def default_max_inodes(source: str) -> int:
    """Local exports hold an fd per inode: stay well inside RLIMIT_NOFILE. 9P servers hold a
    fid per inode: stay inside what servers commonly allow (ninep: 65536 per connection)."""
    if parse_source(source).kind == "remote":
        return 40_000
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(256, int(soft * 0.6))


def make_local_backend(args: argparse.Namespace) -> Backend | None:
    """The Backend of a host directory (or memory:), made before trio starts: some models
    (proxy) fork a helper process, which must not inherit a running trio loop."""
    src = parse_source(args.source, args.aname)
    if src.kind not in ("local", "memory"):
        return None
    from ninep.cli.backends import make_backend
    from ninep.cli.spec import spec_from_args

    return make_backend(spec_from_args(src.path if src.kind == "local" else "memory:", args))


@dataclass(slots=True)
class Opened:
    """The backend SOURCE names, attached."""

    backend: Backend
    root: Node
    #: The same backend when it is a 9P server's connection (the mount ends when it drops).
    remote: RemoteBackend | None = None


async def open_backend(
    args: argparse.Namespace, stack: contextlib.AsyncExitStack, local: Backend | None = None
) -> Opened:
    """The Backend SOURCE names (`local` when already made) and its attached root."""
    src = parse_source(args.source, args.aname)
    uname = args.uname or os.environ.get("USER") or "root"
    cred = Cred(uid=os.geteuid(), gid=os.getegid(), uname=uname)
    backend: Backend
    remote: RemoteBackend | None = None
    if src.kind in ("local", "memory"):
        made = local if local is not None else make_local_backend(args)
        assert made is not None
        backend = made
        aname = ""
    else:
        from fs_backends.remote import RemoteBackend

        remote = await stack.enter_async_context(
            RemoteBackend.connect(src.address, msize=args.msize, uname=uname, tls=client_tls(args))
        )
        backend = remote
        aname = src.aname
    try:
        root = await backend.attach(aname, cred)
    except BaseException:
        with trio.CancelScope(shield=True):
            await backend.aclose()
        raise
    return Opened(backend, root, remote)


async def _signals(ops: FuseOperations, stopped: list[bool]) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as sigs:
        async for sig in sigs:
            if sig == signal.SIGUSR1:
                log.info("tables: %s", ops.stats())
                continue
            log.info("%s: unmounting", signal.Signals(sig).name)
            stopped.append(True)
            pyfuse3.terminate()


async def _watch_connection(remote: RemoteBackend, stopped: list[bool]) -> None:
    """A mount of a 9P server ends when the server goes away (rather than failing every call)."""
    import pyfuse3

    while remote.connected:
        await trio.sleep(0.5)
    log.error("connection to the 9P server lost: unmounting")
    stopped.append(False)  # False: stopped because of a failure
    pyfuse3.terminate()


async def amain(
    args: argparse.Namespace, ready: Callable[[], None], local: Backend | None = None
) -> int:
    """Mount, serve until unmounted; 0 on a requested unmount, 1 if the server went away."""
    async with contextlib.AsyncExitStack() as stack:
        return await _mount(args, ready, stack, local)


async def _mount(
    args: argparse.Namespace,
    ready: Callable[[], None],
    stack: contextlib.AsyncExitStack,
    local: Backend | None,
) -> int:
    import pyfuse3

    from ninep.cli.spec import policy_from_args
    from ninep.fuse.operations import FuseOperations
    from ninep.fuse.options import mount_options

    opened = await open_backend(args, stack, local)
    backend, root = opened.backend, opened.root
    ops = FuseOperations(
        backend,
        root,
        attr_timeout=args.timeout,
        entry_timeout=args.timeout,
        debug=args.debug,
        max_inodes=args.max_inodes or default_max_inodes(args.source),
        policy=policy_from_args(args),
    )
    extra = [o for opt in args.options for o in opt.split(",")]
    opts = mount_options(f"ninep:{args.source}", readonly=args.readonly, extra=extra)
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except BaseException:
        with trio.CancelScope(shield=True):
            await ops.forget_all()
            await backend.aclose()
        raise
    log.info("mounted %s on %s (%s)", args.source, mountpoint, ",".join(sorted(opts)))
    ready()
    unmounted = False
    # Why we stop while still mounted: True for a signal, False when the server went away.
    stopped: list[bool] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, ops, stopped)
            if opened.remote is not None:
                nursery.start_soon(_watch_connection, opened.remote, stopped)
            await pyfuse3.main()
            unmounted = not stopped
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            # After fusermount3 -u the kernel side is gone already; otherwise detach it now.
            pyfuse3.close(unmount=not unmounted)
            await ops.forget_all()
            await backend.aclose()
        log.info("unmounted %s%s", mountpoint, "" if unmounted else " (terminated)")
    return 0 if all(stopped) else 1


def _setup_logging(args: argparse.Namespace) -> None:
    handlers: list[logging.Handler] = []
    if args.log_file:
        handlers.append(logging.FileHandler(args.log_file))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )
    if not args.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        print("ninep mount needs pyfuse3 (pip install pyfuse3; apt install fuse3)", file=sys.stderr)
        return 2
    if not os.path.isdir(args.mountpoint):
        print(f"{args.mountpoint}: not a directory", file=sys.stderr)
        return 2
    try:
        src = parse_source(args.source, args.aname)
        if client_tls(args) is not None and not (
            src.kind == "remote" and src.address.startswith("tcp:")
        ):
            raise ValueError("--tls-* apply to a 9P server over TCP (9p://HOST… or tcp:HOST:PORT)")
    except ValueError as e:
        print(f"ninep mount: {e}", file=sys.stderr)
        return 2
    # Absolute paths: the daemon changes to / before mounting.
    args.mountpoint = os.path.abspath(args.mountpoint)
    if src.kind == "local":
        args.source = os.path.abspath(args.source)
    if args.daemon:
        return _run_daemon(args)
    _setup_logging(args)
    return _run_foreground(args, lambda: None)


def _run_foreground(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    try:
        raise_fd_limit()
        local = make_local_backend(args)
        return trio.run(amain, args, ready, local)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        log.error("mount failed: %s", e)
        return 1


def _run_daemon(args: argparse.Namespace) -> int:
    """Fork before trio starts; the parent exits 0 once the child reports the mount is up."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            ok = r.read(1) == b"1"
        if not ok:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            return code or 1
        print(pid)
        return 0
    os.close(rfd)
    os.setsid()
    _setup_logging(args)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if not args.log_file:
        os.dup2(devnull, 2)
    os.chdir("/")

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(wfd, b"1")
            os.close(wfd)

    code = _run_foreground(args, ready)
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ninep-mount", description=__doc__)
    configure_parser(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
