"""`ninep proxy-helper` and the proxy options of `ninep serve`.

    ninep proxy-helper --socket-fd N EXPORT [--model none|passthrough|mapped-xattr|mapped-file]
    ninep serve EXPORT --security-model proxy [--proxy-model MODEL] [--user NAME]

Argument wiring only; the helper lives in fs_backends.proxy.helper, the server side in
ninep.cli.proxy_serve.
"""

from __future__ import annotations

import argparse
from typing import Any

from fs_backends.proxy.helper import add_arguments, main_from_args
from ninep.cli.proxy_serve import add_serve_arguments


def _cmd(args: argparse.Namespace) -> int:
    return main_from_args(args)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "proxy-helper",
        help="the chroot proxy's confined helper (started by 'ninep serve --security-model proxy')",
        description="Confine to EXPORT (user+mount+pid namespaces, or a root-only mount namespace) "
        "and answer filesystem requests on the SOCK_SEQPACKET socket --socket-fd.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd)
    serve = getattr(sub, "choices", {}).get("serve")
    if serve is not None:
        add_serve_arguments(serve)
