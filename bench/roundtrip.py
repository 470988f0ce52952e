#!/usr/bin/env python3
"""Round-trip benchmark of the core: Tgetattr round trips per second and 1 MiB Tread throughput
against a ninep server over a unix socket, with 1, 8 and 32 requests in flight.

    .venv/bin/python bench/roundtrip.py [--quick] [--duration S] [--reps N] [--out DIR]

The server is `ninep serve` on a temporary export (the local backend; the in-memory one when the
local backend is not built), the client is ninep's own (ninep/client.py) in a separate process.
Prints a table (median of the repetitions, spread, client and server CPU in cores) and writes
bench/results/roundtrip-<date>-<host>.json. `bench/run.py` is the full comparison with diod and the
raw filesystem; this is the quick number to watch while working on the core.

This script must never change what it measures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cells import cost_of, populate, run_cell  # noqa: E402
from bench._common import RESULTS, host, machine, stamp, summary, write_json  # noqa: E402
from bench._servers import ServerPool, start  # noqa: E402
from bench._workloads import Cell, MiB  # noqa: E402

#: (name, workload of bench/_workloads.py, unit)
TESTS = (("getattr", "getattr", "ops/s"), ("read-1MiB", "seqread-1m", "MiB/s"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.2 s cells, one repetition")
    ap.add_argument("--duration", type=float, help="seconds per cell (default 1.0)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    duration = args.duration or (0.2 if args.quick else 1.0)
    reps = args.reps or (1 if args.quick else 3)
    big = (16 if args.quick else 64) * MiB
    tmp = Path(tempfile.mkdtemp(prefix="ninep-roundtrip-"))
    export = tmp / "export"
    export.mkdir()
    rows: list[dict[str, Any]] = []
    try:
        pool = ServerPool(tmp, export)
        with start(pool, ["ninep-unix"]) as servers:
            if not servers.targets:
                raise SystemExit(f"ninep-unix unavailable: {servers.unavailable}")
            t = servers.targets[0]
            populate([t], export, big, 10)
            for name, workload, unit in TESTS:
                for depth in (1, 8, 32):
                    samples = [run_cell(Cell(target=t, workload=workload, depth=depth, duration=duration,
                                             cell_id=f"rt{depth}-{i}", big_size=big, dir_entries=10))
                               for i in range(reps)]
                    good = [s for s in samples if "error" not in s]
                    vals = [s["bytes_per_s"] / MiB if unit == "MiB/s" else s["ops_per_s"] for s in good]
                    row = {"test": name, "depth": depth, "unit": unit, "samples": vals, **summary(vals),
                           "client_cpu": summary([s["client_cpu"] for s in good])["median"],
                           "server_cpu": summary([s["server_cpu"] for s in good])["median"],
                           "msize": good[0]["msize"] if good else 0,
                           # CPU per op / per MiB: what a busy machine distorts least
                           "server_us_per_unit": summary([c for s in good if (c := cost_of(s, unit, "server"))])["median"],
                           "client_us_per_unit": summary([c for s in good if (c := cost_of(s, unit, "client"))])["median"],
                           "errors": [s["error"] for s in samples if "error" in s]}
                    rows.append(row)
                    print(f"{name:<10} {depth:>3} in flight  {row['median']:>10,.1f} {unit:<6} ±{row['spread'] * 100:.0f}%  "
                          f"client {row['client_cpu']:.2f} cores, server {row['server_cpu']:.2f} cores; "
                          f"CPU µs per {'MiB' if unit == 'MiB/s' else 'op'}: server {row['server_us_per_unit']:.0f}, "
                          f"client {row['client_us_per_unit']:.0f}"
                          + (f"  ERRORS {row['errors']}" if row["errors"] else ""), flush=True)
            backend = t.backend
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = write_json(args.out / f"roundtrip-{stamp()}-{host()}.json",
                      {"benchmark": "roundtrip", "machine": machine(), "transport": "unix", "backend": backend,
                       "duration": duration, "reps": reps, "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
