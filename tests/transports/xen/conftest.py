"""Xen transport tests: builds the ring extension if needed (see xenharness)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

import tests.kits.xen  # noqa: F401  (builds transports._ring before any test imports it)


@pytest.fixture
def sock_path() -> Iterator[str]:
    # Short: unix socket paths are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    yield f"{d}/xs.sock"
    shutil.rmtree(d, ignore_errors=True)
