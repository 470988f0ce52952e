"""`XenPlatform` on a real Xen host, over libxenstore / libxengnttab / libxenevtchn via ctypes.

NOT USED BY DEFAULT AND NEVER RUN HERE: these machines have no hypervisor (/dev/xen/*), so only
the argument marshalling is tested (against a fake library object, tests/transports/xen/test_realxen.py).
Nothing imports this module unless asked: `RealXenPlatform.open(domid)` from code that knows it
runs in a Xen control or driver domain (Debian packages libxenstore4, libxengnttab1,
libxenevtchn1). The backend and frontend need no change to use it.

Mapping of the interface:
- xenstore: xs_read / xs_write / xs_rm / xs_directory / xs_transaction_start/end / xs_watch; the
  library's calls block on the xenstored socket, so each runs in a worker thread; watch events
  are collected when `xs_fileno` is readable (xs_check_watch until EAGAIN).
- grants: xengnttab_map_domain_grant_refs (one contiguous mapping of many refs, PROT_READ|WRITE),
  wrapped in the extension's GrantMap (same export accounting as the emulation; close unmaps);
  frontend side xengntshr_share_pages / xengntshr_unshare.
- event channels: one xenevtchn handle per channel, so each has its own fd (a Doorbell may epoll
  several); `clear` acknowledges with xenevtchn_pending + xenevtchn_unmask only when the fd is
  readable (the read would block otherwise).

This module must never be imported by the emulated path nor guess at a library's ABI beyond the
public headers (xenstore.h, xengnttab.h, xenevtchn.h of Xen 4.17).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import select
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from transports.xen._ext import ring_ext
from transports.xen.platform import GrantMapping, SharedPages, XenstoreError

PAGE = 4096
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

c_u32 = ctypes.c_uint32
_vp = ctypes.c_void_p
_cp = ctypes.c_char_p

#: name → (restype, argtypes), from the public headers.
SIGNATURES: dict[str, dict[str, tuple[Any, list[Any]]]] = {
    "xenstore": {
        "xs_open": (_vp, [ctypes.c_ulong]),
        "xs_close": (None, [_vp]),
        "xs_read": (_vp, [_vp, c_u32, _cp, ctypes.POINTER(ctypes.c_uint)]),
        "xs_write": (ctypes.c_bool, [_vp, c_u32, _cp, _cp, ctypes.c_uint]),
        "xs_rm": (ctypes.c_bool, [_vp, c_u32, _cp]),
        "xs_directory": (ctypes.POINTER(_cp), [_vp, c_u32, _cp, ctypes.POINTER(ctypes.c_uint)]),
        "xs_transaction_start": (c_u32, [_vp]),
        "xs_transaction_end": (ctypes.c_bool, [_vp, c_u32, ctypes.c_bool]),
        "xs_watch": (ctypes.c_bool, [_vp, _cp, _cp]),
        "xs_unwatch": (ctypes.c_bool, [_vp, _cp, _cp]),
        "xs_fileno": (ctypes.c_int, [_vp]),
        "xs_check_watch": (ctypes.POINTER(_cp), [_vp]),
    },
    "xengnttab": {
        "xengnttab_open": (_vp, [_vp, ctypes.c_uint]),
        "xengnttab_close": (ctypes.c_int, [_vp]),
        "xengnttab_map_domain_grant_refs": (
            _vp,
            [_vp, c_u32, c_u32, ctypes.POINTER(c_u32), ctypes.c_int],
        ),
        "xengnttab_unmap": (ctypes.c_int, [_vp, _vp, c_u32]),
        "xengntshr_open": (_vp, [_vp, ctypes.c_uint]),
        "xengntshr_close": (ctypes.c_int, [_vp]),
        "xengntshr_share_pages": (
            _vp,
            [_vp, c_u32, ctypes.c_int, ctypes.POINTER(c_u32), ctypes.c_int],
        ),
        "xengntshr_unshare": (ctypes.c_int, [_vp, _vp, c_u32]),
    },
    "xenevtchn": {
        "xenevtchn_open": (_vp, [_vp, ctypes.c_uint]),
        "xenevtchn_close": (ctypes.c_int, [_vp]),
        "xenevtchn_fd": (ctypes.c_int, [_vp]),
        "xenevtchn_notify": (ctypes.c_int, [_vp, c_u32]),
        "xenevtchn_bind_unbound_port": (ctypes.c_int, [_vp, c_u32]),
        "xenevtchn_bind_interdomain": (ctypes.c_int, [_vp, c_u32, c_u32]),
        "xenevtchn_unbind": (ctypes.c_int, [_vp, c_u32]),
        "xenevtchn_pending": (ctypes.c_int, [_vp]),
        "xenevtchn_unmask": (ctypes.c_int, [_vp, c_u32]),
    },
}
SONAMES = {
    "xenstore": "libxenstore.so.4",
    "xengnttab": "libxengnttab.so.1",
    "xenevtchn": "libxenevtchn.so.1",
}


class Libs:
    """The three libraries (plus libc's free), with argtypes/restype from SIGNATURES."""

    def __init__(
        self, xenstore: Any, xengnttab: Any, xenevtchn: Any, free: Any, get_errno: Any
    ) -> None:
        self.xs = xenstore
        self.gnt = xengnttab
        self.evt = xenevtchn
        self.free = free
        self.get_errno = get_errno

    @classmethod
    def load(cls) -> Libs:
        libs = {}
        for name, soname in SONAMES.items():
            lib = ctypes.CDLL(soname, use_errno=True)
            for fn, (restype, argtypes) in SIGNATURES[name].items():
                f = getattr(lib, fn)
                f.restype = restype
                f.argtypes = argtypes
            libs[name] = lib
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.free.argtypes = [_vp]
        libc.free.restype = None
        return cls(
            libs["xenstore"], libs["xengnttab"], libs["xenevtchn"], libc.free, ctypes.get_errno
        )


def _fail(libs: Libs, what: str) -> XenstoreError:
    err = libs.get_errno() or errno.EIO
    return XenstoreError(err, f"{what}: {errno.errorcode.get(err, err)}")


class RealEventChannel:
    def __init__(self, libs: Libs, handle: int, port: int) -> None:
        self._libs = libs
        self._h = handle
        self.port = port
        self._fd = int(libs.evt.xenevtchn_fd(handle))

    def fileno(self) -> int:
        return self._fd

    def clear(self) -> None:
        # xenevtchn_pending reads the device and would block when nothing is pending.
        while select.select([self._fd], [], [], 0)[0]:
            p = int(self._libs.evt.xenevtchn_pending(self._h))
            if p < 0:
                return
            self._libs.evt.xenevtchn_unmask(self._h, p)

    def notify(self) -> None:
        self._libs.evt.xenevtchn_notify(self._h, self.port)

    async def aclose(self) -> None:
        if self._h:
            trio.lowlevel.notify_closing(self._fd)
            self._libs.evt.xenevtchn_unbind(self._h, self.port)
            self._libs.evt.xenevtchn_close(self._h)
            self._h = 0


class RealWatch:
    def __init__(self, platform: RealXenPlatform, path: str, token: str) -> None:
        self._p = platform
        self.path = path
        self.token = token
        self.events: deque[str] = deque()
        self.closed = False

    async def wait(self) -> str:
        while not self.events:
            if self.closed:
                raise trio.ClosedResourceError("watch closed")
            await self._p._pump_watches()
        return self.events.popleft()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._p._watches.pop(self.token, None)
            await self._p._xs(self._p.libs.xs.xs_unwatch, self.path.encode(), self.token.encode())


class RealXenPlatform:
    """See the module docstring. Create with `RealXenPlatform.open(domid)` (or pass `libs` and
    handles directly, as the tests do)."""

    def __init__(self, libs: Libs, domid: int, xs: int, gnt: int, gntshr: int) -> None:
        self.libs = libs
        self.domid = domid
        self._h = xs
        self._gnt = gnt
        self._gntshr = gntshr
        self._watches: dict[str, RealWatch] = {}
        self._next_token = 1
        self._reading = False
        self._event = trio.Event()

    @classmethod
    def open(cls, domid: int, libs: Libs | None = None) -> RealXenPlatform:
        libs = libs or Libs.load()
        xs = libs.xs.xs_open(0)
        if not xs:
            raise _fail(libs, "xs_open")
        gnt = libs.gnt.xengnttab_open(None, 0)
        gntshr = libs.gnt.xengntshr_open(None, 0)
        if not gnt:
            raise _fail(libs, "xengnttab_open")
        return cls(libs, domid, xs, gnt, gntshr or 0)

    async def _xs(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, self._h, *args)

    # -- xenstore ---------------------------------------------------------------------------------

    async def read(self, path: str, tx: int = 0) -> str:
        length = ctypes.c_uint(0)
        ptr = await self._xs(self.libs.xs.xs_read, tx, path.encode(), ctypes.byref(length))
        if not ptr:
            raise _fail(self.libs, f"read {path}")
        try:
            return ctypes.string_at(ptr, length.value).decode()
        finally:
            self.libs.free(ptr)

    async def write(self, path: str, value: str, tx: int = 0) -> None:
        data = value.encode()
        if not await self._xs(self.libs.xs.xs_write, tx, path.encode(), data, len(data)):
            raise _fail(self.libs, f"write {path}")

    async def rm(self, path: str, tx: int = 0) -> None:
        if not await self._xs(self.libs.xs.xs_rm, tx, path.encode()):
            raise _fail(self.libs, f"rm {path}")

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        num = ctypes.c_uint(0)
        arr = await self._xs(self.libs.xs.xs_directory, tx, path.encode(), ctypes.byref(num))
        if not arr:
            raise _fail(self.libs, f"directory {path}")
        try:
            return [arr[i].decode() for i in range(num.value)]
        finally:
            self.libs.free(ctypes.cast(arr, _vp))

    async def transaction_start(self) -> int:
        tx = int(await trio.to_thread.run_sync(self.libs.xs.xs_transaction_start, self._h))
        if tx == 0:
            raise _fail(self.libs, "transaction_start")
        return tx

    async def transaction_end(self, tx: int, commit: bool = True) -> bool:
        ok = await self._xs(self.libs.xs.xs_transaction_end, tx, not commit)
        if ok:
            return True
        err = self.libs.get_errno()
        if err == errno.EAGAIN:
            return False
        raise XenstoreError(err or errno.EIO, "transaction_end")

    async def watch(self, path: str) -> RealWatch:
        token = f"ninep{self._next_token}"
        self._next_token += 1
        w = RealWatch(self, path, token)
        self._watches[token] = w
        if not await self._xs(self.libs.xs.xs_watch, path.encode(), token.encode()):
            self._watches.pop(token, None)
            raise _fail(self.libs, f"watch {path}")
        return w

    async def _pump_watches(self) -> None:
        if self._reading:
            await self._event.wait()
            return
        self._reading = True
        try:
            await trio.lowlevel.wait_readable(int(self.libs.xs.xs_fileno(self._h)))
            while True:
                ev = self.libs.xs.xs_check_watch(self._h)
                if not ev:
                    break
                try:
                    path, token = ev[XS_WATCH_PATH].decode(), ev[XS_WATCH_TOKEN].decode()
                finally:
                    self.libs.free(ctypes.cast(ev, _vp))
                w = self._watches.get(token)
                if w is not None:
                    w.events.append(path)
        finally:
            self._reading = False
            e, self._event = self._event, trio.Event()
            e.set()

    # -- grants -----------------------------------------------------------------------------------

    async def map_grants(self, domid: int, refs: Sequence[int]) -> GrantMapping:
        count = len(refs)
        if not 0 < count <= 4096 or any(not 0 <= r < 2**32 for r in refs):
            raise XenstoreError(errno.EINVAL, "bad grant refs")
        arr = (c_u32 * count)(*refs)
        addr = self.libs.gnt.xengnttab_map_domain_grant_refs(
            self._gnt, count, domid, arr, mmap.PROT_READ | mmap.PROT_WRITE
        )
        if not addr:
            raise _fail(self.libs, f"map {count} grants of domain {domid}")
        gnt, unmap = self._gnt, self.libs.gnt.xengnttab_unmap

        def release(address: int, length: int) -> None:
            unmap(gnt, address, length // PAGE)

        mapping: GrantMapping = ring_ext().xen_wrap_mapping(addr, count * PAGE, release)
        return mapping

    async def share_pages(self, remote_domid: int, count: int) -> SharedPages:
        if not self._gntshr:
            raise XenstoreError(errno.ENODEV, "no grant sharing device")
        refs = (c_u32 * count)()
        addr = self.libs.gnt.xengntshr_share_pages(self._gntshr, remote_domid, count, refs, 1)
        if not addr:
            raise _fail(self.libs, f"share {count} pages with domain {remote_domid}")
        view = memoryview((ctypes.c_char * (count * PAGE)).from_address(addr)).cast("B")
        gntshr, unshare = self._gntshr, self.libs.gnt.xengntshr_unshare
        return SharedPages(list(refs), view, lambda: unshare(gntshr, addr, count))

    # -- event channels ---------------------------------------------------------------------------

    def _evtchn_handle(self) -> int:
        h = self.libs.evt.xenevtchn_open(None, 0)
        if not h:
            raise _fail(self.libs, "xenevtchn_open")
        return int(h)

    async def alloc_unbound(self, remote_domid: int) -> RealEventChannel:
        h = self._evtchn_handle()
        port = int(self.libs.evt.xenevtchn_bind_unbound_port(h, remote_domid))
        if port < 0:
            err = _fail(self.libs, "bind_unbound_port")
            self.libs.evt.xenevtchn_close(h)
            raise err
        return RealEventChannel(self.libs, h, port)

    async def bind_interdomain(self, domid: int, remote_port: int) -> RealEventChannel:
        h = self._evtchn_handle()
        port = int(self.libs.evt.xenevtchn_bind_interdomain(h, domid, remote_port))
        if port < 0:
            err = _fail(self.libs, f"bind_interdomain {domid}:{remote_port}")
            self.libs.evt.xenevtchn_close(h)
            raise err
        return RealEventChannel(self.libs, h, port)

    async def aclose(self) -> None:
        if self._h:
            self.libs.xs.xs_close(self._h)
            self._h = 0
        if self._gnt:
            self.libs.gnt.xengnttab_close(self._gnt)
            self._gnt = 0
        if self._gntshr:
            self.libs.gnt.xengntshr_close(self._gntshr)
            self._gntshr = 0
