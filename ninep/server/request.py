"""A request in flight on one connection, and the forms a handler's answer takes.

Both the session (which runs requests) and the handlers (which answer them) import this module;
it imports neither, so handlers → request ← session holds no cycle. This module must never do
I/O or know about a particular message.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


class Sent:
    """Returned by a handler that already sent its reply itself (zero-copy reads), with the
    payload bytes it sent (for the metrics)."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int = 0) -> None:
        self.nbytes = nbytes


class Flushed(Exception):
    """Raised inside a request interrupted by Tflush or by the connection ending: no reply."""


@dataclass(slots=True)
class Request:
    tag: int
    msgtype: int
    #: Set by Tflush (or teardown); `wait_scope` is the interruptible wait in progress, if any.
    flushed: bool = False
    wait_scope: trio.CancelScope | None = None
    #: The shielded scope the request runs in (see `Session._lead`); unshielded and cancelled
    #: only as a last resort.
    scope: trio.CancelScope | None = None
    started: float = 0.0
    #: Bytes charged to the connection's memory budget (ninep.server.limits.request_cost).
    cost: int = 0
    #: Set just before the reply goes out: from then on the client may legitimately reuse the tag
    #: (it can see the reply before this task has removed the request from `inflight`).
    answered: bool = False
    finished: bool = False
    #: Made only when someone waits for the request (flush, drain, a reused tag): most never do.
    _done: trio.Event | None = None

    @property
    def done(self) -> trio.Event:
        """Set once the request has finished (replied, or ended with no reply)."""
        if self._done is None:
            self._done = trio.Event()
            if self.finished:
                self._done.set()
        return self._done

    def finish(self) -> None:
        self.finished = True
        if self._done is not None:
            self._done.set()


__all__ = ["Flushed", "Request", "Sent"]
