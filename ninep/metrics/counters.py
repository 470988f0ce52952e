"""Server metrics: per-operation counters and latency histograms, and the gauges around them.

Counting is always on and must stay cheap, because it runs once per request on the hot path:
each connection owns a `ConnStats` whose `done` bumps a few integers in a preallocated
`OpStats` (request count, errors by errno, payload bytes, a fixed log2 latency histogram kept
as a list of counts); nothing is allocated per request once an operation has been seen. Nothing
is aggregated per request either: an export's numbers are the sum of its live connections plus
what its closed connections left behind (`Metrics.disconnect` folds them in), and the server's
are the sum of its exports, all computed only when someone asks (`Metrics.snapshot`). Gauges
(connections, fids, opened fids, requests in flight, process fds) are read off the live
sessions at snapshot time (`Connection.load`), so they need no hooks at all. The server feeds
this module; it knows a connection only as the `Connection` Protocol and imports nothing of the
server.

`snapshot()` is a plain JSON-able dict, the one format everything else reads: the control
socket (`ninep stats`, `ninep top`) and the Prometheus text exposition (`prometheus_text`).

This module must never do I/O of its own beyond reading /proc/self/fd for the process fd count,
and must never hold a reference that keeps a closed connection's session alive.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ninep.protocol.messages import Message
from ninep.protocol.numbers import T

#: Latency histogram: bucket i < 24 counts requests that took less than 2**i µs (and at least
#: 2**(i-1)); the last bucket, 24, everything from 2**23 µs ≈ 8.4 s up. `BUCKET_BOUNDS` are the
#: upper bounds of the bounded ones, in seconds (1 µs .. 8.4 s); the last one's is +Inf.
NBUCKETS = 25
BUCKET_BOUNDS = tuple((1 << i) / 1e6 for i in range(NBUCKETS - 1))
_LAST = NBUCKETS - 1

#: Operations whose payload counts as bytes moved: data out (read, readdir) or in (write).
OUT_OPS = frozenset((int(T.Tread), int(T.Treaddir)))
IN_OPS = frozenset((int(T.Twrite),))
_PAYLOAD_OPS = OUT_OPS | IN_OPS
_TWRITE = int(T.Twrite)

#: A request interrupted by Tflush (or by the connection ending) is counted with this error:
#: the client saw it fail as interrupted.
FLUSHED_ERRNO = errno.EINTR

SNAPSHOT_VERSION = 1

#: Closed connections' counters are kept for at most this many export names; the rest are
#: summed under OTHER_EXPORTS.
MAX_EXPORTS = 256
OTHER_EXPORTS = "(other)"


def op_name(msgtype: int) -> str:
    """'walk' for Twalk: the label used everywhere outside the session."""
    try:
        return T(msgtype).name[1:].lower()
    except ValueError:
        return f"type{msgtype}"


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"E{err}")


@dataclass(slots=True)
class OpStats:
    """One operation's counters on one connection (or summed over several)."""

    count: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    #: Payload bytes: read/readdir data sent, write data received.
    nbytes: int = 0
    #: Total latency, seconds (Prometheus `_sum`).
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * NBUCKETS)

    def add(self, other: OpStats) -> None:
        self.count += other.count
        self.nbytes += other.nbytes
        self.seconds += other.seconds
        for e, n in other.errors.items():
            self.errors[e] = self.errors.get(e, 0) + n
        b = self.buckets
        for i, n in enumerate(other.buckets):
            b[i] += n

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "errors": {errno_name(e): n for e, n in sorted(self.errors.items())},
            "bytes": self.nbytes,
            "seconds": self.seconds,
            "buckets": list(self.buckets),
        }


