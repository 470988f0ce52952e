"""The fid table: the one way a fid leaves a connection, and it withdraws direct I/O first."""

from __future__ import annotations

import errno

import pytest

from fs_backends.base import Cred
from fs_backends.memory import MemoryBackend
from ninep.server.exports import ExportTable
from ninep.server.fids import Fid, FidTable


def _fid(withdrawn: list[int], number: int) -> Fid:
    export = next(iter(ExportTable.single(MemoryBackend())))
    fid = Fid(object(), Cred(0, 0, "root"), export=export)  # type: ignore[arg-type]
    fid.direct = lambda: withdrawn.append(number)
    return fid


def test_removing_a_fid_withdraws_its_direct_io_once() -> None:
    withdrawn: list[int] = []
    table = FidTable()
    fid = _fid(withdrawn, 1)
    table.add(1, fid)
    with pytest.raises(OSError) as e:
        table.add(1, fid)
    assert e.value.errno == errno.EBADF
    assert table.remove(1) is fid and withdrawn == [1] and fid.direct is None
    assert 1 not in table and len(table) == 0
    fid.withdraw_direct()
    assert withdrawn == [1]


def test_clearing_and_draining_withdraw_every_fid() -> None:
    withdrawn: list[int] = []
    table = FidTable()
    for n in (1, 2, 3):
        table.add(n, _fid(withdrawn, n))
    table.withdraw_direct()
    assert sorted(withdrawn) == [1, 2, 3] and len(table) == 3
    for n in (4, 5):
        table.add(n, _fid(withdrawn, n))
    assert len(table.clear()) == 5 and len(table) == 0
    assert sorted(withdrawn) == [1, 2, 3, 4, 5]
