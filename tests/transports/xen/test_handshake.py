"""The XenbusState handshake of the 9pfs backend: every transition, refusals of bad frontend values
(with the backend going to Closing and saying why in the log), and reconnects."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from tests.kits.xen import (
    XenbusState,
    echo,
    environment,
    raw_exchange,
    raw_handshake,
    roundtrip,
    run,
    wait_until,
)
from transports.options import ListenOptions
from transports.xen import listener_from_address

S = XenbusState


async def _len_at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


def test_backend_publishes_limits_and_walks_every_state(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            lst = await env.serve(1)
            p = await env.platform(99)
            be = "/local/domain/0/backend/9pfs/1/0"
            assert await p.read(f"{be}/versions") == "1"
            assert await p.read(f"{be}/max-rings") == "8"
            assert await p.read(f"{be}/max-ring-page-order") == "9"
            assert await p.read(f"{be}/state") == str(S.InitWait)
            # The toolstack part pointed both ends at each other.
            assert await p.read("/local/domain/1/device/9pfs/0/backend") == be
            assert await p.read(f"{be}/frontend") == "/local/domain/1/device/9pfs/0"

            front = await env.connect(1)
            assert await p.read(f"{be}/state") == str(S.Connected)
            assert await p.read("/local/domain/1/device/9pfs/0/state") == str(S.Connected)
            assert await p.read("/local/domain/1/device/9pfs/0/num-rings") == "2"
            assert len(front.rings) == 2
            assert front.rings[0].ring.size == 1 << 20  # order min(9, 9)
            assert front.max_message_size == 512 * 1024  # Linux's maxsize
            assert front.tag == "ninep"
            r = await roundtrip(front, 3)
            assert r[4] == 101 and r[5:7] == b"\x03\x00" and r[7:] == b"ping"
            await front.aclose()
            assert lst.device is not None
            dev = lst.device

            async def closed() -> bool:
                return len(dev.history) >= 4

            await wait_until(closed)
            assert dev.history == [S.InitWait, S.Connected, S.Closing, S.Closed]
            assert await p.read("/local/domain/1/device/9pfs/0/state") == str(S.Closed)
            # A frontend that initialises again finds the backend waiting for it.
            front = await env.connect(1)
            assert (await roundtrip(front, 0xFFFF))[5:7] == b"\xff\xff"
            await front.aclose()
            await wait_until(lambda: _len_at_least(dev.history, 8))
            assert dev.history == [
                S.InitWait, S.Connected, S.Closing, S.Closed,
                S.InitWait, S.Connected, S.Closing, S.Closed,
            ]  # fmt: skip
            await p.aclose()

    run(main)


def test_reconnect_many_times(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            await env.serve(1)
            for i in range(5):
                front = await env.connect(1)
                for tag in (i, i + 1):
                    assert (await roundtrip(front, tag))[5] == tag
                await front.aclose()

    run(main)


def _set(key: str, value: str) -> Any:
    def f(values: dict[str, str], rings: Any) -> None:
        values[key] = value

    return f


def _dup_intf(values: dict[str, str], rings: Any) -> None:
    values["ring-ref1"] = values["ring-ref0"]


def _ref_out_of_range(i: int, intf: Any, refs: list[int]) -> None:
    refs[-1] = 10**6


def _dup_data_ref(i: int, intf: Any, refs: list[int]) -> None:
    refs[1] = refs[0]


def _data_ref_is_intf_page(i: int, intf: Any, refs: list[int]) -> None:
    refs[0] = refs[0] - 1  # the interface page was allocated just before the data pages


BAD = {
    "version 2": (dict(nodes=_set("version", "2")), "unsupported transport version '2'"),
    "version missing": (dict(nodes=_set("version", "")), "unsupported transport version"),
    "num-rings 0": (dict(nodes=_set("num-rings", "0")), "num-rings 0 out of range"),
    "num-rings 9 > max": (dict(nodes=_set("num-rings", "9")), "num-rings 9 out of range"),
    "num-rings not a number": (dict(nodes=_set("num-rings", "-1")), "num-rings is not a number"),
    "ring_order 0": (dict(order=0), "ring_order 0 out of range"),
    "ring_order 10 > max": (dict(order=10), "ring_order 10 out of range"),
    "ring-ref out of range": (dict(nodes=_set("ring-ref1", "99999999")), "out of range"),
    "data ref out of range": (dict(intf_hook=_ref_out_of_range), "cannot map data pages"),
    "duplicate interface refs": (dict(nodes=_dup_intf), "duplicate grant ref"),
    "duplicate data refs": (dict(intf_hook=_dup_data_ref), "duplicate grant ref"),
    "data ref aliases an interface page": (
        dict(intf_hook=_data_ref_is_intf_page),
        "duplicate grant ref",
    ),
    "unknown event channel": (
        dict(nodes=_set("event-channel-0", "4242")),
        "cannot bind event channel",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_frontend_values_are_refused(
    sock_path: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ninep.xen")

    async def main() -> None:
        async with environment(sock_path) as env:
            lst = await env.serve(1)
            kwargs, expected = BAD[case]
            raw = await raw_handshake(env, 1, **kwargs)
            assert await raw.wait_backend({S.Connected, S.Closing}) == S.Closing
            assert any(
                "refusing frontend" in r.getMessage() and expected in r.getMessage()
                for r in caplog.records
            ), case
            # The frontend gives up; the backend closes and waits for a new attempt.
            await raw.set_state(S.Closed)
            assert await raw.wait_backend({S.Closed}) == S.Closed
            await raw.set_state(S.Initialising)
            assert await raw.wait_backend({S.InitWait}) == S.InitWait
            await raw.close()
            assert lst.device is not None
            assert lst.device.history[:4] == [S.InitWait, S.Closing, S.Closed, S.InitWait]
            # ... and a well-behaved frontend then gets served.
            front = await env.connect(1)
            assert (await roundtrip(front, 7))[5] == 7
            await front.aclose()

    run(main)


def test_good_raw_handshake_with_max_rings_and_smallest_order(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            await env.serve(1)
            raw = await raw_handshake(env, 1, num_rings=8, order=1)
            assert await raw.wait_backend({S.Connected, S.Closing}) == S.Connected
            # Each request is answered on the ring it was put on, whatever its tag.
            for i in range(8):
                for tag in (i, 100 + i, 0xFFFF):
                    r = await raw_exchange(raw, i, tag, b"x" * 100)
                    assert r[4] == 101 and int.from_bytes(r[5:7], "little") == tag
            await raw.close()

    run(main)


def test_frontend_that_disappears_is_torn_down_and_can_come_back(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            lst = await env.serve(1)
            raw = await raw_handshake(env, 1)
            assert await raw.wait_backend({S.Connected, S.Closing}) == S.Connected
            await raw.close()  # the domain dies: no Closing, its xenstore link just drops
            assert lst.device is not None

            async def closed() -> bool:
                return lst.device is not None and lst.device.history[-1] == S.Closed

            await wait_until(closed)
            front = await env.connect(1)
            assert (await roundtrip(front, 1))[5] == 1
            await front.aclose()

    run(main)


def test_frontend_restarting_without_closing_gets_a_fresh_connection(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            lst = await env.serve(1)
            raw = await raw_handshake(env, 1)
            assert await raw.wait_backend({S.Connected}) == S.Connected
            await raw.set_state(S.Initialising)  # a rebooted guest driver starts over
            assert await raw.wait_backend({S.InitWait}) == S.InitWait
            assert lst.device is not None
            assert lst.device.history[-4:] == [S.Connected, S.Closing, S.Closed, S.InitWait]
            await raw.close()
            front = await env.connect(1)
            assert (await roundtrip(front, 2))[5] == 2
            await front.aclose()

    run(main)


def test_client_sees_end_of_channel_when_the_backend_goes_away(sock_path: str) -> None:
    async def main() -> None:
        async with environment(sock_path) as env:
            async with trio.open_nursery() as backend:
                lst = listener_from_address(env.address(1), ListenOptions())
                await backend.start(lst.serve, echo)
                front = await env.connect(1)
                assert (await roundtrip(front, 1))[5] == 1
                backend.cancel_scope.cancel()  # the server shuts down
            with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
                await front.receive()
            assert front.backend_gone
            await front.aclose()

    run(main)
