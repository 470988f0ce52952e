"""Small helpers shared by the benchmark scripts: where results go, what to call them, how to
summarise repeated samples.

This module must never start servers or run workloads; it only names, stores and summarises.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def ensure_repo_on_path() -> None:
    """Lets `python bench/x.py` import the project without installing it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def stamp() -> str:
    """Date-time part of a result file name (UTC, sortable)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def host() -> str:
    return socket.gethostname().split(".")[0] or "host"


def machine() -> dict[str, Any]:
    return {
        "host": host(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Other work on the machine skews every number; the load says how much there was.
        "loadavg": list(os.getloadavg()),
    }


def summary(samples: list[float]) -> dict[str, float]:
    """Median and spread of repeated measurements (spread = (max-min)/median)."""
    if not samples:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "spread": 0.0}
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / med if med else 0.0}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def human(value: float, unit: str) -> str:
    """A number with a unit, short enough for a table cell."""
    if unit == "MiB/s":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"
