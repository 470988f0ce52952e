"""Adaptive polling of a vhost-user queue: the window it learns, and that a back-end in its own
process answers back-to-back requests whether it polls or sleeps (the kicks polling saves are
measured by bench/polling.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ninep.client import Client
from tests.kits.processes import wait_for_socket
from transports.virtio import Frontend
from transports.virtio.polling import START_NS, AdaptivePoll, default_max_us, event_loop_fd

US = 1000


def test_window_grows_while_requests_come_just_too_late() -> None:
    p = AdaptivePoll(max_ns=400 * US)
    assert p.ns == 0  # a fresh queue does not spin
    p.update(200 * US)
    assert p.ns == START_NS
    for _ in range(10):
        p.update(200 * US)
    assert p.ns == 256 * US  # doubled until it covers the gap...
    p.update(200 * US)
    assert p.ns == 256 * US  # ...then left alone while it catches the requests
    for _ in range(10):
        p.update(390 * US)
    assert p.ns == 400 * US  # never beyond the longest window


def test_window_halves_and_vanishes_when_the_ring_stays_idle() -> None:
    p = AdaptivePoll(max_ns=400 * US, ns=400 * US)
    p.update(5_000 * US)
    assert p.ns == 200 * US  # one long pause keeps half
    for _ in range(20):
        p.update(5_000 * US)
    assert p.ns == 0  # an idle guest costs no spinning


def test_window_survives_pauses_after_bursts_it_served() -> None:
    """A guest's dd: 1 MiB writes ~1 ms apart, each three 9P writes ~200 µs apart. The pause
    between writes must not cost the window the next write's requests."""
    p = AdaptivePoll(max_ns=400 * US, ns=256 * US)
    p.caught()
    for _ in range(10):
        p.update(1_100 * US)  # the pause before a write...
        assert p.ns == 256 * US
        p.update(200 * US)  # ...whose next two requests the window catches
        p.caught()  # (one of them answered inside the spin)
    p.update(1_100 * US)  # a pause after the last burst: kept once...
    p.update(5_000 * US)
    assert p.ns == 128 * US  # ...then an idle guest's window shrinks as before


def test_no_window_when_polling_is_off() -> None:
    p = AdaptivePoll(max_ns=0)
    for idle in (1, 10 * US, 10_000 * US):
        p.update(idle)
        assert p.ns == 0


def test_no_spinning_on_a_single_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_max_us() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_max_us() > 0


def test_spin_can_see_the_event_loops_own_fd() -> None:
    """The spin ends early when trio's epoll fd is readable; if a trio upgrade hides that fd the
    spin would hold the loop for whole windows, so this must fail rather than degrade quietly."""

    async def main() -> None:
        fd = event_loop_fd()
        assert fd >= 0
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"

    trio.run(main)


@pytest.mark.parametrize("poll_us", [0, 20_000])
@pytest.mark.parametrize("op", ["getattr", "write"])
def test_back_to_back_requests_are_all_answered_whether_the_server_polls_or_sleeps(
    tmp_path: Path, poll_us: int, op: str
) -> None:
    """A driver sending request after request (one in flight) is answered every time, whether the
    server spins on the ring or sleeps on the kick — also after a request it answered from a worker
    thread (a 32 KiB write), when the reader had gone to sleep meanwhile: a lost wake-up (a kick the
    device suppressed while it stopped looking) would leave a request unanswered and fail the
    deadline. How many kicks polling saves depends on scheduling, so it is measured by
    bench/polling.py, not asserted here."""
    sock = tmp_path / "vu.sock"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ninep", "serve", str(tmp_path), "--listen",
                                 f"vhost-user:{sock}", "--security-model", "none", "--poll-us", str(poll_us)],
                                cwd=Path(__file__).resolve().parents[3], stdout=out, stderr=subprocess.STDOUT)
    requests = 300
    try:
        wait_for_socket(sock, proc, 20, log)

        async def main() -> int:
            fe = Frontend(str(sock), msize=65536, event_idx=True)
            channel = await fe.connect()
            answered = 0
            async with Client.connect(channel, msize=65536) as c:
                root = await c.attach()
                f, _ = await c.walk(root, [])
                await c.lcreate(f, "data", os.O_WRONLY, 0o644, 0)
                chunk = b"x" * 32768
                with trio.fail_after(120):
                    for i in range(requests):
                        if op == "getattr":
                            await c.getattr(root)
                        else:
                            assert await c.write(f, i * len(chunk), chunk) == len(chunk)
                        answered += 1
            return answered

        answered = trio.run(main)
    finally:
        proc.terminate()
        proc.wait(10)
    assert answered == requests, log.read_text()
    if op == "write":
        assert (tmp_path / "data").stat().st_size == requests * 32768
