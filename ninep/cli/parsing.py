"""Values the command line and the exports file spell the same way: sizes ("512K"), octal modes
("0640"), the msize bounds and the names of the security models.

This module must never import the rest of the CLI (both the argument parser and the exports file
reader build on it) or raise SystemExit.
"""

from __future__ import annotations

import argparse

DEFAULT_MSIZE = 512 * 1024
MAX_MSIZE = 4 * 1024 * 1024
SECURITY_MODELS = ("passthrough", "none", "mapped-xattr", "mapped-file", "proxy")
MULTIDEVS = ("remap", "forbid", "warn")


def parse_size(text: str) -> int:
    """'512K', '1M', '4096' → bytes (ValueError or IndexError if it is not a size)."""
    units = {"k": 1024, "m": 1024 * 1024}
    t = text.strip().lower().rstrip("ib")
    mult = units.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in units else t) * mult


def parse_octal(text: str) -> int:
    """'0640' → 0o640 (an argparse type: ArgumentTypeError if it is not a mode)."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


__all__ = ["DEFAULT_MSIZE", "MAX_MSIZE", "MULTIDEVS", "SECURITY_MODELS", "parse_octal", "parse_size"]
