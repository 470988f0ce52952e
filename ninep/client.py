"""An async 9P client (trio): tag allocation, pipelining, fid management, a file-like API.

Any number of tasks may call `rpc` at once; requests go out as they are made and replies are
matched by tag, so one connection carries many requests in flight. A caller cancelled while its
request is outstanding sends Tflush and waits for Rflush before the tag is reused, as the protocol
requires. Errors come back as `ClientError` (an OSError carrying the server's errno).

Used by the tests, the FUSE remote backend and the benchmarks; speaks 9P2000.L, 9P2000.u and
9P2000 (the `dialect` given to `connect`). This module must never import server code.
"""

from __future__ import annotations

import errno as _errno
import itertools
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from ninep.protocol import messages as m
from ninep.protocol.codec import HEADER, Codec, codec_for, unpack_dirents
from ninep.protocol.numbers import (
    GETATTR_ALL,
    IOHDRSZ,
    L_O_CREAT,
    L_O_RDONLY,
    L_O_RDWR,
    L_O_WRONLY,
    MAXWELEM,
    NOFID,
    NONUNAME,
    NOTAG,
    READ_HEADER,
    V9P2000,
    V9P2000_L,
    VERSION_UNKNOWN,
)
from ninep.protocol.types import Qid
from transports.address import connect_address
from transports.base import Channel
from transports.options import ConnectOptions

R = TypeVar("R", bound=m.Message)


#: How long a cancelled request waits for its Rflush before its tag is retired unanswered.
FLUSH_TIMEOUT = 10.0


class ClientError(OSError):
    """The server answered Rlerror/Rerror."""


@dataclass(slots=True)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    reply: m.Message | None = None
    buf: memoryview | None = None


