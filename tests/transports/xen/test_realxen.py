"""The real-Xen platform cannot run here (no hypervisor): these tests check what it passes to the
libraries and how it reads their results, against a fake library, plus (when the Debian libraries
are installed) that every declared function exists in them."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any

import pytest
import trio

from transports.xen.platform import XenstoreError
from transports.xen.realxen import SIGNATURES, SONAMES, Libs, RealXenPlatform


class Fn:
    def __init__(self, result: Any = 0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.result = result

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.result(*args) if callable(self.result) else self.result


class Lib:
    def __init__(self, **fns: Fn) -> None:
        self.__dict__.update(fns)

    def __getattr__(self, name: str) -> Fn:
        fn = Fn()
        self.__dict__[name] = fn
        return fn


def make() -> tuple[RealXenPlatform, Libs, dict[str, Any]]:
    state: dict[str, Any] = {"errno": 0, "freed": [], "keep": []}
    libs = Libs(Lib(), Lib(), Lib(), lambda p: state["freed"].append(p), lambda: state["errno"])
    return RealXenPlatform(libs, 0, xs=0x1000, gnt=0x2000, gntshr=0x3000), libs, state


def test_xenstore_calls_are_marshalled_as_the_headers_say() -> None:
    plat, libs, state = make()
    value = ctypes.create_string_buffer(b"Connected\0")
    state["keep"].append(value)

    def xs_read(h: int, tx: int, path: bytes, length: Any) -> int:
        length._obj.value = 9
        return ctypes.addressof(value)

    libs.xs.xs_read = Fn(xs_read)
    libs.xs.xs_write = Fn(True)
    libs.xs.xs_transaction_start = Fn(17)
    libs.xs.xs_transaction_end = Fn(False)

    async def main() -> None:
        assert await plat.read("/local/domain/1/state", 5) == "Connected"
        assert libs.xs.xs_read.calls[0][:3] == (0x1000, 5, b"/local/domain/1/state")
        assert state["freed"] == [ctypes.addressof(value)]  # the library's buffer is freed
        await plat.write("/a/b", "héllo")
        assert libs.xs.xs_write.calls[0] == (0x1000, 0, b"/a/b", "héllo".encode(), 6)
        assert await plat.transaction_start() == 17
        state["errno"] = errno.EAGAIN
        assert await plat.transaction_end(17) is False  # conflict: retry
        assert libs.xs.xs_transaction_end.calls[0] == (0x1000, 17, False)  # commit = not abort
        state["errno"] = errno.EACCES
        with pytest.raises(XenstoreError) as ei:
            await plat.transaction_end(18, commit=False)
        assert ei.value.errno == errno.EACCES
        assert libs.xs.xs_transaction_end.calls[1] == (0x1000, 18, True)
        libs.xs.xs_read.result = 0
        state["errno"] = errno.ENOENT
        with pytest.raises(XenstoreError) as ei:
            await plat.read("/nope")
        assert ei.value.errno == errno.ENOENT

    trio.run(main)


def test_directory_returns_names_and_frees_the_array() -> None:
    plat, libs, state = make()
    names = (ctypes.c_char_p * 2)(b"ring-ref0", b"event-channel-0")

    def xs_directory(h: int, tx: int, path: bytes, num: Any) -> Any:
        num._obj.value = 2
        return names

    libs.xs.xs_directory = Fn(xs_directory)
    assert trio.run(plat.directory, "/x") == ["ring-ref0", "event-channel-0"]
    assert [getattr(p, "value", p) for p in state["freed"]] == [ctypes.addressof(names)]


def test_grant_map_passes_refs_domid_and_protection_and_unmaps_on_close() -> None:
    plat, libs, state = make()
    pages = mmap.mmap(-1, 3 * 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    seen: list[list[int]] = []

    def map_refs(h: int, count: int, domid: int, refs: Any, prot: int) -> int:
        seen.append(list(refs))
        return addr

    libs.gnt.xengnttab_map_domain_grant_refs = Fn(map_refs)

    async def main() -> None:
        g = await plat.map_grants(7, [11, 12, 40])
        h, count, domid, _, prot = libs.gnt.xengnttab_map_domain_grant_refs.calls[0]
        assert (h, count, domid, prot) == (0x2000, 3, 7, mmap.PROT_READ | mmap.PROT_WRITE)
        assert seen == [[11, 12, 40]]
        with memoryview(g) as v:  # type: ignore[arg-type]
            v[5] = 9
        assert pages[5] == 9
        g.close()
        assert libs.gnt.xengnttab_unmap.calls == [(0x2000, addr, 3)]
        libs.gnt.xengnttab_map_domain_grant_refs.result = 0
        state["errno"] = errno.EPERM
        with pytest.raises(XenstoreError):
            await plat.map_grants(7, [1])
        with pytest.raises(XenstoreError):
            await plat.map_grants(7, [2**32])

    trio.run(main)
    pages.close()


def test_event_channels_bind_notify_and_acknowledge() -> None:
    plat, libs, state = make()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    libs.evt.xenevtchn_open = Fn(0x4000)
    libs.evt.xenevtchn_fd = Fn(efd)
    libs.evt.xenevtchn_bind_interdomain = Fn(33)

    def pending(h: int) -> int:
        os.read(efd, 8)
        return 33

    libs.evt.xenevtchn_pending = Fn(pending)

    async def main() -> None:
        ch = await plat.bind_interdomain(3, 12)
        assert libs.evt.xenevtchn_bind_interdomain.calls == [(0x4000, 3, 12)]
        assert ch.port == 33 and ch.fileno() == efd
        ch.notify()
        assert libs.evt.xenevtchn_notify.calls == [(0x4000, 33)]
        ch.clear()  # nothing pending: must not call pending (it would block)
        assert libs.evt.xenevtchn_pending.calls == []
        os.write(efd, (1).to_bytes(8, "little"))
        ch.clear()
        assert libs.evt.xenevtchn_unmask.calls == [(0x4000, 33)]
        await ch.aclose()
        assert libs.evt.xenevtchn_unbind.calls == [(0x4000, 33)]
        assert libs.evt.xenevtchn_close.calls == [(0x4000,)]
        libs.evt.xenevtchn_bind_unbound_port = Fn(-1)
        state["errno"] = errno.ENOSPC
        with pytest.raises(XenstoreError):
            await plat.alloc_unbound(0)

    trio.run(main)
    os.close(efd)


def _installed() -> bool:
    try:
        for soname in SONAMES.values():
            ctypes.CDLL(soname)
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not _installed(), reason="libxenstore4/libxengnttab1/libxenevtchn1 not installed"
)
def test_declared_functions_exist_in_the_installed_libraries() -> None:
    libs = Libs.load()  # sets every argtypes/restype: fails if a symbol is missing
    for name, fns in SIGNATURES.items():
        lib = {"xenstore": libs.xs, "xengnttab": libs.gnt, "xenevtchn": libs.evt}[name]
        for fn in fns:
            assert getattr(lib, fn).argtypes is not None
