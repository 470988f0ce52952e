#!/usr/bin/env python3
"""Run every benchmark that applies here: ninep (tcp, unix, fd; vhost-user and Xen ring when they
can be imported), diod (tcp, unix, fd) and the raw host directory, side by side.

    .venv/bin/python bench/run.py                 # the whole run (a few minutes on 2 cores)
    .venv/bin/python bench/run.py --quick         # smoke run: short cells, one repetition
    .venv/bin/python bench/run.py --only metadata,seqread-1m --servers ninep-unix,diod-unix
    .venv/bin/python bench/run.py --profile metadata [--servers ninep-unix] [--depth 32]

Writes bench/results/<date>-<host>.json, the same table as text (.txt) and one PNG chart per
workload; prints the table, the ratios ninep/diod and ninep/raw and issue 8's targets next to them.
See bench/README.md for what each workload does and how to read the numbers.

This script must never change the code it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _report  # noqa: E402
from bench._cells import CLIENT_BOUND, FORK, cost_of, populate, run_cells, value_of  # noqa: E402
from bench._common import RESULTS, host, machine, stamp, summary, write_json  # noqa: E402
from bench._servers import (  # noqa: E402
    ServerPool,
    Target,
    rss_mib,
    selected,
    start,
)
from bench._workloads import (  # noqa: E402
    WORKLOADS,
    Cell,
    MiB,
    _flatten,
    rss_hold,
)


def ensure_matplotlib() -> bool:
    """matplotlib for the charts, installed into this interpreter's environment if missing."""
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode != 0:
        return False
    import importlib

    importlib.invalidate_caches()
    try:
        import matplotlib  # noqa: F401, F811
    except ImportError:
        return False
    return True