class Client:
    def __init__(self, channel: Channel, dialect: str = V9P2000_L) -> None:
        self.channel = channel
        self.dialect = dialect
        self.codec: Codec = codec_for(dialect)
        self.msize = 0
        self._pending: dict[int, _Pending] = {}
        self._free_tags: list[int] = list(range(NOTAG - 1, -1, -1))
        self._tag_freed: trio.Event | None = None
        self._fids = itertools.count(1)
        self._free_fids: list[int] = []
        self._closed: BaseException | None = None

    # --- connection -----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str | Channel,
        *,
        dialect: str = V9P2000_L,
        msize: int = 512 * 1024,
        options: ConnectOptions | None = None,
    ) -> AsyncIterator[Client]:
        """Connects (an address like `unix:/run/9p.sock` or an existing Channel), negotiates the
        dialect and msize, and keeps a reader task running while the block runs."""
        channel = address if not isinstance(address, str) else await connect_address(address, options)
        client = cls(channel, dialect)
        refused: ClientError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    await client.version(msize, dialect)
                except ClientError as e:
                    # Raised below, outside the nursery, so the caller sees the error itself
                    # (a server that closes at once: a TLS refusal, a full server) and not a group.
                    refused = e
                else:
                    yield client
                nursery.cancel_scope.cancel()
            if refused is not None:
                raise refused
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    async def version(self, msize: int, version: str) -> tuple[int, str]:
        # As Linux's p9_client_create: never ask for more than the transport can carry.
        msize = min(msize, self.channel.max_message_size)
        reply = await self.rpc(m.Tversion(msize, version), tag=NOTAG)
        assert isinstance(reply, m.Rversion)
        if reply.version == VERSION_UNKNOWN:
            raise ClientError(_errno.EPROTONOSUPPORT, f"server does not speak {version}")
        self.dialect = reply.version
        self.codec = codec_for(reply.version)
        self.msize = reply.msize
        self.channel.set_msize(reply.msize)
        return reply.msize, reply.version

    async def _reader(self) -> None:
        try:
            while True:
                buf = await self.channel.receive()
                _, _, tag = HEADER.unpack_from(buf, 0)
                p = self._pending.get(tag)
                if p is None:
                    continue  # a reply to a flushed request: ignore it
                p.reply = self.codec.decode(buf)
                p.buf = buf
                p.done.set()
        except BaseException as e:
            self._closed = e
            for p in self._pending.values():
                p.done.set()
            if not isinstance(e, trio.EndOfChannel | trio.Cancelled):
                raise

    async def _take_tag(self) -> int:
        # Synchronous unless all 65535 tags are in use: this runs once per request.
        while not self._free_tags:
            if self._tag_freed is None:
                self._tag_freed = trio.Event()
            await self._tag_freed.wait()
        return self._free_tags.pop()

    def _give_tag(self, tag: int) -> None:
        self._free_tags.append(tag)
        if self._tag_freed is not None:
            self._tag_freed.set()
            self._tag_freed = None

    async def rpc(self, msg: m.Message, *, tag: int | None = None, flushable: bool = True) -> m.Message:
        """Sends one request and waits for its reply; Rlerror/Rerror raise ClientError."""
        if self._closed is not None:
            raise ClientError(_errno.ECONNRESET, "connection closed")
        own_tag = tag is None
        msg.tag = await self._take_tag() if tag is None else tag
        p = _Pending()
        self._pending[msg.tag] = p
        try:
            await self.channel.send(self.codec.encode(msg))
            try:
                await p.done.wait()
            except trio.Cancelled:
                if not flushable:  # a Tflush is never itself flushed
                    own_tag = False
                    raise
                # Tflush, and wait for Rflush so the tag is safe to reuse; but not forever: a
                # server whose request is wedged may never answer. Then the tag stays retired.
                with trio.CancelScope(shield=True) as flushing:
                    flushing.deadline = trio.current_time() + FLUSH_TIMEOUT
                    await self._flush(msg.tag, p)
                if flushing.cancelled_caught:
                    own_tag = False
                raise
        finally:
            self._pending.pop(msg.tag, None)
            if own_tag:
                self._give_tag(msg.tag)
        reply = p.reply
        if reply is None:
            raise ClientError(_errno.ECONNRESET, f"connection closed: {self._closed!r}")
        if isinstance(reply, m.Rlerror):
            raise ClientError(reply.ecode, os.strerror(reply.ecode))
        if isinstance(reply, m.Rerror):
            raise ClientError(reply.errno or _errno.EIO, reply.ename)
        return reply

    async def _flush(self, oldtag: int, p: _Pending) -> None:
        if self._closed is not None:
            return
        with suppress(OSError):
            await self.rpc(m.Tflush(oldtag), flushable=False)

    async def call(self, msg: m.Message, expect: type[R]) -> R:
        reply = await self.rpc(msg)
        if not isinstance(reply, expect):
            raise ClientError(_errno.EPROTO, f"expected {expect.__name__}, got {type(reply).__name__}")
        return reply

    # --- fids -------------------------------------------------------------------------------------

    def new_fid(self) -> int:
        return self._free_fids.pop() if self._free_fids else next(self._fids)

    async def attach(self, aname: str = "", uname: str = "root", n_uname: int = NONUNAME) -> int:
        fid = self.new_fid()
        await self.call(m.Tattach(fid, NOFID, uname, aname, n_uname), m.Rattach)
        return fid

    async def walk(self, fid: int, names: Sequence[str], newfid: int | None = None) -> tuple[int, list[Qid]]:
        """Walks all of `names` (in chunks of 16) to a new fid; ENOENT if any is missing."""
        target = self.new_fid() if newfid is None else newfid
        names = list(names)
        start, qids = fid, []
        try:
            while True:
                chunk, names = names[:MAXWELEM], names[MAXWELEM:]
                r = await self.call(m.Twalk(start, target, chunk), m.Rwalk)
                if len(r.wqid) < len(chunk):
                    if start == target and start != fid:
                        await self.clunk(target)
                    raise ClientError(_errno.ENOENT, f"no such file: {chunk[len(r.wqid)]}")
                qids += r.wqid
                start = target
                if not names:
                    return target, qids
        except BaseException:
            if newfid is None and start != target:
                self._free_fids.append(target)
            raise

    async def walk_path(self, fid: int, path: str) -> int:
        return (await self.walk(fid, [p for p in path.split("/") if p]))[0]

    async def clunk(self, fid: int) -> None:
        try:
            await self.call(m.Tclunk(fid), m.Rclunk)
        finally:
            self._free_fids.append(fid)

    async def remove(self, fid: int) -> None:
        try:
            await self.call(m.Tremove(fid), m.Rremove)
        finally:
            self._free_fids.append(fid)

    # --- 9P2000.L operations ----------------------------------------------------------------------

    async def lopen(self, fid: int, flags: int) -> tuple[Qid, int]:
        r = await self.call(m.Tlopen(fid, flags), m.Rlopen)
        return r.qid, r.iounit

    async def lcreate(self, fid: int, name: str, flags: int, mode: int, gid: int = 0) -> tuple[Qid, int]:
        r = await self.call(m.Tlcreate(fid, name, flags, mode, gid), m.Rlcreate)
        return r.qid, r.iounit

    def max_io(self) -> int:
        return self.msize - READ_HEADER - 13

    async def read(self, fid: int, offset: int, count: int) -> bytes:
        r = await self.call(m.Tread(fid, offset, min(count, self.msize - READ_HEADER)), m.Rread)
        return bytes(r.data)

    async def read_all(self, fid: int, offset: int = 0, count: int | None = None) -> bytes:
        chunks = []
        while count is None or count > 0:
            want = self.max_io() if count is None else min(count, self.max_io())
            data = await self.read(fid, offset, want)
            if not data:
                break
            chunks.append(data)
            offset += len(data)
            if count is not None:
                count -= len(data)
        return b"".join(chunks)

    async def write(self, fid: int, offset: int, data: bytes | memoryview) -> int:
        r = await self.call(m.Twrite(fid, offset, data), m.Rwrite)
        return r.count

    async def write_all(self, fid: int, offset: int, data: bytes | memoryview) -> int:
        view, done = memoryview(data), 0
        chunk = self.msize - IOHDRSZ  # as Linux does; diod refuses a Twrite filling msize exactly
        while done < len(view):
            n = await self.write(fid, offset + done, view[done:done + chunk])
            if n <= 0:
                raise ClientError(_errno.EIO, "short write")
            done += n
        return done

    async def getattr(self, fid: int, mask: int = GETATTR_ALL) -> m.Rgetattr:
        return await self.call(m.Tgetattr(fid, mask), m.Rgetattr)

    async def setattr(self, fid: int, valid: int, *, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                      atime: tuple[int, int] = (0, 0), mtime: tuple[int, int] = (0, 0)) -> None:
        await self.call(m.Tsetattr(fid, valid, mode, uid, gid, size, atime[0], atime[1], mtime[0], mtime[1]), m.Rsetattr)

    async def readdir(self, fid: int, offset: int = 0, count: int | None = None) -> list[tuple[Qid, int, int, str]]:
        # msize - IOHDRSZ as Linux asks: diod refuses counts above that.
        r = await self.call(m.Treaddir(fid, offset, count or self.msize - IOHDRSZ), m.Rreaddir)
        return unpack_dirents(r.data)

    async def readdir_all(self, fid: int) -> list[tuple[Qid, int, int, str]]:
        out: list[tuple[Qid, int, int, str]] = []
        offset = 0
        while True:
            batch = await self.readdir(fid, offset)
            if not batch:
                return out
            out += batch
            offset = batch[-1][1]

    async def mkdir(self, dfid: int, name: str, mode: int = 0o755, gid: int = 0) -> Qid:
        return (await self.call(m.Tmkdir(dfid, name, mode, gid), m.Rmkdir)).qid

    async def symlink(self, dfid: int, name: str, target: str, gid: int = 0) -> Qid:
        return (await self.call(m.Tsymlink(dfid, name, target, gid), m.Rsymlink)).qid

    async def mknod(self, dfid: int, name: str, mode: int, major: int = 0, minor: int = 0, gid: int = 0) -> Qid:
        return (await self.call(m.Tmknod(dfid, name, mode, major, minor, gid), m.Rmknod)).qid

    async def readlink(self, fid: int) -> str:
        return (await self.call(m.Treadlink(fid), m.Rreadlink)).target

    async def link(self, dfid: int, fid: int, name: str) -> None:
        await self.call(m.Tlink(dfid, fid, name), m.Rlink)

    async def rename(self, fid: int, dfid: int, name: str) -> None:
        await self.call(m.Trename(fid, dfid, name), m.Rrename)

    async def renameat(self, olddir: int, oldname: str, newdir: int, newname: str) -> None:
        await self.call(m.Trenameat(olddir, oldname, newdir, newname), m.Rrenameat)

    async def unlinkat(self, dfid: int, name: str, flags: int = 0) -> None:
        await self.call(m.Tunlinkat(dfid, name, flags), m.Runlinkat)

    async def statfs(self, fid: int) -> m.Rstatfs:
        return await self.call(m.Tstatfs(fid), m.Rstatfs)

    async def fsync(self, fid: int, datasync: bool = False) -> None:
        await self.call(m.Tfsync(fid, int(datasync)), m.Rfsync)

    async def lock(self, fid: int, type: int, start: int = 0, length: int = 0, *, flags: int = 0,
                   proc_id: int = 1, client_id: str = "ninep") -> int:
        return (await self.call(m.Tlock(fid, type, flags, start, length, proc_id, client_id), m.Rlock)).status

    async def getlock(self, fid: int, type: int, start: int = 0, length: int = 0, *, proc_id: int = 1,
                      client_id: str = "ninep") -> m.Rgetlock:
        return await self.call(m.Tgetlock(fid, type, start, length, proc_id, client_id), m.Rgetlock)

    async def xattr_get(self, fid: int, name: str) -> bytes:
        """Value of xattr `name` ("" lists names, NUL-separated)."""
        xfid = self.new_fid()
        r = await self.call(m.Txattrwalk(fid, xfid, name), m.Rxattrwalk)
        try:
            return await self.read_all(xfid, 0, r.size) if r.size else b""
        finally:
            await self.clunk(xfid)

    async def xattr_list(self, fid: int) -> list[str]:
        raw = await self.xattr_get(fid, "")
        return [n.decode() for n in raw.split(b"\0") if n]

    async def xattr_set(self, fid: int, name: str, value: bytes, flags: int = 0) -> None:
        xfid, _ = await self.walk(fid, [])
        try:
            await self.call(m.Txattrcreate(xfid, name, len(value), flags), m.Rxattrcreate)
            if value:
                await self.write_all(xfid, 0, value)
        finally:
            await self.clunk(xfid)

    # --- 9P2000 / .u operations -------------------------------------------------------------------

    async def open(self, fid: int, mode: int) -> tuple[Qid, int]:
        r = await self.call(m.Topen(fid, mode), m.Ropen)
        return r.qid, r.iounit

    async def create(self, fid: int, name: str, perm: int, mode: int, extension: str = "") -> tuple[Qid, int]:
        r = await self.call(m.Tcreate(fid, name, perm, mode, extension), m.Rcreate)
        return r.qid, r.iounit

    async def stat(self, fid: int) -> m.Stat:
        return (await self.call(m.Tstat(fid), m.Rstat)).stat

    async def wstat(self, fid: int, stat: m.Stat) -> None:
        await self.call(m.Twstat(fid, stat), m.Rwstat)

    async def read_dir_stats(self, fid: int) -> list[m.Stat]:
        out: list[m.Stat] = []
        offset = 0
        while True:
            data = await self.read(fid, offset, self.msize - READ_HEADER)
            if not data:
                return out
            out += self.codec.decode_stats(data)
            offset += len(data)

    # --- file-like convenience --------------------------------------------------------------------

    async def open_file(self, root: int, path: str, flags: int = L_O_RDONLY, mode: int = 0o644) -> RemoteFile:
        """Opens (or with L_O_CREAT creates) `path` below fid `root` (9P2000.L)."""
        parts = [p for p in path.split("/") if p]
        if flags & L_O_CREAT:
            dfid, _ = await self.walk(root, parts[:-1])
            try:
                fid, _ = await self.walk(dfid, parts[-1:])
            except ClientError as e:
                if e.errno != _errno.ENOENT:
                    raise
                qid, iounit = await self.lcreate(dfid, parts[-1], flags & ~L_O_CREAT, mode)
                return RemoteFile(self, dfid, qid, iounit)
            await self.clunk(dfid)
        else:
            fid, _ = await self.walk(root, parts)
        try:
            qid, iounit = await self.lopen(fid, flags & ~L_O_CREAT)
        except BaseException:
            await self.clunk(fid)
            raise
        return RemoteFile(self, fid, qid, iounit)

    async def read_file(self, root: int, path: str) -> bytes:
        async with await self.open_file(root, path) as f:
            return await f.read()

    async def write_file(self, root: int, path: str, data: bytes, mode: int = 0o644) -> None:
        from ninep.protocol.numbers import L_O_TRUNC

        async with await self.open_file(root, path, L_O_WRONLY | L_O_CREAT | L_O_TRUNC, mode) as f:
            await f.write(data)


class RemoteFile:
    """An open file on the server, read and written with a position like a Python file."""

    def __init__(self, client: Client, fid: int, qid: Qid, iounit: int) -> None:
        self.client, self.fid, self.qid, self.iounit = client, fid, qid, iounit
        self.pos = 0

    async def read(self, count: int | None = None) -> bytes:
        data = await self.client.read_all(self.fid, self.pos, count)
        self.pos += len(data)
        return data

    async def write(self, data: bytes | memoryview) -> int:
        n = await self.client.write_all(self.fid, self.pos, data)
        self.pos += n
        return n

    def seek(self, pos: int) -> None:
        self.pos = pos

    async def stat(self) -> m.Rgetattr:
        return await self.client.getattr(self.fid)

    async def close(self) -> None:
        await self.client.clunk(self.fid)

    async def __aenter__(self) -> RemoteFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_dir(self) -> bool:
        return bool(self.qid.type & 0x80)


__all__ = ["Client", "ClientError", "RemoteFile", "V9P2000", "L_O_RDWR"]
