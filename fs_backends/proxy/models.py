"""Which local backend a credential model name means, inside the helper.

The credential models live in `fs_backends.security` / `fs_backends.local` (owned elsewhere);
this module only finds them by name, so the helper picks up the mapped models as soon as they
exist, without copying any of their logic.
"""

from __future__ import annotations

import argparse
from typing import Any

MODELS = ("none", "passthrough", "mapped-xattr", "mapped-file")

_CLASS_NAMES = {
    "none": ("NoneCredentials",),
    "passthrough": ("PassthroughCredentials",),
    "mapped-xattr": ("MappedXattrCredentials", "MappedCredentials"),
    "mapped-file": ("MappedFileCredentials",),
}


class ModelUnavailable(RuntimeError):
    pass


def model_available(model: str) -> bool:
    from fs_backends import local, security

    if getattr(local, "backend_for_model", None) is not None and model in MODELS:
        return True
    return any(getattr(security, n, None) is not None for n in _CLASS_NAMES.get(model, ()))


def make_local_backend(
    root: str, model: str, *, readonly: bool, multidevs: str, options: argparse.Namespace | None
) -> Any:
    """A LocalBackend over `root` under `model`."""
    from fs_backends import local, security

    if model not in MODELS:
        raise ModelUnavailable(f"unknown security model {model!r}")
    factory = getattr(local, "backend_for_model", None)
    if factory is not None:
        opts = options if options is not None else argparse.Namespace()
        return factory(root, model=model, readonly=readonly, multidevs=multidevs, options=opts)
    for name in _CLASS_NAMES[model]:
        cls = getattr(security, name, None)
        if cls is not None:
            return local.LocalBackend(
                root, readonly=readonly, credentials=cls(), multidevs=multidevs  # type: ignore[arg-type]
            )
    raise ModelUnavailable(f"security model {model!r} is not available in this build")
