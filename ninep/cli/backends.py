"""Making the Backend a `BackendSpec` describes: memory, the local host directory (in its
security model), or the confined proxy.

This module must never parse arguments (`ninep.cli.spec` does) and reports what cannot be made
as SystemExit with the message for the user.
"""

from __future__ import annotations

import importlib
import os

from fs_backends.base import Backend
from ninep.cli.spec import BackendSpec


def make_backend(spec: BackendSpec) -> Backend:
    """A Backend for a host directory (or `memory:` for an in-memory tree)."""
    if spec.path == "memory:":
        from fs_backends.memory import MemoryBackend

        return MemoryBackend(readonly=spec.readonly)
    if spec.proxy is not None:
        from ninep.cli.proxy_serve import make_proxy_backend

        return make_proxy_backend(spec, spec.proxy)
    local = importlib.import_module("fs_backends.local")
    export = spec.path
    if not os.path.isdir(export):
        raise SystemExit(f"ninep: export {export!r} is not a directory")
    model = spec.security_model
    factory = getattr(local, "backend_for_model", None)
    if factory is not None:
        try:
            # `options`: the fmode/dmode/inline_metadata it reads are the spec's fields.
            backend: Backend = factory(export, model=model, readonly=spec.readonly, multidevs=spec.multidevs,
                                       options=spec)
        except (ValueError, PermissionError) as e:
            raise SystemExit(f"ninep: {e}") from None
        return backend
    if model not in (None, "none", "passthrough"):
        raise SystemExit(f"ninep: security model {model!r} is not available in this build")
    if model == "passthrough" and os.geteuid() != 0:
        raise SystemExit("ninep: --security-model passthrough needs root (use 'none' or a mapped model)")
    local_backend: Backend = local.LocalBackend(export, readonly=spec.readonly, multidevs=spec.multidevs)
    return local_backend


__all__ = ["make_backend"]
