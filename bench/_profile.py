"""`bench/run.py --profile WORKLOAD`: one workload against one ninep target, with the server and the
client profiled, and their hot spots written to bench/results/.

The server runs under py-spy when it is installed (sampling, little overhead, sees time spent in C
and syscalls) and under cProfile otherwise; the client worker always runs under cProfile.

This module must never change what it profiles.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._common import host, machine, stamp, write_json
from bench._servers import ServerPool, selected, start
from bench._workloads import WORKLOADS, Cell, MiB

TOP = 30


def _pstats_top(path: Path, limit: int = TOP) -> tuple[str, list[dict[str, Any]]]:
    out = io.StringIO()
    st = pstats.Stats(str(path), stream=out)
    st.strip_dirs()
    total = max(st.total_tt, 1e-9)  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{func} ({file}:{line})", "calls": nc, "self_s": tt, "total_s": ct,
                     "self_pct": 100 * tt / total})
    rows.sort(key=lambda r: -r["self_s"])
    text = io.StringIO()
    print(f"total profiled time {total:.3f} s", file=text)
    print(f"{'self %':>7} {'self s':>8} {'total s':>8} {'calls':>9}  function  — by self time", file=text)
    for r in rows[:limit]:
        print(f"{r['self_pct']:>6.1f}% {r['self_s']:>8.3f} {r['total_s']:>8.3f} {r['calls']:>9}  {r['function']}", file=text)
    print("", file=text)
    print(f"{'total s':>8} {'calls':>9}  function  — by cumulative time", file=text)
    for r in sorted(rows, key=lambda r: -r["total_s"])[:limit]:
        print(f"{r['total_s']:>8.3f} {r['calls']:>9}  {r['function']}", file=text)
    return text.getvalue(), rows[:limit]


def _pyspy_top(path: Path, limit: int = TOP) -> tuple[str, list[dict[str, Any]]]:
    """Self and total sample shares per function from py-spy's collapsed-stack output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        # "func (file:line)" → "func (file)": one row per function, not per line
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
    total = max(total, 1)
    rows = [{"function": f, "self_pct": 100 * c / total, "total_pct": 100 * inclusive[f] / total}
            for f, c in own.most_common(limit)]
    text = io.StringIO()
    print(f"py-spy samples: {total}", file=text)
    print(f"{'self %':>7} {'total %':>8}  function  — by own samples", file=text)
    for r in rows:
        print(f"{r['self_pct']:>6.1f}% {r['total_pct']:>7.1f}%  {r['function']}", file=text)
    print("", file=text)
    print(f"{'total %':>8}  function  — by inclusive samples", file=text)
    for f, c in inclusive.most_common(limit):
        print(f"{100 * c / total:>7.1f}%  {f}", file=text)
    return text.getvalue(), rows


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process ("ninep-fs-*" pool threads summed)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            name = head.split("(", 1)[1]
            name = "event loop thread" if tid == str(pid) else "other threads (fs pool, trio)"
            parts = rest.split()
            out[name] = out.get(name, 0.0) + (int(parts[11]) + int(parts[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def profile(args: argparse.Namespace) -> int:
    from bench._cells import populate, run_cell, value_of

    wl = args.profile
    if wl not in WORKLOADS:
        raise SystemExit(f"unknown workload {wl!r}; one of {', '.join(WORKLOADS)}")
    names = [n for n in selected(args.servers or "ninep-unix") if n.startswith("ninep-")]
    if not names:
        raise SystemExit("--profile needs a ninep target (--servers ninep-unix, ninep-tcp, …)")
    name = names[0]
    depth = args.depth or max(WORKLOADS[wl].depths)
    duration = args.duration or 3.0
    pyspy = (shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))) if args.pyspy else None
    tmp = Path(tempfile.mkdtemp(prefix="ninep-profile-"))
    export = tmp / "export"
    export.mkdir()
    server_prof = tmp / "server.prof"
    client_prof = tmp / "client.prof"
    spy_out = tmp / "server.pyspy.txt"
    pool = ServerPool(tmp, export, profile_server=None if pyspy else server_prof)
    big, entries = 64 * MiB, 10_000
    with start(pool, [name]) as servers:
        if not servers.targets:
            raise SystemExit(f"{name} unavailable: {servers.unavailable[0].reason if servers.unavailable else '?'}")
        t = servers.targets[0]
        populate([t], export, big, entries)
        spy = None
        if pyspy:
            spy = subprocess.Popen([pyspy, "record", "--pid", str(t.pid), "--rate", "500", "--format", "raw",
                                    "--duration", str(int(duration + 2)), "--output", str(spy_out), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # let py-spy attach before the timed part
        cell = Cell(target=t, workload=wl, depth=depth, procs=1, duration=duration, cell_id="prof", big_size=big,
                    dir_entries=entries, profile=str(client_prof))
        if not pyspy:
            os.kill(t.pid, signal.SIGUSR1)
        cpu0 = _thread_cpu(t.pid)
        res = run_cell(cell)
        cpu1 = _thread_cpu(t.pid)
        if not pyspy:
            os.kill(t.pid, signal.SIGUSR2)
            time.sleep(0.5)
        if spy is not None:
            spy.wait(timeout=60)
    # the server has been stopped: its cProfile file is written on exit
    res["server_threads_cpu_s"] = {k: round(cpu1.get(k, 0) - cpu0.get(k, 0), 3) for k in sorted(set(cpu0) | set(cpu1))}
    prefix = f"profile-{wl}-{name}-d{depth}-{stamp()}-{host()}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "profile", "machine": machine(), "workload": wl, "target": name,
                              "depth": depth, "duration": duration, "result": res,
                              "server_profiler": "py-spy" if pyspy else "cProfile (event loop thread, CPU time)",
                              "client_profiler": "cProfile (CPU time)"}
    if "error" not in res:
        report["throughput"] = {"value": value_of(res, WORKLOADS[wl].unit), "unit": WORKLOADS[wl].unit}
    texts = []
    head = (f"profile of {wl} ({WORKLOADS[wl].title}) on {name}, {depth} in flight, {duration} s\n"
            f"result: {report.get('throughput', res)}; client CPU {res.get('client_cpu', 0):.2f} cores, "
            f"server CPU {res.get('server_cpu', 0):.2f} cores; server CPU s by thread: {res.get('server_threads_cpu_s')}\n"
            f"per operation: client {res.get('client_cpu_s', 0) / max(res.get('ops', 1), 1) * 1e6:.0f} µs CPU, "
            f"server {res.get('server_cpu_s', 0) / max(res.get('ops', 1), 1) * 1e6:.0f} µs CPU "
            f"(profilers add overhead: compare with a run without --profile)\n")
    texts.append(head)
    for side, path, fn in (("server", spy_out if pyspy else server_prof, _pyspy_top if pyspy else _pstats_top),
                           ("client", client_prof, _pstats_top)):
        if path.exists():
            txt, rows = fn(path)
            report[f"{side}_top"] = rows
            texts.append(f"=== {side} ({'py-spy' if side == 'server' and pyspy else 'cProfile'}) ===\n{txt}")
        else:
            texts.append(f"=== {side}: no profile written ===\n")
    text = "\n".join(texts)
    print(text)
    write_json(out / f"{prefix}.json", report)
    (out / f"{prefix}.txt").write_text(text)
    print(f"wrote {out / prefix}.txt (+ .json)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0
