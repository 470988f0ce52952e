"""Runs blocking filesystem calls on worker threads, cheaply, for trio code.

`trio.to_thread.run_sync` costs ~65 µs a call here (capacity limiter, context copy, a thread
handoff through locks), which capped a backend at ~15 000 calls a second. This pool hands work to
long-lived daemon threads through a SimpleQueue and wakes the waiting task with
`run_sync_soon` + `reschedule`: a few µs of overhead. A call, once started, cannot be abandoned:
a cancelled caller waits for it to finish (as to_thread does by default), so no syscall result —
an fd, say — is ever lost.

This module must never run anything but the function it is given; it knows nothing of files.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_WORKERS = 8


class _Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.queue: queue.SimpleQueue[tuple[Callable[[], Any], trio.lowlevel.TrioToken, trio.lowlevel.Task] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.idle = 0

    def submit(self, fn: Callable[[], Any], token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task) -> None:
        self.queue.put((fn, token, task))
        # Grow lazily: one more thread whenever none is idle, up to the cap.
        if self.idle == 0 and len(self.threads) < self.size:
            with self.lock:
                if len(self.threads) < self.size:
                    t = threading.Thread(target=self._work, name=f"ninep-fs-{len(self.threads)}", daemon=True)
                    self.threads.append(t)
                    t.start()

    def _work(self) -> None:
        while True:
            self.idle += 1
            item = self.queue.get()
            self.idle -= 1
            if item is None:
                return
            fn, token, task = item
            result = outcome.capture(fn)
            # If the trio run that asked is gone there is nobody to tell.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)


_pool = _Pool(_WORKERS)


def _reset_after_fork() -> None:
    # A forked child has none of the parent's worker threads: give it a fresh, empty pool.
    global _pool
    _pool = _Pool(_WORKERS)


os.register_at_fork(after_in_child=_reset_after_fork)


def _abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED  # the call is running; wait for it


async def run_sync(fn: Callable[[], T]) -> T:
    """Runs `fn()` on a worker thread and returns its result (or raises its exception)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    _pool.submit(fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
    result: T = await trio.lowlevel.wait_task_rescheduled(_abort)
    return result
