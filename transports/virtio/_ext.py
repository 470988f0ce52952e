"""Loads the compiled ring extension for the virtio transport, with an error that says how to
build it. This module must never fall back to a pure-Python ring: shared memory is only ever
touched through the bounds-checked C code."""

from __future__ import annotations

try:
    # Typed by transports/_ring.pyi; the module itself exists only once built.
    from transports import _ring
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "the virtio transport needs the compiled extension transports._ring, which is not built: "
        "install the package with `pip install .` or build it in place with "
        "`python setup.py build_ext --inplace` (a C compiler and Python headers are required)"
    ) from exc

MemTable = _ring.MemTable
VirtQueue = _ring.VirtQueue
Chain = _ring.Chain
VirtqError = _ring.VirtqError
drain_eventfd = _ring.drain_eventfd
signal_eventfd = _ring.signal_eventfd
