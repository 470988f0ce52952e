"""The chroot proxy: a confined helper process does all filesystem access for an unprivileged
server. `wire` is the request format, `confine` the helper's sandbox, `helper` its request loop,
`spawn` how helpers are started, `backend` the server-side Backend (`ProxyBackend`)."""

import os

from fs_backends.proxy.backend import ProxyBackend
from fs_backends.proxy.spawn import DirectSpawner, HelperSpec, LauncherSpawner


def proxy_backend(export: str, model: str | None = None, *, readonly: bool = False,
                  multidevs: str = "remap") -> ProxyBackend:
    """A ProxyBackend over `export` with a directly spawned helper (tests, embedding). The
    default model is the local backend's: passthrough as root, none otherwise."""
    if model is None:
        model = "passthrough" if os.geteuid() == 0 else "none"
    return ProxyBackend(DirectSpawner(HelperSpec(export, model, readonly, multidevs)))


__all__ = ["DirectSpawner", "HelperSpec", "LauncherSpawner", "ProxyBackend", "proxy_backend"]