# --- the run -----------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.duration = args.duration or (0.1 if self.quick else 0.3)
        self.reps = args.reps or (1 if self.quick else 3)
        self.big_size = (8 if self.quick else 64) * MiB
        self.dir_entries = 1000 if self.quick else 10_000
        self.workloads = [w for w in WORKLOADS if (w in args.only.split(",") if args.only else WORKLOADS[w].in_full_run)]
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.hung: dict[str, str] = {}  # target → the cell it hung in; its other cells are skipped
        self.serial = 0

    def depths(self, wl: str) -> tuple[int, ...]:
        if self.args.depth:
            return (self.args.depth,)
        d = WORKLOADS[wl].depths
        return tuple(x for x in d if x <= 8) or d if self.quick else d

    def applicable(self, t: Target, wl: str, depth: int) -> str:
        """'' when (target, workload, depth) can run, else why not."""
        w = WORKLOADS[wl]
        if t.kind == "raw":
            if w.raw is None:
                return "no raw equivalent"
            if wl.startswith("seq") and wl.endswith("-512k"):
                return "raw has no msize: see the -1m row"
            return ""
        if not t.multi_conn and (w.connections == "64" or (w.connections == "per_task" and depth > 1)):
            return f"{t.transport}: one connection at a time"
        return ""

    def cell(self, t: Target, wl: str, depth: int, procs: int) -> Cell:
        self.serial += 1
        return Cell(target=t, workload=wl, depth=depth, procs=procs, duration=self.duration,
                    cell_id=f"{t.name}-{self.serial}", big_size=self.big_size, dir_entries=self.dir_entries)

    def series(self, t: Target, wl: str, depth: int, procs: int) -> dict[str, list[dict[str, Any]]]:
        # Unlink always follows create, so the directory does not fill up across cells.
        cell = replace(self.cell(t, wl, depth, procs), reps=self.reps, then=WORKLOADS[wl].pairs_with or "")
        out = run_cells(cell)
        return {k: v for k, v in out.items() if k in self.workloads and not self.applicable(t, k, depth)}

    def record(self, t: Target, wl: str, depth: int, procs: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
        unit = WORKLOADS[wl].unit
        good = [s for s in samples if "error" not in s]
        vals = [value_of(s, unit) for s in good]
        med = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0  # noqa: E731
        row = {
            "target": t.name, "workload": wl, "depth": depth, "procs": procs, "unit": unit,
            "samples": vals, **summary(vals),
            "client_cpu": med([s["client_cpu"] for s in good]), "server_cpu": med([s["server_cpu"] for s in good]),
            "server_us_per_unit": med([c for s in good if (c := cost_of(s, unit, "server")) is not None]) or None,
            "client_us_per_unit": med([c for s in good if (c := cost_of(s, unit, "client")) is not None]) or None,
            "client_bound": bool(good) and med([s["client_cpu"] for s in good]) >= CLIENT_BOUND * procs,
            "msize": good[0]["msize"] if good else 0,
            "errors": sum(s["errors"] for s in good) + len(samples) - len(good),
            "first_error": next((s["error"] for s in samples if "error" in s), "")
            or next((s["first_error"] for s in good if s["first_error"]), ""),
        }
        self.rows.append(row)
        return row

    def measure(self, t: Target) -> None:
        order = [w for w in WORKLOADS if w in self.workloads or WORKLOADS[w].pairs_with in self.workloads]
        for wl in order:
            if wl == "unlink":
                continue  # measured together with create
            for depth in self.depths(wl):
                why = self.applicable(t, wl, depth)
                if t.name in self.hung:
                    why = f"skipped: {t.name} hung earlier ({self.hung[t.name]})"
                if why:
                    self.skipped.append({"target": t.name, "workload": wl, "depth": str(depth), "why": why})
                    continue
                procs_list = [1]
                while procs_list:
                    procs = procs_list.pop()
                    res = self.series(t, wl, depth, procs)
                    head = None
                    for name, samples in res.items():
                        hang = next((x["error"] for x in samples if "hung" in x.get("error", "")), None)
                        if hang:
                            self.hung[t.name] = f"{name} at depth {depth}"
                        if name in self.workloads:
                            r = self.record(t, name, depth, procs, samples)
                            head = head or r
                            self.progress(r)
                    # A saturated client hides the server: spread the load over more processes.
                    if (head and head["client_bound"] and procs == 1 and depth >= 8 and t.multi_conn
                            and t.kind != "raw" and not self.args.no_multiproc and WORKLOADS[wl].connections == "one"):
                        procs_list.append(self.args.procs_when_bound)

    def progress(self, r: dict[str, Any]) -> None:
        if self.args.verbose or not self.quick:
            status = f"{r['median']:,.1f} {r['unit']} ±{r['spread'] * 100:.0f}% c{r['client_cpu']:.2f} s{r['server_cpu']:.2f}"
            if not r["samples"]:
                status = f"ERROR {r['first_error']}"
            print(f"  {r['target']:<17} {r['workload']:<14} d={r['depth']:<3} p={r['procs']}  {status}", flush=True)

    def rss(self, targets: list[Target]) -> list[dict[str, Any]]:
        out = []
        for t in targets:
            if not t.multi_conn or t.kind == "raw" or t.transport != "unix":
                continue
            before = rss_mib(t.pid)
            barrier, done, q = FORK.Barrier(2), FORK.Event(), FORK.Queue()

            def child(t: Target = t, barrier: Any = barrier, done: Any = done, q: Any = q) -> None:
                import trio

                def ready() -> None:
                    barrier.wait(timeout=300)

                try:
                    res = trio.run(rss_hold, t, ready, done, self.dir_entries)
                    q.put(res)
                except BaseException as e:  # noqa: BLE001
                    barrier.abort()
                    q.put({"error": _flatten(e)})
                q.close()
                q.join_thread()
                os._exit(0)

            p = FORK.Process(target=child)
            p.start()
            row: dict[str, Any] = {"target": t.name, "rss_before_mib": before}
            try:
                barrier.wait(timeout=300)
                row["rss_mib"] = rss_mib(t.pid)
                with contextlib.suppress(OSError):
                    row["server_fds"] = len(os.listdir(f"/proc/{t.pid}/fd"))
            except threading.BrokenBarrierError:
                pass
            done.set()
            res = q.get(timeout=120)
            p.join(timeout=30)
            row.update(res)
            row["server_alive_after"] = os.path.exists(f"/proc/{t.pid}") and rss_mib(t.pid) > 0
            out.append(row)
            print(f"  {t.name:<17} rss with many fids: {row.get('rss_mib', 'error')}", flush=True)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 s cells, one repetition, depths ≤ 8")
    ap.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS) + ",rss")
    ap.add_argument("--servers", help="comma-separated targets or prefixes (ninep, diod-unix, raw…)")
    ap.add_argument("--duration", type=float, help="seconds per cell (default 0.3, quick 0.1)")
    ap.add_argument("--reps", type=int, help="repetitions per cell (default 3, quick 1)")
    ap.add_argument("--depth", type=int, help="only this many requests in flight")
    ap.add_argument("--no-multiproc", action="store_true", help="never spread a client-bound cell over processes")
    ap.add_argument("--procs-when-bound", type=int, default=2, help="processes for a client-bound cell (default 2)")
    ap.add_argument("--profile", metavar="WORKLOAD", help="run one workload under cProfile (py-spy if installed) and write the hot spots")
    ap.add_argument("--pyspy", action="store_true", help="with --profile: sample the server with py-spy (if installed) instead of cProfile")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for results (default bench/results)")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.only:
        unknown = [w for w in args.only.split(",") if w not in WORKLOADS and w != "rss"]
        if unknown:
            ap.error(f"unknown workload(s): {', '.join(unknown)}")
    if args.profile:
        from bench._profile import profile

        return profile(args)

    charts_ok = False if args.no_chart else ensure_matplotlib()
    run = Run(args)
    names = selected(args.servers)
    tmp = Path(tempfile.mkdtemp(prefix="ninep-bench-"))
    export = tmp / "export"
    export.mkdir()
    os.chmod(export, 0o755)
    prefix = f"{stamp()}-{host()}"
    rss: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        pool = ServerPool(tmp, export)
        with start(pool, names) as servers:
            targets = servers.targets
            for u in servers.unavailable:
                print(f"  {u.name}: unavailable — {u.reason}", flush=True)
            populate(targets, export, run.big_size, run.dir_entries)
            for t in targets:
                run.measure(t)
            want_rss = (args.only and "rss" in args.only.split(",")) or (not args.only and not args.quick)
            if want_rss:
                rss = run.rss(targets)
            server_info = {t.name: {**asdict(t), "msize": next((r["msize"] for r in run.rows if r["target"] == t.name and r["msize"]), 0)}
                           for t in targets}
            unavailable = [asdict(u) for u in servers.unavailable]
    finally:
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
    rat = _report.ratios(run.rows)
    result: dict[str, Any] = {
        "benchmark": "run", "machine": machine(),
        "config": {"quick": run.quick, "duration": run.duration, "reps": run.reps, "big_file_bytes": run.big_size,
                   "dir_entries": run.dir_entries, "client_bound_threshold": CLIENT_BOUND,
                   "workloads": {w: {"title": WORKLOADS[w].title, "unit": WORKLOADS[w].unit} for w in run.workloads},
                   "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                   "ninep_backend": pool.backend, "seconds": round(time.monotonic() - t_start, 1)},
        "servers": server_info, "unavailable": unavailable, "skipped": run.skipped, "hung": run.hung,
        "results": run.rows, "ratios": rat, "rss": rss,
        "targets": _report.targets(run.rows, rat, rss),
    }
    result["charts"] = _report.charts(result, args.out, prefix) if charts_ok else []
    text = _report.table(result)
    print()
    print(text)
    path = write_json(args.out / f"{prefix}.json", result)
    (args.out / f"{prefix}.txt").write_text(text)
    print(f"wrote {path} (+ .txt{', ' + str(len(result['charts'])) + ' charts' if result['charts'] else ''})")
    if not charts_ok and not args.no_chart:
        print("note: matplotlib unavailable, no charts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
