"""`ninep stats SOCKET` and `ninep top SOCKET`: read a server's control socket and show it.

    ninep serve EXPORT --stats unix:/run/ninep.stats [--metrics tcp:127.0.0.1:9640]
    ninep stats unix:/run/ninep.stats [--json]
    ninep top unix:/run/ninep.stats [--interval 1] [--once]

`stats` prints the totals since start (per operation, per export, per connection); `top` shows
rates over the last interval, refreshed live (q or Ctrl-C quits), like diod's dtop; when its
output is not a terminal it prints one screen per interval instead. Both are
clients of the JSON snapshot `ninep.metrics.endpoints` serves; this module also adds the `--stats`
and `--metrics` options to `ninep serve` and starts those endpoints. It must never compute a
metric itself: it only formats differences of snapshots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

import trio

from ninep.metrics.counters import Metrics
from ninep.metrics.endpoints import check_address, fetch_snapshot, serve_control, serve_prometheus

Snapshot = dict[str, Any]


# --- `ninep serve` options ------------------------------------------------------------------------


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats", metavar="ADDR", default=None,
                   help="control socket for `ninep stats`/`ninep top` (unix:PATH or tcp:127.0.0.1:PORT; default off)")
    p.add_argument("--metrics", metavar="ADDR", default=None,
                   help="serve Prometheus metrics on GET /metrics (tcp:127.0.0.1:PORT or unix:PATH; default off)")


def check_serve_arguments(args: argparse.Namespace) -> None:
    """Raises AddressError for a bad --stats/--metrics address (before anything starts)."""
    for address in (args.stats, args.metrics):
        if address:
            check_address(address, insecure=args.insecure)


async def start_endpoints(nursery: trio.Nursery, metrics: Metrics, args: argparse.Namespace) -> None:
    if args.stats:
        await nursery.start(lambda task_status: serve_control(
            metrics, args.stats, insecure=args.insecure, task_status=task_status))
    if args.metrics:
        await nursery.start(lambda task_status: serve_prometheus(
            metrics, args.metrics, insecure=args.insecure, task_status=task_status))


# --- formatting ---------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f}µs"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    return f"{s:.2f}s"


def uptime(snap: Snapshot) -> str:
    secs = int(snap["time"] - snap["started"])
    return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def quantile(op: dict[str, Any], bounds: list[float], q: float) -> str:
    """The histogram bucket the q-quantile falls in, as '≤ bound'."""
    total = op["count"]
    if not total:
        return "-"
    need, cum = q * total, 0
    for i, n in enumerate(op["buckets"]):
        cum += n
        if cum >= need:
            return f"≤{human_seconds(bounds[i])}" if i < len(bounds) else f">{human_seconds(bounds[-1])}"
    return "-"


def errors_text(errors: dict[str, int]) -> str:
    return " ".join(f"{name}×{n}" for name, n in errors.items()) or "-"


_TEXT_COLUMNS = ("peer", "export", "errors", "dialect")


def _console(file: Any = None) -> Any:
    from rich.console import Console

    out = file or sys.stdout
    if out.isatty():
        # The terminal's real size, followed as it changes: a stale exported COLUMNS/LINES (tmux
        # and shells set them) would pin rich to it.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return Console(file=out, highlight=False, _environ=env)
    # Not a terminal (a pipe, a script): never squeeze a table; each takes only what it needs.
    return Console(file=out, width=1000, highlight=False)


def _table(title: str, columns: list[str]) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, c in enumerate(columns):
        if i == 0 or c in _TEXT_COLUMNS:
            # In a narrow terminal long paths give way (with an ellipsis), never the numbers.
            # (Wrappable, so rich narrows these first; a path is one word, cut with an ellipsis.)
            t.add_column(c, justify="left", overflow="ellipsis", min_width=min(len(c), 8))
        else:
            # Never wrapped; if even so the terminal is too narrow, a cut number ends in "…"
            # rather than being cropped into a wrong one.
            t.add_column(c, justify="right", no_wrap=True, overflow="ellipsis")
    return t


def summary_line(snap: Snapshot) -> str:
    s = snap["server"]
    return (f"pid {snap['pid']}, up {uptime(snap)}: {s['connections']} connections "
            f"({s['connections_total']} since start), {s['fids']} fids, {s['open_files']} open, "
            f"{s['inflight']} in flight, {s['process_open_fds']} process fds; "
            f"{s['requests']} requests, {s['errors']} errors, "
            f"in {human_bytes(s['bytes']['in'])}, out {human_bytes(s['bytes']['out'])}")


def render_stats(snap: Snapshot) -> list[Any]:
    """The totals since start as rich renderables."""
    bounds = snap["buckets"]
    ops = _table("operations", ["op", "requests", "errors", "bytes", "mean", "p50", "p99"])
    for name, o in snap["server"]["ops"].items():
        mean = human_seconds(o["seconds"] / o["count"]) if o["count"] else "-"
        ops.add_row(name, str(o["count"]), errors_text(o["errors"]), human_bytes(o["bytes"]) if o["bytes"] else "-",
                    mean, quantile(o, bounds, 0.5), quantile(o, bounds, 0.99))
    exports = _table("exports", ["export", "conns", "total", "fids", "open", "inflight", "requests", "errors", "in", "out"])
    for name, e in snap["exports"].items():
        exports.add_row(name, str(e["connections"]), str(e["connections_total"]), str(e["fids"]),
                        str(e["open_files"]), str(e["inflight"]), str(e["requests"]), str(e["errors"]),
                        human_bytes(e["bytes"]["in"]), human_bytes(e["bytes"]["out"]))
    conns = _table("connections", ["id", "peer", "export", "dialect", "fids", "open", "inflight",
                                   "requests", "errors", "in", "out"])
    for c in snap["connections"]:
        conns.add_row(str(c["id"]), c["peer"], c["export"], c["dialect"] or "-", str(c["fids"]),
                      str(c["open_files"]), str(c["inflight"]), str(c["requests"]), str(c["errors"]),
                      human_bytes(c["bytes"]["in"]), human_bytes(c["bytes"]["out"]))
    return [summary_line(snap), ops, exports, conns]


def _rate(now: float, before: float, dt: float) -> float:
    return max(0.0, now - before) / dt if dt > 0 else 0.0


def render_top(prev: Snapshot, snap: Snapshot, source: str) -> Any:
    """Rates between two snapshots: per operation, per export, per connection."""
    from rich.console import Group

    dt = snap["time"] - prev["time"]
    s = snap["server"]
    p = prev["server"]
    header = (f"ninep top — {source} — pid {snap['pid']}, up {uptime(snap)} — "
              f"{_rate(s['requests'], p['requests'], dt):.1f} req/s, "
              f"{_rate(s['errors'], p['errors'], dt):.1f} err/s, "
              f"in {human_bytes(_rate(s['bytes']['in'], p['bytes']['in'], dt))}/s, "
              f"out {human_bytes(_rate(s['bytes']['out'], p['bytes']['out'], dt))}/s — "
              f"{s['connections']} conns, {s['fids']} fids, {s['open_files']} open, "
              f"{s['inflight']} in flight, {s['process_open_fds']} fds   (q quits)")
    ops = _table("operations", ["op", "req/s", "err/s", "bytes/s", "latency", "requests", "errors"])
    rows = []
    for name, o in s["ops"].items():
        before = p["ops"].get(name, {"count": 0, "errors": {}, "bytes": 0, "seconds": 0.0})
        n = o["count"] - before["count"]
        errs = sum(o["errors"].values()) - sum(before["errors"].values())
        lat = human_seconds((o["seconds"] - before["seconds"]) / n) if n > 0 else "-"
        rows.append((n, [name, f"{_rate(n, 0, dt):.1f}", f"{_rate(errs, 0, dt):.1f}",
                         human_bytes(_rate(o["bytes"], before["bytes"], dt)), lat, str(o["count"]),
                         str(sum(o["errors"].values()))]))
    for _, row in sorted(rows, key=lambda r: (-r[0], r[1][0])):
        ops.add_row(*row)
    # Rates only (totals are `ninep stats`'), so the tables fit an 80-column terminal.
    exports = _table("exports", ["export", "conns", "fids", "open", "inflight", "req/s", "err/s", "in/s", "out/s"])
    for name, e in snap["exports"].items():
        b = prev["exports"].get(name, {"requests": 0, "errors": 0, "bytes": {"in": 0, "out": 0}})
        exports.add_row(name, str(e["connections"]), str(e["fids"]), str(e["open_files"]), str(e["inflight"]),
                        f"{_rate(e['requests'], b['requests'], dt):.1f}", f"{_rate(e['errors'], b['errors'], dt):.1f}",
                        human_bytes(_rate(e["bytes"]["in"], b["bytes"]["in"], dt)),
                        human_bytes(_rate(e["bytes"]["out"], b["bytes"]["out"], dt)))
    conns = _table("connections", ["id", "peer", "export", "fids", "open", "inflight", "req/s", "err/s",
                                   "in/s", "out/s"])
    before_conns = {c["id"]: c for c in prev["connections"]}
    for c in snap["connections"]:
        b = before_conns.get(c["id"], {"requests": 0, "errors": 0, "bytes": {"in": 0, "out": 0}})
        conns.add_row(str(c["id"]), c["peer"], c["export"], str(c["fids"]), str(c["open_files"]), str(c["inflight"]),
                      f"{_rate(c['requests'], b['requests'], dt):.1f}", f"{_rate(c['errors'], b['errors'], dt):.1f}",
                      human_bytes(_rate(c["bytes"]["in"], b["bytes"]["in"], dt)),
                      human_bytes(_rate(c["bytes"]["out"], b["bytes"]["out"], dt)))
    return Group(header, ops, exports, conns)


# --- commands -----------------------------------------------------------------------------------


def _fetch(address: str) -> Snapshot:
    try:
        return trio.run(fetch_snapshot, address)
    except (OSError, ValueError) as e:
        raise SystemExit(f"ninep: cannot read stats from {address}: {e}") from None


def cmd_stats(args: argparse.Namespace) -> int:
    snap = _fetch(args.socket)
    with _quiet_broken_pipe():
        if args.json:
            json.dump(snap, sys.stdout, indent=2)
            print()
            return 0
        console = _console()
        for part in render_stats(snap):
            console.print(part)
    return 0


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    """`ninep stats | head` is fine: a reader that stops early ends us without a traceback."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (single keys, no echo) when it is a terminal; yields its fd."""
    fd = sys.stdin.fileno() if sys.stdin and not sys.stdin.closed else -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _top(args: argparse.Namespace) -> None:
    from rich.live import Live

    console = _console()
    prev = await fetch_snapshot(args.socket)
    if args.once or not console.is_terminal:
        # One screen, or (output not a terminal) one screen per interval, like `top -b`.
        while True:
            await trio.sleep(args.interval)
            snap = await fetch_snapshot(args.socket)
            console.print(render_top(prev, snap, args.socket))
            if args.once:
                return
            console.file.flush()
            prev = snap
    with _keys() as keyfd, Live(console=console, screen=True, auto_refresh=False) as live:
        live.update(render_top(prev, prev, args.socket), refresh=True)
        deadline = time.monotonic() + args.interval
        while True:
            with trio.move_on_at(trio.current_time() + max(0.0, deadline - time.monotonic())):
                if keyfd is None:
                    await trio.sleep_forever()
                await trio.lowlevel.wait_readable(keyfd)
                if os.read(keyfd, 32).lower().startswith(b"q"):
                    return
                continue
            deadline = time.monotonic() + args.interval
            snap = await fetch_snapshot(args.socket)
            live.update(render_top(prev, snap, args.socket), refresh=True)
            prev = snap


def cmd_top(args: argparse.Namespace) -> int:
    try:
        with _quiet_broken_pipe():
            trio.run(_top, args)
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as e:
        raise SystemExit(f"ninep: cannot read stats from {args.socket}: {e}") from None
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("stats", help="print a running server's counters (its --stats socket)")
    s.add_argument("socket", help="the server's --stats address (unix:PATH, a path, or tcp:HOST:PORT)")
    s.add_argument("--json", action="store_true", help="the raw JSON snapshot")
    s.set_defaults(func=cmd_stats)
    t = sub.add_parser("top", help="live per-operation, per-export and per-connection rates")
    t.add_argument("socket", help="the server's --stats address (unix:PATH, a path, or tcp:HOST:PORT)")
    t.add_argument("--interval", "-i", type=float, default=1.0, help="seconds between refreshes (default 1)")
    t.add_argument("--once", action="store_true", help="print one screen (rates over one interval) and exit")
    t.set_defaults(func=cmd_top)

