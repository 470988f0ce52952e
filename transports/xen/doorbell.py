"""Waiting for event-channel notifications from several tasks at once, without threads.

A `Doorbell` watches one or more event channels (one per ring; several are combined with an
epoll fd). Any number of tasks may `await bell.wait()`: the first becomes the one that waits on
the fd; when it wakes it acknowledges every channel and wakes all the others. A wake-up only
means "look at the ring indices again" — callers always re-check their condition, so doorbell
storms cost a re-check each and a missing doorbell is never relied upon beyond the next one.

This module must never read ring memory.
"""

from __future__ import annotations

import select
from collections.abc import Sequence

import trio

from transports.xen.platform import EventChannel


class Doorbell:
    def __init__(self, channels: Sequence[EventChannel]) -> None:
        self._channels = list(channels)
        self._epoll: select.epoll | None = None
        if len(self._channels) == 1:
            self._fd = self._channels[0].fileno()
        else:
            self._epoll = select.epoll()
            for ch in self._channels:
                self._epoll.register(ch.fileno(), select.EPOLLIN)
            self._fd = self._epoll.fileno()
        self._waiting = False
        self._event = trio.Event()
        self._closed = False
        #: Number of wake-ups seen (for tests and statistics).
        self.rings = 0

    async def wait(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("doorbell closed")
        if self._waiting:
            await self._event.wait()
            if self._closed:
                raise trio.ClosedResourceError("doorbell closed")
            return
        self._waiting = True
        try:
            await trio.lowlevel.wait_readable(self._fd)
            self.rings += 1
            for ch in self._channels:
                ch.clear()
        finally:
            self._waiting = False
            ev, self._event = self._event, trio.Event()
            ev.set()

    def close(self) -> None:
        """Wakes every waiter with ClosedResourceError. The channels themselves are not closed."""
        if self._closed:
            return
        self._closed = True
        if self._waiting:
            trio.lowlevel.notify_closing(self._fd)
        ev, self._event = self._event, trio.Event()
        ev.set()
        if self._epoll is not None:
            self._epoll.close()
