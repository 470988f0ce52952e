"""The inode table on its own (no mount): numbering, lookup counts, superseded handles."""

from __future__ import annotations

from dataclasses import dataclass

from ninep.fuse.inodes import ALT_INODE_BASE, ROOT_INODE, InodeTable
from ninep.protocol import numbers as P
from ninep.protocol.openflags import host_to_dotl
from ninep.protocol.types import Qid


@dataclass(eq=False)
class N:
    qid: Qid


def node(path: int, type: int = P.QTFILE) -> N:
    return N(Qid(type, 0, path))


def test_numbers_come_from_qid_path_and_collisions_get_stable_alternates() -> None:
    t = InodeTable()
    t.add_root(node(77, P.QTDIR))
    a, _ = t.register(node(500), Qid(0, 0, 500), ROOT_INODE, "a")
    assert a.ino == 500
    one, _ = t.register(node(1), Qid(0, 0, 1), ROOT_INODE, "one")  # 1 is the root's number
    assert one.ino >= ALT_INODE_BASE
    zero, _ = t.register(node(0), Qid(0, 0, 0), ROOT_INODE, "zero")
    assert zero.ino >= ALT_INODE_BASE and zero.ino != one.ino
    # forgotten and looked up again: the same numbers
    alt_one = one.ino
    assert t.forget(alt_one, 1)
    again, _ = t.register(node(1), Qid(0, 0, 1), ROOT_INODE, "one")
    assert again.ino == alt_one
    # the root's own qid.path maps to the root
    root_again, drop = t.register(node(77, P.QTDIR), Qid(P.QTDIR, 0, 77), ROOT_INODE, "..")
    assert root_again.ino == ROOT_INODE and len(drop) == 1


def test_lookup_counts_free_entries_and_release_every_handle() -> None:
    t = InodeTable()
    t.add_root(node(2, P.QTDIR))
    first, second = node(10), node(10)
    ent, drop = t.register(first, first.qid, ROOT_INODE, "x")
    assert drop == []
    ent2, drop = t.register(second, second.qid, ROOT_INODE, "hardlink")
    assert ent2 is ent and ent.nlookup == 2
    assert drop == [first]  # the fresh handle replaces the older one
    assert ent.names == [(ROOT_INODE, "hardlink"), (ROOT_INODE, "x")]
    ent.nopen += 1
    assert t.forget(ent.ino, 2) == []  # still open
    assert len(t) == 2
    assert t.close_one(ent) == [second]
    assert len(t) == 1 and ent.ino not in t.by_ino


def test_busy_entries_keep_superseded_handles_until_idle() -> None:
    t = InodeTable()
    t.add_root(node(2, P.QTDIR))
    old, new = node(10), node(10)
    ent, _ = t.register(old, old.qid, ROOT_INODE, "x")
    ent.busy = 1  # a backend call is using `old`
    assert t.replace_node(ent, new) == []
    assert t.forget(ent.ino, 1) == []  # dropped, but in use
    ent.busy = 0
    assert set(map(id, t.reap(ent))) == {id(old), id(new)}


def test_a_new_file_type_under_a_reused_number_takes_the_entry_over() -> None:
    t = InodeTable()
    t.add_root(node(2, P.QTDIR))
    f = node(10)
    ent, _ = t.register(f, f.qid, ROOT_INODE, "x")
    d = node(10, P.QTDIR)
    ent2, drop = t.register(d, d.qid, ROOT_INODE, "x")
    assert ent2.ino == ent.ino and ent2.qid_type == P.QTDIR and drop == [f]


def test_open_flags_translate_to_linux_values() -> None:
    import os

    assert host_to_dotl(os.O_RDWR | os.O_APPEND) == P.L_O_RDWR | P.L_O_APPEND
    assert host_to_dotl(os.O_WRONLY | os.O_CREAT | os.O_EXCL) == P.L_O_WRONLY
    assert host_to_dotl(os.O_WRONLY | os.O_CREAT | os.O_EXCL, create=True) == (
        P.L_O_WRONLY | P.L_O_CREAT | P.L_O_EXCL
    )
    assert host_to_dotl(os.O_WRONLY | os.O_DSYNC) == P.L_O_WRONLY | P.L_O_DSYNC
    assert host_to_dotl(os.O_WRONLY | os.O_SYNC) == P.L_O_WRONLY | P.L_O_DSYNC | P.L_O_SYNC
    # O_DIRECT would make the backend read into unaligned buffers: never passed on
    assert host_to_dotl(os.O_RDONLY | os.O_DIRECT) == P.L_O_RDONLY
