"""Lazy access to the compiled ring extension, so importing the package works without it and
only using a ring needs it. Must never hold ring logic itself."""

from __future__ import annotations

import importlib
from typing import Any


def ring_ext() -> Any:
    return importlib.import_module("transports._ring")
