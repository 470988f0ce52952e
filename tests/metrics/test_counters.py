"""The counters a server keeps, read in-process after a scripted workload: exact per-op counts,
errors by errno, payload bytes (zero-copy reads included), gauges while a connection lives, and
what an export keeps once its connections are gone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from fs_backends.local import LocalBackend
from ninep.client import Client
from ninep.metrics.counters import BUCKET_BOUNDS, NBUCKETS, ConnStats, prometheus_text
from ninep.protocol import messages as m
from ninep.protocol.numbers import L_O_RDWR, LOCK_FLAGS_BLOCK, LOCK_SUCCESS, LOCK_TYPE_WRLCK, T
from tests.kits.harness import client_for, served
from tests.metrics.workload import (
    EXPECTED_ERRORS,
    EXPECTED_REQUESTS,
    HELD_FIDS,
    HELD_OPEN,
    N_READS,
    READ_SIZE,
    WRITE_SIZE,
    assert_ops,
    make_export,
    workload,
)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    e = tmp_path / "export"
    make_export(e)
    return e


# vhost-user answers reads zero-copy (the channel sends Rread itself): its bytes must count too.
@pytest.mark.parametrize("transport", ["unix", "vhost-user"])
def test_workload_counters_per_connection_export_and_server(export: Path, tmp_path: Path, transport: str) -> None:
    async def main() -> None:
        async with served(LocalBackend(str(export)), transport, tmp_path) as (server, connect):
            async with client_for(connect) as c:
                await workload(c)
                snap = server.metrics.snapshot()
                # While connected: one connection with the fids the workload holds.
                (conn,) = snap["connections"]
                assert conn["export"] == str(export)
                assert conn["dialect"] == "9P2000.L"
                assert (conn["fids"], conn["open_files"], conn["inflight"]) == (HELD_FIDS, HELD_OPEN, 0)
                assert_ops(conn["ops"])
                assert conn["requests"] == EXPECTED_REQUESTS and conn["errors"] == EXPECTED_ERRORS
                assert conn["bytes"] == {"in": WRITE_SIZE, "out": N_READS * READ_SIZE}
                ex = snap["exports"][str(export)]
                assert (ex["connections"], ex["fids"], ex["open_files"]) == (1, HELD_FIDS, HELD_OPEN)
                s = snap["server"]
                assert (s["connections"], s["connections_total"], s["fids"]) == (1, 1, HELD_FIDS)
                assert s["process_open_fds"] > 0
                if transport == "vhost-user":
                    assert getattr(server.sessions.copy().pop().channel, "zero_copy_reads", 0) == N_READS
            # A second connection attaching a subdirectory of the one export counts under it too.
            async with client_for(connect) as c2:
                await workload_sub(c2)
            await wait_for_disconnects(server)
            snap = server.metrics.snapshot()
        assert snap["connections"] == []
        assert list(snap["exports"]) == [str(export)]
        ex = snap["exports"][str(export)]
        # The closed connections' counters stay with their export; their fids are gone.
        assert (ex["connections"], ex["connections_total"], ex["fids"], ex["open_files"]) == (0, 2, 0, 0)
        assert ex["requests"] == EXPECTED_REQUESTS + 2 and ex["errors"] == EXPECTED_ERRORS
        assert ex["ops"]["attach"]["count"] == 2
        s = snap["server"]
        assert (s["connections"], s["connections_total"], s["fids"]) == (0, 2, 0)
        assert s["requests"] == EXPECTED_REQUESTS + 2
        assert s["ops"]["attach"]["count"] == 2

    trio.run(main)


async def workload_sub(c: Client) -> None:
    root = await c.attach("sub")
    await c.getattr(root)


async def wait_for_disconnects(server: Any) -> None:
    with trio.fail_after(10):
        while server.sessions:
            await trio.sleep(0.01)


def test_flushed_request_counts_as_eintr_and_inflight_while_it_waits(export: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with (served(LocalBackend(str(export)), "unix", tmp_path) as (server, connect),
                    client_for(connect) as a, client_for(connect) as b):
            fa = (await a.walk(await a.attach(), ["data.bin"]))[0]
            await a.lopen(fa, L_O_RDWR)
            assert await a.lock(fa, LOCK_TYPE_WRLCK, proc_id=1, client_id="A") == LOCK_SUCCESS
            fb = (await b.walk(await b.attach(), ["data.bin"]))[0]
            await b.lopen(fb, L_O_RDWR)
            tag = 77
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: b.rpc(m.Tlock(fb, LOCK_TYPE_WRLCK, LOCK_FLAGS_BLOCK, 0, 0, 2, "B"), tag=tag, flushable=False))
                with trio.fail_after(10):
                    while not any(s.inflight for s in server.sessions):
                        await trio.sleep(0.01)
                snap = server.metrics.snapshot()
                assert snap["server"]["inflight"] == 1
                assert isinstance(await b.rpc(m.Tflush(tag)), m.Rflush)
                nursery.cancel_scope.cancel()
            with trio.fail_after(10):
                while any(s.inflight for s in server.sessions):
                    await trio.sleep(0.01)
            snap = server.metrics.snapshot()
        conn_b = snap["connections"][1]
        assert conn_b["ops"]["lock"]["errors"] == {"EINTR": 1}
        assert conn_b["ops"]["flush"] == {**conn_b["ops"]["flush"], "count": 1, "errors": {}}
        assert snap["connections"][0]["ops"]["lock"] == {**snap["connections"][0]["ops"]["lock"], "count": 1, "errors": {}}
        assert snap["server"]["inflight"] == 0

    trio.run(main)


def test_latency_lands_in_log2_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    import ninep.metrics.counters

    st = ConnStats()
    clock = [0.0]
    monkeypatch.setattr(ninep.metrics.counters.time, "perf_counter", lambda: clock[0])
    for seconds in (0.0000005, 0.0000015, 0.0003, 0.0003, 2.0, 100.0):
        clock[0] = seconds
        st.done(T.Tgetattr, 0, object(), 0.0)
    monkeypatch.undo()
    b = st.ops[T.Tgetattr].buckets
    assert len(b) == NBUCKETS == len(BUCKET_BOUNDS) + 1
    assert b[0] == 1  # < 1 µs
    assert b[1] == 1  # [1, 2) µs
    assert b[9] == 2  # 300 µs: [256, 512) µs
    assert b[21] == 1  # 2 s: [1.05, 2.1) s
    assert b[-1] == 1  # 100 s: beyond the last bound
    assert sum(b) == 6
    text = prometheus_text({"exports": {"e": {"ops": {"getattr": st.ops[T.Tgetattr].to_json()}, "bytes": {"in": 0, "out": 0},
                                              "connections": 0, "fids": 0, "open_files": 0, "inflight": 0,
                                              "connections_total": 0}},
                            "buckets": list(BUCKET_BOUNDS), "server": {"process_open_fds": 3}})
    assert 'ninep_request_duration_seconds_bucket{op="getattr",export="e",le="0.000512"} 4' in text
    assert 'ninep_request_duration_seconds_bucket{op="getattr",export="e",le="+Inf"} 6' in text


def test_export_names_from_clients_are_bounded() -> None:
    from types import SimpleNamespace

    import ninep.metrics.counters

    reg = ninep.metrics.counters.Metrics("/srv/export")
    for i in range(ninep.metrics.counters.MAX_EXPORTS + 10):
        st = ConnStats(i + 1)
        st.attached(f"dir{i}")
        st.done(T.Tattach, 0, object(), 0.0)
        session: Any = SimpleNamespace(conn_id=i + 1, stats=st, sync_stats=lambda st=st: st,
                                       load=lambda: (0, 0, 0), dialect=None, msize=0)
        reg.connect(session)
        reg.disconnect(session)
    snap = reg.snapshot()
    # The cap, plus "(other)", plus the server's own export (always listed).
    assert len(snap["exports"]) == ninep.metrics.counters.MAX_EXPORTS + 2
    assert snap["exports"][ninep.metrics.counters.OTHER_EXPORTS]["connections_total"] == 10
    assert snap["exports"]["/srv/export"]["requests"] == 0
    assert snap["server"]["requests"] == ninep.metrics.counters.MAX_EXPORTS + 10
