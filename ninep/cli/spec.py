"""What a backend is made from, as one typed value: the `BackendSpec`, built from the command
line (`spec_from_args`, with the backend options `add_backend_arguments` declares) or from an
exports-file entry (`spec_from_export`). `ninep.cli.backends.make_backend` takes only this.

This module must never make a backend or touch the host: it only describes one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ninep.cli.config import ExportConfig
from ninep.cli.parsing import MULTIDEVS, SECURITY_MODELS, parse_octal
from ninep.server.policy import OperationPolicy


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """How the confined proxy runs (`--proxy-model`, `--user`)."""

    #: The helper's credential model; None: the spec's security model, else the best available.
    model: str | None = None
    #: Who the server runs as once the helper is started; None: `nobody` when started as root.
    user: str | None = None


@dataclass(frozen=True, slots=True)
class BackendSpec:
    #: A host directory, or "memory:" for an in-memory tree.
    path: str
    security_model: str | None = None
    readonly: bool = False
    multidevs: str = "remap"
    #: Metadata syscalls and writes on the event loop while they do not block; None: by filesystem.
    inline_metadata: bool | None = None
    #: Host modes of new files and directories in the mapped models.
    fmode: int | None = None
    dmode: int | None = None
    #: What clients may do on it (the export's policy; not the backend's concern).
    policy: OperationPolicy = field(default_factory=OperationPolicy)
    #: Served through the confined proxy helper when set.
    proxy: ProxyOptions | None = None


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """The options `spec_from_args` reads (`ninep serve`, `ninep mount`)."""
    p.add_argument("--readonly", action="store_true", help="refuse every change to the export")
    p.add_argument("--security-model", choices=SECURITY_MODELS, default=None,
                   help="how client credentials meet the host (default: passthrough as root, none otherwise)")
    p.add_argument("--multidevs", choices=MULTIDEVS, default="remap",
                   help="what to do when the export spans several host filesystems")
    p.add_argument("--inline-metadata", action=argparse.BooleanOptionalAction, default=None,
                   help="run metadata syscalls and writes on the event loop while they do not block (saves "
                        "a thread handoff per request); default: on for exports on local filesystems (ext4, xfs, "
                        "btrfs, tmpfs...), off for network and FUSE ones")
    p.add_argument("--fmode", type=parse_octal, default=None,
                   help="host mode of new files in the mapped models (octal, default 0600)")
    p.add_argument("--dmode", type=parse_octal, default=None,
                   help="host mode of new directories in the mapped models (octal, default 0700)")
    add_policy_arguments(p)


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The one-export policy flags (`ninep serve`, `ninep mount`); --readonly is a backend option."""
    p.add_argument("--allow-devices", action="store_true",
                   help="let clients create block/char device nodes (passthrough/none; the mapped models always may)")
    p.add_argument("--allow-setid", action="store_true",
                   help="let clients set setuid/setgid bits on files (passthrough/none; the mapped models always may)")
    p.add_argument("--allow-privileged-xattrs", action="store_true",
                   help="let clients use trusted.*/security.* xattrs (passthrough only)")


def policy_from_args(args: argparse.Namespace) -> OperationPolicy:
    return OperationPolicy(
        readonly=bool(getattr(args, "readonly", False)),
        allow_devices=bool(getattr(args, "allow_devices", False)),
        allow_setid=bool(getattr(args, "allow_setid", False)),
        allow_privileged_xattrs=bool(getattr(args, "allow_privileged_xattrs", False)),
    )


def spec_from_args(path: str, args: argparse.Namespace) -> BackendSpec:
    """The spec the command line gives for `path`. The proxy options exist only where the proxy
    part registered them (`ninep.cli.proxy`), hence the defaults."""
    proxied = args.security_model == "proxy" or bool(getattr(args, "proxy", False))
    return BackendSpec(
        path=path, security_model=args.security_model, readonly=bool(args.readonly), multidevs=args.multidevs,
        inline_metadata=args.inline_metadata, fmode=args.fmode, dmode=args.dmode, policy=policy_from_args(args),
        proxy=ProxyOptions(getattr(args, "proxy_model", None), getattr(args, "user", None)) if proxied else None,
    )


def spec_from_export(ec: ExportConfig) -> BackendSpec:
    """The spec of one exports-file entry (which has no proxy options of its own)."""
    return BackendSpec(
        path=ec.path, security_model=ec.security_model, readonly=ec.readonly, multidevs=ec.multidevs,
        fmode=ec.fmode, dmode=ec.dmode, policy=ec.policy,
        proxy=ProxyOptions() if ec.security_model == "proxy" else None,
    )


__all__ = ["BackendSpec", "ProxyOptions", "add_backend_arguments", "add_policy_arguments", "policy_from_args",
           "spec_from_args", "spec_from_export"]
