"""`ninep serve --security-model proxy`: start the helper while privileged, then shrink the server.

Order of events:
1. `make_proxy_backend` (before any thread exists): as root, fork the launcher (which keeps only
   the identity helpers need) and start the first helper through it; unprivileged, start helpers
   directly (user namespaces need no privilege).
2. The server binds its listeners.
3. `ProxyBackend.listening()` calls `confine_server`: chroot into an empty, already-deleted
   directory (nothing can be created there and no host path resolves), drop supplementary
   groups, setgid/setuid to `--user` (default `nobody` when started as root) and set
   no_new_privs. From then on the server's only ways to files are the fds the helper hands it.

This module must never be imported by the helper (it is the server's side).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import sys
import tempfile

from fs_backends.proxy import confine as C
from fs_backends.proxy.backend import ProxyBackend
from fs_backends.proxy.models import model_available
from fs_backends.proxy.spawn import DirectSpawner, HelperSpec, LauncherSpawner, Spawner
from ninep.cli.spec import BackendSpec, ProxyOptions

log = logging.getLogger("ninep.proxy")

DEFAULT_USER = "nobody"


def choose_model(spec: BackendSpec, proxy: ProxyOptions) -> str:
    if proxy.model:
        return proxy.model
    if spec.security_model not in (None, "proxy"):
        return str(spec.security_model)
    return "mapped-xattr" if model_available("mapped-xattr") else "none"


def _user(name: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if name.isdigit():
            return int(name), int(name)
        raise SystemExit(f"ninep: no such user {name!r}") from None
    return pw.pw_uid, pw.pw_gid


def confine_server(uid: int, gid: int) -> None:
    """Make this (server) process unable to reach any host path, and unprivileged.

    chroot and the id changes apply to every thread (threads share the fs_struct; glibc
    broadcasts setuid/setgid to all threads)."""
    # Everything the server may import later must be imported by now: sys.path is gone after
    # this. The handler tables are (the Server built them before its listeners were bound).
    d = tempfile.mkdtemp(prefix="ninep-empty-")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.rmdir(d)
        os.fchdir(fd)
        os.chroot(".")
        os.chdir("/")
    finally:
        os.close(fd)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    C.prctl(C.PR_SET_NO_NEW_PRIVS, 1)
    sys.path[:] = []
    log.info("server confined: empty root, uid %d gid %d, no capabilities", uid, gid)


def make_proxy_backend(backend: BackendSpec, proxy: ProxyOptions) -> ProxyBackend:
    export = backend.path
    if not os.path.isdir(export):
        raise SystemExit(f"ninep: export {export!r} is not a directory")
    model = choose_model(backend, proxy)
    if not model_available(model):
        raise SystemExit(f"ninep: security model {model!r} is not available in this build")
    extra: list[str] = []
    for opt, v in (("fmode", backend.fmode), ("dmode", backend.dmode)):
        if v is not None:
            extra += [f"--{opt}", f"{v:o}"]
    spec = HelperSpec(os.path.realpath(export), model, backend.readonly, backend.multidevs, extra)
    root = os.geteuid() == 0
    user = proxy.user
    if model == "passthrough" and not root:
        raise SystemExit("ninep: the proxy's passthrough model needs root to start its helper")
    spawner: Spawner
    if root:
        st = os.stat(export)
        # The launcher keeps root only when a helper cannot be started otherwise.
        keep_root = model == "passthrough" or not C._userns_works(st.st_uid, st.st_gid)
        ident = (0, 0) if keep_root else (st.st_uid, st.st_gid)
        spawner = LauncherSpawner(spec, *ident)
    else:
        if user:
            raise SystemExit("ninep: --user needs the server to start as root")
        spawner = DirectSpawner(spec)
    made = ProxyBackend(spawner)
    if root:
        uid, gid = _user(user or DEFAULT_USER)
        made.listening = lambda: confine_server(uid, gid)  # type: ignore[method-assign]
    log.info("proxy helper: %s", made.info.extra)
    return made


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Options `ninep serve` gains for the proxy."""
    for args, kw in (
        (("--proxy",), dict(action="store_true",
                            help="serve through a confined helper process (= --security-model proxy)")),
        (("--proxy-model",), dict(choices=("none", "passthrough", "mapped-xattr", "mapped-file"),
                                  default=None, help="credential model of the proxy helper")),
        (("--user",), dict(default=None,
                           help="user the 9P server runs as once the proxy helper is started "
                                f"(default {DEFAULT_USER} when started as root)")),
    ):  # fmt: skip
        with contextlib.suppress(argparse.ArgumentError):  # another part already offers it
            p.add_argument(*args, **kw)
