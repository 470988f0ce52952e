"""The `XenPlatform` interface (xenstore, grant tables, event channels) and its emulated client.

The 9pfs backend and frontend (`transports.xen.backend` / `.frontend`) use only the interface:
xenstore read/write/rm/directory/watch/transactions, mapping a list of grant refs of another
domain into one contiguous writable mapping, sharing pages of our own memory (frontend side), and
interdomain event channels (allocate unbound / bind / notify / wait). A real-Xen implementation
(`transports.xen.realxen`) fills the same interface from libxenstore/libxengnttab/libxenevtchn.

`EmuPlatform` talks to the emulated xenstore daemon (`transports.xen.emu`) over a unix socket:
grant refs are page numbers of the frontend domain's sealed memfd (handed over with SCM_RIGHTS),
event channels are two eventfds (one per direction) handed over the same way. Waiting on an event
channel is `trio.lowlevel.wait_readable` on its fd: no thread per ring.

This module must never trust a grant ref, port or page count it did not check itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from transports.xen._ext import ring_ext
from transports.xen.wire import FrameSocket, WireError

PAGE = 4096
DEFAULT_SOCKET = "/run/ninep/xenstore.sock"
SOCKET_ENV = "NINEP_XENSTORE"


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV, DEFAULT_SOCKET)


class XenstoreError(OSError):
    """A xenstore (or grant / event-channel) request failed; `errno` says why
    (ENOENT: no such node, EAGAIN: transaction conflict, retry)."""


class GrantMapping(Protocol):
    """Pages of another domain mapped contiguously; supports the buffer protocol."""

    size: int
    closed: bool

    def close(self) -> None: ...


class EventChannel(Protocol):
    port: int

    def fileno(self) -> int:
        """An fd that becomes readable when the peer notified us (level-triggered until
        `clear`)."""
        ...

    def clear(self) -> None:
        """Acknowledge pending notifications (and unmask, on real Xen)."""
        ...

    def notify(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class SharedPages:
    """Pages of our own memory granted to another domain, contiguous in our view."""

    refs: list[int]
    view: memoryview
    _release: Any = field(repr=False, default=None)

    def release(self) -> None:
        if self._release is not None:
            self.view.release()
            rel, self._release = self._release, None
            rel()


class Watch(Protocol):
    async def wait(self) -> str:
        """The next path that changed under the watched node (the first event fires at once)."""
        ...

    async def aclose(self) -> None: ...


class XenPlatform(Protocol):
    """What the 9pfs transport needs from Xen (or from its emulation)."""

    domid: int

    async def read(self, path: str, tx: int = 0) -> str: ...

    async def write(self, path: str, value: str, tx: int = 0) -> None: ...

    async def rm(self, path: str, tx: int = 0) -> None: ...

    async def directory(self, path: str, tx: int = 0) -> list[str]: ...

    async def transaction_start(self) -> int: ...

    async def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """False when the transaction conflicted and must be retried."""
        ...

    async def watch(self, path: str) -> Watch: ...

    async def map_grants(self, domid: int, refs: Sequence[int]) -> GrantMapping: ...

    async def share_pages(self, remote_domid: int, count: int) -> SharedPages: ...

    async def alloc_unbound(self, remote_domid: int) -> EventChannel: ...

    async def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel: ...

    async def aclose(self) -> None: ...


async def read_or(platform: XenPlatform, path: str, default: str | None = None) -> str | None:
    try:
        return await platform.read(path)
    except XenstoreError as e:
        if e.errno == errno.ENOENT:
            return default
        raise


# ------------------------------------------------------------------------------------------------
# Emulation client


def _drain_py(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def _signal_py(fd: int) -> None:
    # The counter saturating (EAGAIN) still leaves the fd readable: a lost increment is fine.
    with contextlib.suppress(BlockingIOError):
        os.write(fd, b"\x01\0\0\0\0\0\0\0")


try:  # the compiled helpers avoid an exception per empty read
    from transports._ring import drain_eventfd as _drain
    from transports._ring import signal_eventfd as _signal
except ImportError:  # pragma: no cover - extension not built
    _drain, _signal = _drain_py, _signal_py


class EmuEventChannel:
    """One end of an emulated interdomain event channel: we wait on one eventfd, notify the
    other."""

    def __init__(self, platform: EmuPlatform, port: int, wait_fd: int, notify_fd: int) -> None:
        self.port = port
        self._platform = platform
        self._wait_fd = wait_fd
        self._notify_fd = notify_fd
        self._closed = False

    def fileno(self) -> int:
        return self._wait_fd

    def clear(self) -> None:
        _drain(self._wait_fd)

    def notify(self) -> None:
        if self._closed:
            return
        _signal(self._notify_fd)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._wait_fd)
        os.close(self._wait_fd)
        os.close(self._notify_fd)
        with contextlib.suppress(XenstoreError, OSError, EOFError, trio.ClosedResourceError):
            await self._platform._request("evtchn_close", port=self.port)


class EmuWatch:
    def __init__(self, platform: EmuPlatform, path: str, token: str) -> None:
        self._platform = platform
        self.path = path
        self.token = token
        self.events: deque[str] = deque()
        self.closed = False

    async def wait(self) -> str:
        while not self.events:
            if self.closed:
                raise trio.ClosedResourceError("watch closed")
            await self._platform._pump()
        return self.events.popleft()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._platform._watches.pop(self.token, None)
        with contextlib.suppress(XenstoreError, OSError, EOFError):
            await self._platform._request("unwatch", path=self.path, token=self.token)


class _Arena:
    """Our own memory as a domain: a sealed memfd whose page numbers are the grant refs."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.fd = os.memfd_create("ninep-xen-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, pages * PAGE)
        # A sealed size means a peer that mapped our pages can never take SIGBUS from a shrink.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, pages * PAGE)
        # Free runs of pages (start, count); page 0 stays reserved, like Xen's reserved refs.
        self.free: list[tuple[int, int]] = [(1, pages - 1)]

    def alloc(self, count: int) -> int:
        for i, (start, n) in enumerate(self.free):
            if n >= count:
                if n == count:
                    del self.free[i]
                else:
                    self.free[i] = (start + count, n - count)
                return start  # zero: never used, or punched out on release
        raise XenstoreError(errno.ENOMEM, f"no {count} contiguous free pages in the arena")

    def release(self, start: int, count: int) -> None:
        # Give the memory back and make the pages read as zero for their next user.
        self.map.madvise(mmap.MADV_REMOVE, start * PAGE, count * PAGE)
        self.free.append((start, count))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free = merged

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)


