"""Adaptive polling of a virtqueue: how long the back-end spins on the ring before it sleeps.

A request that finds the back-end asleep costs it a wake-up: the driver's kick (an exit for the
guest), an eventfd, the scheduler moving us back onto a CPU and, worst of all on a virtualised
host, caches and TLB refilled after whatever ran there meanwhile — measured here at three to four
times the CPU of the request itself. A driver that sends its next request soon after the last
reply (Linux sends one `stat()` as seven requests in a row) is better served by spinning on the
ring for a little while, kicks suppressed, as QEMU's iothreads and vhost do. How long is learnt
the way QEMU's adaptive polling does: the window doubles while requests arrive a little too late
for it and halves when the ring stays idle past the longest window, so an idle or sparse guest
soon costs no CPU. (QEMU drops the window to nothing at once; Linux's `stat()` loop pauses
between files just long enough that regrowing from nothing cost most of the next file.) A long
pause after a burst the window served does not halve it: a guest's `dd` pauses ~1 ms between its
1 MiB writes, each three 9P writes ~200 µs apart, and halving at every pause lost a third of
those in-between requests to kicks.

This module must never spin itself: the spin is `VirtQueue.poll` (GIL released, bounded, ended
early by any other work for the event loop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

#: The longest spin when none is configured: long enough for a guest under TCG to answer an
#: interrupt with its next request (~200 µs measured), far shorter than a scheduler tick.
DEFAULT_MAX_US = 400
#: The first window after an idle period; it doubles from here.
START_NS = 4_000


def default_max_us() -> int:
    """DEFAULT_MAX_US where this process may run on two CPUs or more; 0 (never spin) on one,
    where spinning would only keep the driver's own thread off the CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return DEFAULT_MAX_US if cpus >= 2 else 0


@dataclass(slots=True)
class AdaptivePoll:
    """The current spin window of one queue, adjusted after every idle period."""

    max_ns: int
    ns: int = 0
    #: The window caught a request since the last pause longer than any window.
    useful: bool = False

    def caught(self) -> None:
        """The spin caught a request that `update` does not see (answered inside the spin)."""
        self.useful = True

    def update(self, idle_ns: int) -> None:
        """Learns from one idle period: `idle_ns` from the ring going empty to the next request
        (spin included)."""
        if idle_ns <= self.ns:
            self.useful = True  # the window caught it
            return
        if idle_ns > self.max_ns:
            if self.useful:
                self.useful = False  # a pause after a burst it served: keep it for the next
                return
            # Idle longer than any window, and the window caught nothing since the last such
            # pause: halve it (a guest whose requests come too sparsely, or that stays idle,
            # soon spins no more).
            self.ns = self.ns // 2 if self.ns > START_NS else 0
        elif self.ns < self.max_ns:
            self.ns = min(self.max_ns, max(START_NS, self.ns * 2))


def event_loop_fd() -> int:
    """The fd of trio's epoll instance (readable whenever the event loop has work: I/O on another
    connection, a worker thread finishing), so a spin can end as soon as something else needs
    the loop; -1 if this trio does not expose it (the spin then runs its whole window)."""
    try:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        fd: int = runner.io_manager._epoll.fileno()
    except (AttributeError, ValueError):
        return -1
    return fd
