"""Plain types the wire carries and every layer shares."""

from __future__ import annotations

from typing import NamedTuple


class Qid(NamedTuple):
    """The server's unique identity of a file: type (QT* bits), version, path (unique per file).

    A NamedTuple rather than a frozen dataclass because the codec creates one per decoded qid and
    per reply, and tuple construction is several times cheaper; it is immutable and hashable all
    the same."""

    type: int = 0
    version: int = 0
    path: int = 0