class EmuPlatform:
    """`XenPlatform` over the emulated xenstore daemon. Create with `await EmuPlatform.connect()`.

    Requests may be issued from several tasks; whichever task needs a frame reads it (one at a
    time) and hands replies and watch events to their owners, so no background task is needed.
    """

    def __init__(self, fs: FrameSocket, domid: int, arena: _Arena | None) -> None:
        self.domid = domid
        self._fs = fs
        self._arena = arena
        self._next_id = 1
        self._replies: dict[int, tuple[dict[str, Any], list[int]]] = {}
        self._abandoned: set[int] = set()
        self._watches: dict[str, EmuWatch] = {}
        self._next_token = 1
        self._reading = False
        self._frame_event = trio.Event()
        self._dead: BaseException | None = None

    @classmethod
    async def connect(
        cls, socket_path: str | None = None, domid: int = 0, arena_pages: int = 0
    ) -> EmuPlatform:
        """Connects as domain `domid`. A frontend domain passes `arena_pages` > 0: that much
        memory becomes grantable (sparse: untouched pages cost nothing)."""
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.connect(socket_path or default_socket())
        except BaseException:
            sock.close()
            raise
        arena = _Arena(arena_pages) if arena_pages > 0 else None
        plat = cls(FrameSocket(sock), domid, arena)
        try:
            # A previous connection of the same domain may still be going away: retry briefly.
            introduced = False
            with trio.move_on_after(2):
                while True:
                    try:
                        if arena is not None:
                            await plat._request(
                                "introduce", [arena.fd], domid=domid, pages=arena.pages
                            )
                        else:
                            await plat._request("introduce", domid=domid)
                        introduced = True
                        break
                    except XenstoreError as e:
                        if e.errno != errno.EEXIST:
                            raise
                        await trio.sleep(0.01)
            if not introduced:
                raise XenstoreError(errno.EEXIST, f"domain {domid} is already connected")
        except BaseException:
            await plat.aclose()
            raise
        return plat

    # -- request machinery --------------------------------------------------------------------

    async def _pump(self) -> None:
        """Read and dispatch one frame, or wait until the task that is reading has done so."""
        if self._dead is not None:
            raise trio.ClosedResourceError(f"xenstore connection lost: {self._dead}")
        if self._reading:
            await self._frame_event.wait()
            return
        self._reading = True
        try:
            obj, fds = await self._fs.receive()
            self._dispatch(obj, fds)
        except (EOFError, WireError, OSError) as e:
            self._dead = e
            raise trio.ClosedResourceError(f"xenstore connection lost: {e}") from e
        finally:
            self._reading = False
            ev, self._frame_event = self._frame_event, trio.Event()
            ev.set()

    def _dispatch(self, obj: dict[str, Any], fds: list[int]) -> None:
        if obj.get("ev") == "watch":
            w = self._watches.get(str(obj.get("token")))
            if w is not None:
                w.events.append(str(obj.get("path")))
            for fd in fds:
                os.close(fd)
            return
        rid = obj.get("id")
        if not isinstance(rid, int) or rid in self._abandoned:
            self._abandoned.discard(rid)
            for fd in fds:
                os.close(fd)
            return
        self._replies[rid] = (obj, fds)

    async def _request(
        self, op: str, fds: list[int] | None = None, **args: Any
    ) -> tuple[Any, list[int]]:
        if self._dead is not None:
            raise trio.ClosedResourceError(f"xenstore connection lost: {self._dead}")
        rid = self._next_id
        self._next_id += 1
        try:
            await self._fs.send({"op": op, "id": rid, **args}, fds)
            while rid not in self._replies:
                await self._pump()
        except BaseException:
            if rid not in self._replies:
                self._abandoned.add(rid)
            raise
        obj, rfds = self._replies.pop(rid)
        if not obj.get("ok"):
            for fd in rfds:
                os.close(fd)
            raise XenstoreError(int(obj.get("errno", errno.EIO)), str(obj.get("error", op)))
        return obj.get("value"), rfds

    async def _call(self, op: str, **args: Any) -> Any:
        value, fds = await self._request(op, **args)
        for fd in fds:
            os.close(fd)
        return value

    # -- xenstore -----------------------------------------------------------------------------

    async def read(self, path: str, tx: int = 0) -> str:
        return str(await self._call("read", path=path, tx=tx))

    async def write(self, path: str, value: str, tx: int = 0) -> None:
        await self._call("write", path=path, value=value, tx=tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self._call("rm", path=path, tx=tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        return [str(x) for x in await self._call("directory", path=path, tx=tx)]

    async def transaction_start(self) -> int:
        return int(await self._call("tx_start"))

    async def transaction_end(self, tx: int, commit: bool = True) -> bool:
        try:
            await self._call("tx_end", tx=tx, commit=commit)
        except XenstoreError as e:
            if e.errno == errno.EAGAIN:
                return False
            raise
        return True

    async def watch(self, path: str) -> EmuWatch:
        token = f"t{self._next_token}"
        self._next_token += 1
        w = EmuWatch(self, path, token)
        self._watches[token] = w
        try:
            await self._call("watch", path=path, token=token)
        except BaseException:
            self._watches.pop(token, None)
            raise
        return w

    # -- grants -------------------------------------------------------------------------------

    async def map_grants(self, domid: int, refs: Sequence[int]) -> GrantMapping:
        value, fds = await self._request("grant_fd", domid=domid)
        try:
            if len(fds) != 1:
                raise XenstoreError(errno.EPROTO, "grant_fd reply without its fd")
            pages = int(value)
            for ref in refs:
                if not isinstance(ref, int) or not 1 <= ref < pages:
                    raise XenstoreError(
                        errno.EINVAL, f"grant ref {ref!r} of domain {domid} out of range"
                    )
            mapping: GrantMapping = ring_ext().xen_map_grants(fds[0], list(refs))
            return mapping
        finally:
            for fd in fds:
                os.close(fd)

    async def share_pages(self, remote_domid: int, count: int) -> SharedPages:
        if self._arena is None:
            raise XenstoreError(errno.EPERM, "this domain has no grantable memory (arena_pages=0)")
        arena = self._arena
        start = arena.alloc(count)
        view = memoryview(arena.map)[start * PAGE : (start + count) * PAGE]
        return SharedPages(
            refs=list(range(start, start + count)),
            view=view,
            _release=lambda: arena.release(start, count),
        )

    # -- event channels -----------------------------------------------------------------------

    async def alloc_unbound(self, remote_domid: int) -> EmuEventChannel:
        value, fds = await self._request("evtchn_alloc", remote=remote_domid)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise XenstoreError(errno.EPROTO, "evtchn_alloc reply without its fds")
        return EmuEventChannel(self, int(value), fds[0], fds[1])

    async def bind_interdomain(self, domid: int, remote_port: int) -> EmuEventChannel:
        value, fds = await self._request("evtchn_bind", domid=domid, port=remote_port)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise XenstoreError(errno.EPROTO, "evtchn_bind reply without its fds")
        return EmuEventChannel(self, int(value), fds[0], fds[1])

    async def aclose(self) -> None:
        self._dead = self._dead or EOFError("closed")
        self._fs.close()
        for rid in list(self._replies):
            for fd in self._replies.pop(rid)[1]:
                os.close(fd)
        if self._arena is not None:
            self._arena.close()
            self._arena = None


def le32(buf: Any, off: int) -> int:
    """One read of a little-endian u32 from shared memory into a private int."""
    return int(struct.unpack_from("<I", buf, off)[0])
