"""`ninep serve --stats/--metrics` as a user runs it: a real server process, a scripted workload,
then the same exact counters through `ninep stats --json`, the `ninep stats` table, Prometheus'
own parser on GET /metrics, and `ninep top --once` (plus `ninep top` live in tmux)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ninep.client import Client
from tests.kits.processes import wait_for_socket
from tests.metrics.workload import (
    EXPECTED_ERRORS,
    EXPECTED_OPS,
    EXPECTED_REQUESTS,
    HELD_FIDS,
    HELD_OPEN,
    N_MISSING,
    N_READS,
    READ_SIZE,
    WRITE_SIZE,
    assert_ops,
    make_export,
    workload,
)

REPO = Path(__file__).resolve().parents[2]
NINEP = [sys.executable, "-m", "ninep"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, tmp: Path) -> None:
        self.export = tmp / "export"
        make_export(self.export)
        self.sock = tmp / "9p.sock"
        self.stats = tmp / "stats.sock"
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [*NINEP, "serve", str(self.export), "--listen", f"unix:{self.sock}", "--stats", f"unix:{self.stats}",
             "--metrics", f"tcp:127.0.0.1:{self.port}"], cwd=REPO, stderr=subprocess.PIPE)
        wait_for_socket(self.sock, self.proc, 15)
        wait_for_socket(self.stats, self.proc, 15)

    def ninep(self, *args: str) -> str:
        r = subprocess.run([*NINEP, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = json.loads(self.ninep("stats", f"unix:{self.stats}", "--json"))
        return snap

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(r.read().decode())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.proc.terminate()
        try:
            s.proc.wait(timeout=15)
        finally:
            s.proc.kill()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_stats_json_table_and_prometheus_after_a_workload(served: Served) -> None:
    export = str(served.export)
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with Client.connect(f"unix:{served.sock}") as c:
            await workload(c)
            seen["live"] = await trio.to_thread.run_sync(served.snapshot)
            seen["table"] = await trio.to_thread.run_sync(served.ninep, "stats", str(served.stats))
            seen["metrics"] = await trio.to_thread.run_sync(served.metrics)

    trio.run(main)
    live = seen["live"]
    (conn,) = live["connections"]
    assert conn["export"] == export
    assert conn["peer"] == f"unix:{served.sock}"
    assert (conn["fids"], conn["open_files"], conn["inflight"]) == (HELD_FIDS, HELD_OPEN, 0)
    assert_ops(conn["ops"])
    assert_ops(live["exports"][export]["ops"])
    assert_ops(live["server"]["ops"])
    assert live["server"]["process_open_fds"] > 0

    # The table: a summary line, one row per op with its errors, the export, the connection.
    table = seen["table"]
    assert f"{EXPECTED_REQUESTS} requests, {EXPECTED_ERRORS} errors" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    for op, (count, _) in EXPECTED_OPS.items():
        assert rows[op][1] == str(count), rows[op]
    assert f"ENOENT×{N_MISSING}" in rows["walk"]
    assert "EBADF×1" in rows["getattr"]
    assert rows[export][1:3] == ["1", "1"]  # live connections, since start
    assert str(conn["id"]) in rows, table
    assert rows[str(conn["id"])][1:4] == [f"unix:{served.sock}", export, "9P2000.L"]

    # Prometheus, read by Prometheus' own parser.
    samples = _samples(seen["metrics"])
    for op, (count, errors) in EXPECTED_OPS.items():
        assert samples[("ninep_requests_total", frozenset({("op", op), ("export", export)}))] == count
        assert samples[("ninep_request_duration_seconds_count", frozenset({("op", op), ("export", export)}))] == count
        assert samples[("ninep_request_duration_seconds_bucket",
                        frozenset({("op", op), ("export", export), ("le", "+Inf")}))] == count
        for name, n in errors.items():
            assert samples[("ninep_errors_total", frozenset({("op", op), ("errno", name), ("export", export)}))] == n
    assert samples[("ninep_bytes_total", frozenset({("direction", "out"), ("export", export)}))] == N_READS * READ_SIZE
    assert samples[("ninep_bytes_total", frozenset({("direction", "in"), ("export", export)}))] == WRITE_SIZE
    assert samples[("ninep_connections", frozenset({("export", export)}))] == 1
    assert samples[("ninep_fids", frozenset({("export", export)}))] == HELD_FIDS
    assert samples[("ninep_open_files", frozenset({("export", export)}))] == HELD_OPEN
    assert samples[("ninep_inflight", frozenset({("export", export)}))] == 0
    assert samples[("ninep_process_open_fds", frozenset())] > 0

    # After the client left: its counters stay, its fids and the connection are gone.
    after = served.snapshot()
    assert after["connections"] == []
    ex = after["exports"][export]
    assert (ex["connections"], ex["connections_total"], ex["fids"], ex["open_files"]) == (0, 1, 0, 0)
    assert_ops(ex["ops"])
    samples = _samples(served.metrics())
    assert samples[("ninep_connections", frozenset({("export", export)}))] == 0
    assert samples[("ninep_connections_total", frozenset({("export", export)}))] == 1
    assert samples[("ninep_requests_total", frozenset({("op", "walk"), ("export", export)}))] == EXPECTED_OPS["walk"][0]


def test_metrics_http_answers_only_get_metrics(served: Served) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=30)
    assert e.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{served.port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405
    # A client that sends nothing and hangs up costs the server nothing.
    with socket.create_connection(("127.0.0.1", served.port)):
        pass
    assert "ninep_process_open_fds" in served.metrics()


def test_top_once_shows_rates_per_op_export_and_connection(served: Served) -> None:
    export = str(served.export)
    out: dict[str, str] = {}

    async def main() -> None:
        async with Client.connect(f"unix:{served.sock}") as c:
            root = await c.attach()
            async with trio.open_nursery() as nursery:

                async def top() -> None:
                    r = await trio.run_process([*NINEP, "top", f"unix:{served.stats}", "--once", "--interval", "1"],
                                               cwd=REPO, capture_stdout=True, capture_stderr=True)
                    out["top"] = r.stdout.decode()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(top)
                # Requests all along, so top's interval (wherever its start-up puts it) sees some.
                while True:
                    await c.getattr(root)
                    out["getattrs"] = str(int(out.get("getattrs", "0")) + 1)
                    await trio.sleep(0.02)
            out["id"] = str((await trio.to_thread.run_sync(served.snapshot))["connections"][0]["id"])

    trio.run(main)
    text = out["top"]
    assert f"ninep top — unix:{served.stats}" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    # getattr: a nonzero rate; a total no larger than what was sent by the time top ended.
    assert float(rows["getattr"][1]) > 0
    assert 0 < int(rows["getattr"][-2]) <= int(out["getattrs"]) and rows["getattr"][-1] == "0"
    assert rows[export][1:3] == ["1", "1"]  # one connection holding one fid
    conn = rows[out["id"]]
    assert conn[1:3] == [f"unix:{served.sock}", export]
    assert float(conn[6]) > 0  # req/s


def test_top_into_a_pipe_prints_one_screen_per_interval(served: Served) -> None:
    proc = subprocess.Popen([*NINEP, "top", f"unix:{served.stats}", "--interval", "0.3"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        screens, deadline = 0, time.monotonic() + 60
        assert proc.stdout is not None
        while screens < 3:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "top stopped printing"
            screens += line.startswith("ninep top — ")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_serve_refuses_a_non_loopback_metrics_address_without_insecure(tmp_path: Path) -> None:
    r = subprocess.run([*NINEP, "serve", "memory:", "--listen", f"unix:{tmp_path}/s", "--metrics", "tcp:0.0.0.0:9640"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "non-loopback" in r.stderr
    r = subprocess.run([*NINEP, "stats", f"unix:{tmp_path}/nothing"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot read stats" in r.stderr


def test_top_runs_live_in_a_terminal_and_quits_on_q(served: Served, tmp_path: Path) -> None:
    # A private tmux server: never disturb (or be disturbed by) anyone else's.
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    # A stale COLUMNS (shells and tmux export one) must not pin the display to it.
    cmd = " ".join(["COLUMNS=40", *NINEP, "top", f"unix:{served.stats}", "--interval", "0.5"])
    done = tmp_path / "top.exited"
    subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "200", "-y", "50", "-c", str(REPO),
                    f"{cmd}; echo $? > {done}; sleep 30"], check=True)
    try:
        screen = ""
        deadline = time.monotonic() + 30
        while "connections" not in screen or str(served.export) not in screen:
            assert time.monotonic() < deadline, f"top did not draw:\n{screen}"
            time.sleep(0.2)
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True,
                                    text=True, check=True).stdout
        assert "operations" in screen and "q quits" in screen
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
        deadline = time.monotonic() + 15
        while not done.exists():
            assert time.monotonic() < deadline, "top did not quit on q"
            time.sleep(0.1)
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
