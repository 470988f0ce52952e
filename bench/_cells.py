"""Running benchmark cells: one workload's repetitions in forked workers with the server's CPU time
around the timed part, the per-unit cost of a sample, and populating an export before a run.

Shared by bench/run.py, bench/roundtrip.py and `run.py --profile` (bench/_profile.py); it must never
print or write results (the callers do).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench._servers import Target, cpu_seconds
from bench._workloads import Cell, MiB, WorkerLink, populate_9p, populate_host, worker_main

#: Seconds a cell may overrun before it is declared hung (its workers are killed, the run goes on).
CELL_GRACE = 60.0
CLIENT_BOUND = 0.9  # client CPU (cores per process) at which the client, not the server, limits
#: Workers are forked: they inherit the populated workload definitions without pickling them.
FORK = multiprocessing.get_context("fork")


def run_cells(cell: Cell) -> dict[str, list[dict[str, Any]]]:
    """Runs `cell` (cell.reps repetitions of each of its phases) in cell.procs forked workers that
    keep their connections between repetitions; per phase, one sample per repetition: the workers'
    numbers summed, plus the server's CPU time over the timed part."""
    barrier = FORK.Barrier(cell.procs + 1)
    queue = FORK.Queue()
    workers = [FORK.Process(target=worker_main, args=(replace(cell, proc_index=j), WorkerLink(barrier, queue)))
               for j in range(cell.procs)]
    for w in workers:
        w.start()
    out: dict[str, list[dict[str, Any]]] = {p: [] for p in cell.phases()}
    failed = ""
    for _ in range(cell.reps):
        for k, phase in enumerate(cell.phases()):
            if failed:
                out[phase].append({"error": failed})
                continue
            try:
                if k:
                    barrier.wait(timeout=CELL_GRACE)
                barrier.wait(timeout=CELL_GRACE)
            except threading.BrokenBarrierError:
                failed = "a worker failed before the timed part"
            cpu0, t0 = cpu_seconds(cell.target.pid), time.perf_counter()
            res: list[dict[str, Any]] = []
            give_up = time.monotonic() + cell.duration + CELL_GRACE
            while len(res) < len(workers) and not failed:
                try:
                    res.append(queue.get(timeout=1.0))
                except Exception:
                    if time.monotonic() > give_up:
                        failed = f"no answer {CELL_GRACE:.0f} s after the cell's end (hung; workers killed)"
                    elif not any(w.is_alive() for w in workers):
                        failed = "every worker exited without reporting"
            cpu1, t1 = cpu_seconds(cell.target.pid), time.perf_counter()
            errors = [r["error"] for r in res if "error" in r]
            if errors:
                failed = "; ".join(errors)
            good = [r for r in res if "error" not in r]
            if failed or len(good) != cell.procs:
                failed = failed or "worker lost"
                out[phase].append({"error": failed})
                continue
            wall = max(r["wall"] for r in good)
            out[phase].append({
                "ops": sum(r["ops"] for r in good), "bytes": sum(r["bytes"] for r in good),
                "ops_per_s": sum(r["ops"] / r["wall"] for r in good if r["wall"] > 0),
                "bytes_per_s": sum(r["bytes"] / r["wall"] for r in good if r["wall"] > 0),
                "wall": wall, "client_cpu": sum(r["cpu"] for r in good) / wall if wall else 0.0,
                "server_cpu": (cpu1 - cpu0) / (t1 - t0) if cell.target.pid and t1 > t0 else 0.0,
                "server_cpu_s": cpu1 - cpu0, "client_cpu_s": sum(r["cpu"] for r in good),
                "errors": sum(r["errors"] for r in good),
                "first_error": next((r["first_error"] for r in good if r["first_error"]), ""),
                "msize": good[0]["msize"],
            })
    for w in workers:
        w.join(timeout=5 if failed else 60)
        if w.is_alive():
            w.kill()
            w.join()
    return out


def run_cell(cell: Cell) -> dict[str, Any]:
    """One repetition of one workload: its sample."""
    return run_cells(replace(cell, reps=1, then=""))[cell.workload][0]


def cost_of(sample: dict[str, Any], unit: str, side: str) -> float | None:
    """CPU µs the server (or client) spent per unit of work (per op, entry or MiB). Unlike
    throughput it barely moves when other work competes for the machine's cores."""
    amount = sample["bytes"] / MiB if unit == "MiB/s" else sample["ops"]
    cpu = sample[f"{side}_cpu_s"]
    return cpu / amount * 1e6 if amount and (side == "client" or sample.get("server_cpu_s")) else None


def value_of(sample: dict[str, Any], unit: str) -> float:
    if unit == "MiB/s":
        return float(sample["bytes_per_s"]) / MiB
    return float(sample["ops_per_s"])



def populate(targets: list[Target], export: Path, big: int, entries: int) -> None:
    populate_host(str(export), big, entries)
    import trio

    done: set[int] = set()
    for t in targets:
        if t.populate_via_9p and t.pid not in done:
            trio.run(populate_9p, t, big, entries)
            done.add(t.pid)
