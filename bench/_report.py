"""Turns measured rows into what a person reads: ratios, issue 8's targets next to them, a text
table and one PNG chart per workload.

This module must never run anything; it formats results that already exist.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from bench._common import human
from bench._workloads import WORKLOADS

Row = dict[str, Any]


def best(rows: list[Row], target: str, workload: str, depth: int) -> Row | None:
    """The row with the highest median for (target, workload, depth) over the process counts."""
    cands = [r for r in rows if r["target"] == target and r["workload"] == workload and r["depth"] == depth
             and r["samples"]]
    return max(cands, key=lambda r: r["median"], default=None)


def raw_row(rows: list[Row], workload: str, depth: int) -> Row | None:
    r = best(rows, "raw", workload, depth)
    if r is not None:
        return r
    kind = WORKLOADS[workload].raw
    for name, wl in WORKLOADS.items():
        if wl.raw == kind and name != workload and WORKLOADS[name].connections == WORKLOADS[workload].connections:
            r = best(rows, "raw", name, depth)
            if r is not None:
                return r
    return None


def ratios(rows: list[Row]) -> list[Row]:
    out = []
    keys = sorted({(r["target"], r["workload"], r["depth"]) for r in rows if r["target"].startswith("ninep-")},
                  key=lambda k: (list(WORKLOADS).index(k[1]), k[2], k[0]))
    for target, workload, depth in keys:
        mine = best(rows, target, workload, depth)
        if mine is None:
            continue
        transport = target.split("-", 1)[1]
        diod = best(rows, f"diod-{transport}", workload, depth)
        raw = raw_row(rows, workload, depth)
        out.append({
            "workload": workload, "depth": depth, "target": target, "unit": mine["unit"],
            "ninep": mine["median"],
            "diod": diod["median"] if diod else None,
            "raw": raw["median"] if raw else None,
            "ninep_over_diod": mine["median"] / diod["median"] if diod and diod["median"] else None,
            "ninep_over_raw": mine["median"] / raw["median"] if raw and raw["median"] else None,
            # server CPU per unit of work: robust to a busy machine, lower is better
            "ninep_server_us": mine.get("server_us_per_unit"),
            "diod_server_us": diod.get("server_us_per_unit") if diod else None,
            "cpu_cost_ninep_over_diod": (mine["server_us_per_unit"] / diod["server_us_per_unit"]
                                         if diod and mine.get("server_us_per_unit") and diod.get("server_us_per_unit")
                                         else None),
        })
    return out


def _ratio(rat: list[Row], target: str, workload: str, depth: int, key: str) -> float | None:
    for r in rat:
        if r["target"] == target and r["workload"] == workload and r["depth"] == depth:
            v = r[key]
            return float(v) if v is not None else None
    return None


def targets(rows: list[Row], rat: list[Row], rss: list[Row]) -> list[Row]:
    """Issue 8's targets with what this run measured against each (printed, never enforced)."""
    out: list[Row] = []

    def entry(text: str, wanted: str, measured: dict[str, float | None]) -> None:
        shown = {k: v for k, v in measured.items() if v is not None}
        out.append({"target": text, "wanted": wanted, "measured": shown,
                    "note": "" if shown else "not measured in this run (server/transport/workload not selected or not available)"})

    def eff(target: str, workload: str, depth: int) -> float | None:
        c = _ratio(rat, target, workload, depth, "cpu_cost_ninep_over_diod")
        return 1 / c if c else None

    entry("Metadata round trips/s: ninep ≥ 1.0× diod at 32 in flight over a unix socket", "ninep/diod ≥ 1.0",
          {"metadata d=32 unix": _ratio(rat, "ninep-unix", "metadata", 32, "ninep_over_diod"),
           "metadata d=32 unix, by server CPU per op (diod µs ÷ ninep µs)": eff("ninep-unix", "metadata", 32)})
    for op in ("read", "write"):
        m: dict[str, float | None] = {}
        for ms in ("512k", "1m"):
            for d in (1, 8, 32):
                m[f"seq{op}-{ms} d={d} tcp"] = _ratio(rat, "ninep-tcp", f"seq{op}-{ms}", d, "ninep_over_diod")
            m[f"seq{op}-{ms} d=32 tcp, by server CPU per MiB (diod ÷ ninep)"] = eff("ninep-tcp", f"seq{op}-{ms}", 32)
        entry(f"1 MiB sequential T{op}: ninep ≥ 1.0× diod over TCP", "ninep/diod ≥ 1.0", m)
    m = {}
    for t in ("ninep-vhost-user", "ninep-xen"):
        for ms in ("512k", "1m"):
            for d in (1, 8, 32):
                m[f"{t} seqread-{ms} d={d}"] = _ratio(rat, t, f"seqread-{ms}", d, "ninep_over_raw")
    entry("1 MiB sequential Tread over the ring transports within 50 % of the raw filesystem", "ninep/raw ≥ 0.5", m)
    entry("Memory: RSS with 10 000 open fids and 256 connections ≤ 200 MiB", "RSS ≤ 200 MiB",
          {f"{r['target']} RSS MiB": r["rss_mib"] for r in rss if "rss_mib" in r and "error" not in r})
    return out


