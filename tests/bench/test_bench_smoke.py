"""bench/run.py still runs end to end: one quick workload against ninep over a unix socket writes a
result file with the keys the README documents. Not a timed test: no number is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_writes_a_result_file(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", "metadata",
         "--servers", "ninep-unix", "--no-chart", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, list(out.iterdir())
    result = json.loads(files[0].read_text())
    for key in ("machine", "config", "servers", "results", "ratios", "targets"):
        assert key in result, key
    assert list(result["servers"]) == ["ninep-unix"]
    rows = result["results"]
    assert {(r["target"], r["workload"]) for r in rows} == {("ninep-unix", "metadata")}
    for r in rows:
        assert r["samples"], r  # every cell measured, none failed
        assert r["errors"] == 0, r
        assert r["median"] > 0
        for key in ("depth", "procs", "unit", "min", "max", "spread", "client_cpu", "server_cpu", "msize"):
            assert key in r, key
    assert (out / (files[0].stem + ".txt")).read_text().startswith("ninep benchmark")