class ConnStats:
    """The counters of one connection. `done` is the only thing the request path calls."""

    __slots__ = ("ops", "export", "attached_once", "conn_id", "peer", "since", "_absorbed")

    def __init__(self, conn_id: int = 0, peer: str = "", export: str = "") -> None:
        #: msgtype -> OpStats, created the first time an operation is seen on this connection.
        self.ops: dict[int, OpStats] = {}
        self.export = export
        self.attached_once = False
        self.conn_id = conn_id
        self.peer = peer
        self.since = time.time()
        #: The running totals `absorb` last saw, by msgtype.
        self._absorbed: dict[int, OpStats] = {}

    def done(self, msgtype: int, err: int, reply: object, started: float) -> None:
        """One request finished: `err` 0 for success, `reply` what was answered (for the
        payload size: Rread/Rreaddir data, Rwrite count, or a zero-copy `Sent.nbytes`),
        `started` its `time.perf_counter()` at arrival."""
        dt = time.perf_counter() - started
        op = self.ops.get(msgtype)
        if op is None:
            op = self.ops[msgtype] = OpStats()
        op.count += 1
        op.seconds += dt
        i = int(dt * 1e6).bit_length()
        op.buckets[i if i < _LAST else _LAST] += 1
        if err:
            op.errors[err] = op.errors.get(err, 0) + 1
        elif reply is None:  # flushed: no reply at all
            op.errors[FLUSHED_ERRNO] = op.errors.get(FLUSHED_ERRNO, 0) + 1
        elif msgtype in _PAYLOAD_OPS:
            if msgtype == _TWRITE:
                op.nbytes += reply.count  # type: ignore[attr-defined]
            elif isinstance(reply, Message):
                op.nbytes += len(reply.data)  # type: ignore[attr-defined]  # Rread, Rreaddir
            else:
                op.nbytes += reply.nbytes  # type: ignore[attr-defined]  # a zero-copy read's Sent

    def absorb(self, totals: Mapping[int, tuple[int, int, int, Sequence[int]]]) -> None:
        """Counts requests answered without the session (a channel's direct I/O), given as
        running totals by msgtype — (count, payload bytes, nanoseconds, latency buckets) — of
        which only what is new since the last call is added. They all succeeded."""
        for msgtype, (count, nbytes, ns, buckets) in totals.items():
            now = OpStats(count, {}, nbytes, ns / 1e9, list(buckets[:NBUCKETS]))
            before = self._absorbed.get(msgtype, OpStats())
            self._absorbed[msgtype] = now
            op = self.ops.get(msgtype)
            if op is None:
                op = self.ops[msgtype] = OpStats()
            op.count += now.count - before.count
            op.nbytes += now.nbytes - before.nbytes
            op.seconds += now.seconds - before.seconds
            for i, (a, b) in enumerate(zip(now.buckets, before.buckets, strict=False)):
                op.buckets[i] += a - b

    def attached(self, export: str) -> None:
        """The connection's first successful attach names its export; later attaches do not
        move it (its counters so far belong to that one export)."""
        if not self.attached_once:
            self.attached_once = True
            if export:
                self.export = export


def _sum_ops(tables: Iterable[dict[int, OpStats]]) -> dict[int, OpStats]:
    out: dict[int, OpStats] = {}
    for table in tables:
        for msgtype, op in table.items():
            acc = out.get(msgtype)
            if acc is None:
                acc = out[msgtype] = OpStats()
            acc.add(op)
    return out


def _ops_json(table: dict[int, OpStats]) -> dict[str, Any]:
    return {op_name(t): table[t].to_json() for t in sorted(table)}


def _bytes_json(table: dict[int, OpStats]) -> dict[str, int]:
    return {
        "in": sum(op.nbytes for t, op in table.items() if t in IN_OPS),
        "out": sum(op.nbytes for t, op in table.items() if t in OUT_OPS),
    }


def _totals(table: dict[int, OpStats]) -> dict[str, int]:
    return {"requests": sum(op.count for op in table.values()),
            "errors": sum(sum(op.errors.values()) for op in table.values())}


class Connection(Protocol):
    """What the metrics read off a live connection (the server's Session is one)."""

    @property
    def conn_id(self) -> int: ...
    @property
    def stats(self) -> ConnStats: ...
    @property
    def dialect(self) -> str | None: ...
    @property
    def msize(self) -> int: ...

    def sync_stats(self) -> ConnStats:
        """`stats`, with what the connection's channel answered by itself counted in."""
        ...

    def load(self) -> tuple[int, int, int]:
        """Fids held, how many of them are open, requests in flight."""
        ...


def _gauges(sessions: Iterable[Connection]) -> dict[str, int]:
    g = {"connections": 0, "fids": 0, "open_files": 0, "inflight": 0}
    for s in sessions:
        fids, opened, inflight = s.load()
        g["connections"] += 1
        g["fids"] += fids
        g["open_files"] += opened
        g["inflight"] += inflight
    return g


