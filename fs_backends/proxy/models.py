"""Which local backend a credential model name means, inside the helper.

The credential models live in `fs_backends.security` / `fs_backends.local` (owned elsewhere);
this module only finds them by name, so the helper picks up the mapped models as soon as they
exist, without copying any of their logic.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
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
    from fs_backends import security

    if model not in MODELS:
        return False
    factory = getattr(security, "credentials_for_model", None)
    if factory is not None:
        try:
            factory(model)
        except ValueError:
            return False
        return True
    return any(getattr(security, n, None) is not None for n in _CLASS_NAMES.get(model, ()))


def _userns_tolerant(cls: type) -> type:
    """In a user namespace chown to an id outside the map fails with EINVAL where the host says
    EPERM; the `none` model ignores the latter at creation, so it must ignore the former too."""

    class UsernsTolerant(cls):
        def _own(self, fd: int, fmt: int, mode: int, cred: Any) -> None:
            try:
                super()._own(fd, fmt, mode, cred)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.ignore_create_chown_errors:
                    raise
                if fmt != stat.S_IFLNK:
                    os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)

    UsernsTolerant.__name__ = cls.__name__
    return UsernsTolerant


def make_local_backend(
    root: str,
    model: str,
    *,
    readonly: bool,
    multidevs: str,
    options: argparse.Namespace | None,
    userns: bool = False,
) -> Any:
    """A LocalBackend over `root` under `model`."""
    from fs_backends import local, security

    if model not in MODELS or not model_available(model):
        raise ModelUnavailable(f"security model {model!r} is not available in this build")
    factory = getattr(local, "backend_for_model", None)
    if factory is not None:
        opts = options if options is not None else argparse.Namespace()
        backend = factory(root, model=model, readonly=readonly, multidevs=multidevs, options=opts)
    else:
        cls = next(c for n in _CLASS_NAMES[model] if (c := getattr(security, n, None)) is not None)
        backend = local.LocalBackend(
            root, readonly=readonly, credentials=cls(), multidevs=multidevs  # type: ignore[arg-type]
        )
    if userns and getattr(backend.creds, "ignore_create_chown_errors", False):
        backend.creds.__class__ = _userns_tolerant(type(backend.creds))
    return backend
