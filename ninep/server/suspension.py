"""Awaiting a coroutine while learning whether it suspends.

A connection's reading task runs each request itself (no hand-over to another task, which costs a
scheduler pass per request) as long as the request completes without waiting; the moment it has
to wait — a worker thread, a lock, a full socket — someone else must go on reading. Trio offers
no "about to block" hook, but every wait in trio is a `yield` out of the task's coroutine, so
driving the request's coroutine by hand shows the first one exactly, before trio sees it.

This module must never change what the coroutine sees: every value and exception trio sends is
passed through unchanged, and the coroutine stays in the task that awaited it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


@types.coroutine
def await_noting_suspension(coro: Coroutine[Any, Any, T], on_suspend: Callable[[], None]) -> Generator[Any, Any, T]:
    """`await coro`, calling `on_suspend()` once, just before the coroutine's first suspension
    reaches the scheduler (never if it finishes without suspending)."""
    try:
        trap = coro.send(None)
    except StopIteration as done:
        return done.value
    try:
        on_suspend()
    except BaseException:
        coro.close()
        raise
    while True:
        try:
            sent = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown in by the scheduler: the coroutine's to handle
            try:
                trap = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = coro.send(sent)
            except StopIteration as done:
                return done.value