def table(result: dict[str, Any]) -> str:
    rows: list[Row] = result["results"]
    f = io.StringIO()
    p = lambda *a: print(*a, file=f)  # noqa: E731
    p(f"ninep benchmark — {result['machine']['host']} {result['machine']['utc']}  "
      f"({result['machine']['cpus']} CPUs, Python {result['machine']['python']}; "
      f"{result['config']['reps']} × {result['config']['duration']} s per cell{', QUICK' if result['config']['quick'] else ''})")
    p("cell = median (spread = (max-min)/median) · c = client CPU in cores · s = server CPU in cores · "
      "'!' = client-bound (c ≥ 0.9 per process)")
    for t in result["servers"].values():
        p(f"  {t['name']:<17} {t['kind']:<5} {t['transport']:<10} backend={t['backend']:<6} {t['note']}")
    for u in result["unavailable"]:
        p(f"  {u['name']:<17} unavailable: {u['reason']}")
    for name, where in result.get("hung", {}).items():
        p(f"  {name:<17} HUNG in {where} (no reply for 60 s); its later cells were skipped")
    for name, wl in WORKLOADS.items():
        wrows = [r for r in rows if r["workload"] == name]
        if not wrows:
            continue
        depths = sorted({r["depth"] for r in wrows})
        p("")
        p(f"{name}: {wl.title} [{wl.unit}]")
        p(f"  {'server':<17} {'procs':>5}  " + "  ".join(f"{'depth ' + str(d):>30}" for d in depths))
        for key in sorted({(r["target"], r["procs"]) for r in wrows}, key=lambda k: (_order(k[0]), k[1])):
            cells = []
            for d in depths:
                r = next((x for x in wrows if (x["target"], x["procs"], x["depth"]) == (*key, d)), None)
                if r is None:
                    cells.append(f"{'—':>30}")
                elif not r["samples"]:
                    cells.append(f"{'error':>30}")
                else:
                    flag = "!" if r["client_bound"] else " "
                    txt = (f"{human(r['median'], wl.unit)} ±{r['spread'] * 100:.0f}% "
                           f"c{r['client_cpu']:.2f}{flag}s{r['server_cpu']:.2f}")
                    cells.append(f"{txt:>30}")
            p(f"  {key[0]:<17} {key[1]:>5}  " + "  ".join(cells))
        notes = {f"{r['target']}: msize {r['msize']}" for r in wrows if r.get("msize") and r["target"].startswith("diod")}
        errs = {f"{r['target']} d={r['depth']}: {r['errors']} errors, first: {r['first_error']}" for r in wrows if r["errors"]}
        for n in sorted(notes | errs):
            p(f"    note: {n}")
    rat = result["ratios"]
    if rat:
        p("")
        p("ratios (ninep / other, same workload and depth; best process count of each).")
        p("  srv µs = server CPU µs per op / entry / MiB (lower is better; stable on a busy machine);")
        p("  cpu×diod = ninep's server CPU per unit of work ÷ diod's (below 1.0: ninep does the work with less CPU)")
        p(f"  {'workload':<14} {'depth':>5} {'ninep target':<17} {'ninep':>10} {'/diod':>7} {'/raw':>7} "
          f"{'srv µs':>8} {'diod µs':>8} {'cpu×diod':>8}")
        fmt = lambda v, f=".2f": format(v, f) if v is not None else "—"  # noqa: E731
        for r in rat:
            p(f"  {r['workload']:<14} {r['depth']:>5} {r['target']:<17} {human(r['ninep'], r['unit']):>10} "
              f"{fmt(r['ninep_over_diod']):>7} {fmt(r['ninep_over_raw']):>7} {fmt(r.get('ninep_server_us'), '.1f'):>8} "
              f"{fmt(r.get('diod_server_us'), '.1f'):>8} {fmt(r.get('cpu_cost_ninep_over_diod')):>8}")
    if result.get("rss"):
        p("")
        from bench._workloads import RSS_CONNECTIONS, RSS_FIDS

        p(f"server RSS with {RSS_FIDS} fids on distinct files over {RSS_CONNECTIONS} connections (unix socket)")
        for r in result["rss"]:
            txt = (f"{r['rss_mib']:.1f} MiB (idle before: {r['rss_before_mib']:.1f} MiB), {r.get('server_fds', '?')} fds"
                   if "rss_mib" in r and "error" not in r else f"error: {r.get('error')}")
            if not r.get("server_alive_after", True):
                txt += " — THE SERVER PROCESS DIED"
            p(f"  {r['target']:<17} {txt}")
    p("")
    p("targets from issue 8 (printed, not enforced)")
    for t in result["targets"]:
        p(f"  {t['target']}  [{t['wanted']}]")
        if t["note"]:
            p(f"      {t['note']}")
        for k, v in t["measured"].items():
            p(f"      {k}: {v:.2f}")
    return f.getvalue()


