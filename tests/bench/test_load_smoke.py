"""bench/load.py runs end to end: a few seconds of mixed load from two client processes against a
spawned server write a result with every operation measured and no error. Not a timed test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_short_load_run_writes_a_result_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "--seconds", "3", "--connections", "4",
         "--depth", "4", "--procs", "2", "--settle", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("load-*.json")
    result = json.loads(path.read_text())
    assert result["errors"] == 0, result["error_samples"]
    assert set(result["ops"]) == {"getattr", "walk", "clunk", "lopen", "read", "write", "readdir",
                                  "lcreate", "unlinkat"}
    for op, o in result["ops"].items():
        assert o["count"] > 0, op
        assert 0 < o["p50_ms"] <= o["p90_ms"] <= o["p99_ms"], (op, o)
        assert o["max_ms"] >= o["p99_ms"] * 0.98, (op, o)
    server = result["server"]
    assert server["peak_rss_mib"] >= server["rss_start_mib"] > 0
    assert server["rss_samples"], server
    assert server["log_tracebacks"] == 0
    assert "p99 ms" in proc.stdout