def process_open_fds() -> int:
    """File descriptors this process holds (O_PATH node fds, open files, sockets, ...)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself used
    except OSError:
        return -1


class Metrics:
    """Every connection's counters in one server, and the aggregation over them."""

    def __init__(self, default_export: str = "") -> None:
        #: The export name of a connection that has not attached, or attached with aname ''.
        self.default_export = default_export
        self.started = time.time()
        self._live: dict[int, Connection] = {}
        #: What closed connections left behind, per export.
        self._retired: dict[str, dict[int, OpStats]] = {}
        self._retired_conns: dict[str, int] = {}

    def connect(self, session: Connection) -> None:
        if not session.stats.export:
            session.stats.export = self.default_export
        self._live[session.conn_id] = session

    def disconnect(self, session: Connection) -> None:
        if self._live.pop(session.conn_id, None) is None:
            return
        st = session.sync_stats()
        export = st.export
        if export not in self._retired and len(self._retired) >= MAX_EXPORTS:
            # Clients choose anames: never let them grow the table (and Prometheus' label
            # cardinality) without bound.
            export = OTHER_EXPORTS
        table = self._retired.setdefault(export, {})
        for msgtype, op in st.ops.items():
            acc = table.get(msgtype)
            if acc is None:
                acc = table[msgtype] = OpStats()
            acc.add(op)
        self._retired_conns[export] = self._retired_conns.get(export, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain JSON-able data (the format of the control socket)."""
        live = list(self._live.values())
        for s in live:
            s.sync_stats()
        exports: dict[str, dict[str, Any]] = {}
        # The default export is always listed, so an idle server shows what it serves.
        names = {s.stats.export for s in live} | set(self._retired) | {self.default_export}
        all_tables: list[dict[int, OpStats]] = []
        for name in sorted(names):
            mine = [s for s in live if s.stats.export == name]
            table = _sum_ops([*(s.stats.ops for s in mine), self._retired.get(name, {})])
            all_tables.append(table)
            exports[name] = {
                **_gauges(mine),
                "connections_total": len(mine) + self._retired_conns.get(name, 0),
                **_totals(table),
                "bytes": _bytes_json(table),
                "ops": _ops_json(table),
            }
        server_table = _sum_ops(all_tables)
        connections = []
        for s in sorted(live, key=lambda s: s.conn_id):
            connections.append({
                "id": s.conn_id,
                "peer": s.stats.peer,
                "export": s.stats.export,
                "dialect": s.dialect,
                "msize": s.msize,
                "since": s.stats.since,
                **_gauges([s]),
                **_totals(s.stats.ops),
                "bytes": _bytes_json(s.stats.ops),
                "ops": _ops_json(s.stats.ops),
            })
        return {
            "version": SNAPSHOT_VERSION,
            "time": time.time(),
            "started": self.started,
            "pid": os.getpid(),
            "buckets": list(BUCKET_BOUNDS),
            "server": {
                **_gauges(live),
                "connections_total": len(live) + sum(self._retired_conns.values()),
                "process_open_fds": process_open_fds(),
                **_totals(server_table),
                "bytes": _bytes_json(server_table),
                "ops": _ops_json(server_table),
            },
            "exports": exports,
            "connections": connections,
        }


# --- Prometheus text exposition (format 0.0.4) -------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def prometheus_text(snap: dict[str, Any]) -> str:
    """The snapshot in the Prometheus text exposition format: counters per op and export,
    errors per op and errno, bytes per direction, a latency histogram per op and export, and
    the gauges."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    exports: dict[str, Any] = snap["exports"]
    family("ninep_requests_total", "counter", "9P requests answered, per operation and export.")
    for ex, e in exports.items():
        for op, o in e["ops"].items():
            out.append(f'ninep_requests_total{{op="{op}",export="{_label(ex)}"}} {o["count"]}')
    family("ninep_errors_total", "counter", "9P requests that failed, per operation, errno and export.")
    for ex, e in exports.items():
        for op, o in e["ops"].items():
            for name, n in o["errors"].items():
                out.append(f'ninep_errors_total{{op="{op}",errno="{name}",export="{_label(ex)}"}} {n}')
    family("ninep_bytes_total", "counter", "Payload bytes moved: in = written by clients, out = read.")
    for ex, e in exports.items():
        for direction in ("in", "out"):
            out.append(f'ninep_bytes_total{{direction="{direction}",export="{_label(ex)}"}} {e["bytes"][direction]}')
    family("ninep_request_duration_seconds", "histogram", "Time from a request's arrival to its reply.")
    bounds: list[float] = snap["buckets"]
    for ex, e in exports.items():
        for op, o in e["ops"].items():
            labels = f'op="{op}",export="{_label(ex)}"'
            cum = 0
            for le, n in zip(bounds, o["buckets"], strict=False):
                cum += n
                out.append(f'ninep_request_duration_seconds_bucket{{{labels},le="{le!r}"}} {cum}')
            out.append(f'ninep_request_duration_seconds_bucket{{{labels},le="+Inf"}} {o["count"]}')
            out.append(f'ninep_request_duration_seconds_sum{{{labels}}} {_fmt(o["seconds"])}')
            out.append(f'ninep_request_duration_seconds_count{{{labels}}} {o["count"]}')
    gauges = (("connections", "Open 9P connections."), ("fids", "Fids held by clients."),
              ("open_files", "Fids opened for I/O."), ("inflight", "Requests being served."))
    for key, help_ in gauges:
        family(f"ninep_{key}", "gauge", help_)
        for ex, e in exports.items():
            out.append(f'ninep_{key}{{export="{_label(ex)}"}} {e[key]}')
    family("ninep_connections_total", "counter", "9P connections accepted.")
    for ex, e in exports.items():
        out.append(f'ninep_connections_total{{export="{_label(ex)}"}} {e["connections_total"]}')
    family("ninep_process_open_fds", "gauge", "File descriptors held by the server process.")
    out.append(f'ninep_process_open_fds {snap["server"]["process_open_fds"]}')
    return "\n".join(out) + "\n"