def _order(target: str) -> int:
    from bench._servers import ALL_TARGETS

    return ALL_TARGETS.index(target) if target in ALL_TARGETS else 99


def charts(result: dict[str, Any], outdir: Path, prefix: str) -> list[str]:
    """One grouped bar chart per workload (servers side by side at each depth); [] without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rows: list[Row] = result["results"]
    msizes = {t["name"]: t.get("msize") for t in result["servers"].values()}
    for name, wl in WORKLOADS.items():
        wrows = [r for r in rows if r["workload"] == name and r["samples"]]
        if not wrows:
            continue
        depths = sorted({r["depth"] for r in wrows})
        series = sorted({r["target"] for r in wrows}, key=_order)
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(depths) * max(1, len(series)) / 3), 4.2))
        width = 0.8 / len(series)
        for k, s in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for j, d in enumerate(depths):
                r = best(rows, s, name, d)
                if r is None:
                    continue
                xs.append(j + (k - (len(series) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            label = s + (f" (msize {msizes[s] // 1024} KiB)" if msizes.get(s) and s.startswith("diod") else "")
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label)
        ax.set_xticks(range(len(depths)), [f"{d} in flight" if wl.connections == "one" else f"{d} conn." for d in depths])
        vals = [r["median"] for r in wrows if r["median"] > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_yscale("log")  # raw is often 10-100× the servers: keep the servers readable
        ax.set_ylabel(wl.unit + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.set_title(f"{name}: {wl.title}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = outdir / f"{prefix}-{name}.png"
        with contextlib.suppress(Exception):
            fig.savefig(path, dpi=90)
            written.append(str(path))
        plt.close(fig)
    return written
