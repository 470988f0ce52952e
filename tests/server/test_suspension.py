"""ninep.server.suspension: a session's reading task runs a request itself and learns, exactly at the
first wait, that someone else must go on reading."""

from __future__ import annotations

import pytest
import trio

from ninep.server.suspension import await_noting_suspension


def test_a_coroutine_that_never_waits_is_not_reported() -> None:
    calls: list[str] = []

    async def quick() -> int:
        return 7

    async def main() -> None:
        assert await await_noting_suspension(quick(), lambda: calls.append("suspended")) == 7

    trio.run(main)
    assert calls == []


def test_the_first_wait_is_reported_once_before_the_scheduler_sees_it() -> None:
    calls: list[str] = []

    async def waits_twice() -> str:
        calls.append("start")
        await trio.sleep(0.01)
        calls.append("between")
        await trio.sleep(0)
        return "done"

    async def main() -> None:
        result = await await_noting_suspension(waits_twice(), lambda: calls.append("suspended"))
        assert result == "done"

    trio.run(main)
    assert calls == ["start", "suspended", "between"]


def test_errors_and_cancellation_reach_the_coroutine_and_come_back_out() -> None:
    seen: list[str] = []

    async def fails_after_waiting() -> None:
        await trio.sleep(0)
        raise ValueError("bad")

    async def cancelled_while_waiting() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            seen.append("cancelled inside")
            raise

    async def main() -> None:
        with pytest.raises(ValueError, match="bad"):
            await await_noting_suspension(fails_after_waiting(), lambda: None)
        with trio.move_on_after(0.01) as scope:
            await await_noting_suspension(cancelled_while_waiting(), lambda: None)
        assert scope.cancelled_caught

    trio.run(main)
    assert seen == ["cancelled inside"]


def test_the_coroutine_stays_in_the_awaiting_task() -> None:
    async def whoami() -> trio.lowlevel.Task:
        await trio.sleep(0)
        return trio.lowlevel.current_task()

    async def main() -> None:
        assert await await_noting_suspension(whoami(), lambda: None) is trio.lowlevel.current_task()

    trio.run(main)
