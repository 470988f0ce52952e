"""The benchmark workloads, once for 9P servers (through ninep's own client) and once for the raw
host directory (os.* calls in threads), and the worker that runs one measurement cell.

A cell is (target, workload, depth): `depth` requests in flight — that many tasks on one
connection, each issuing its requests one after the other — for `duration` seconds, in `procs`
worker processes (each with depth/procs tasks) so the client can be spread over cores. Workers are
forked; each reports operations, bytes, wall time and its own CPU time for the timed part only.

The data set every workload expects in the export (made by `populate_host` or `populate_9p`):
  meta.txt       a small file (metadata round trip)
  dir10k/        N empty files (readdir)
  big.bin        a file of `big_size` bytes (random and sequential reads)
  wbig.bin       a file sequential writes overwrite
  cw/            where create+write+close makes files and unlink removes them

This module must never start servers or print reports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from bench._servers import Target

KiB, MiB = 1024, 1024 * 1024
ROOT = 1  # the attach fid on every connection


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str  # throughput unit of the headline number
    depths: tuple[int, ...] = (1, 8, 32)
    msize: int = 512 * KiB
    connections: str = "one"  # "one" | "per_task" (depth = connections) | "64"
    raw: str | None = None  # the raw workload this one is compared with (None: no raw baseline)
    pairs_with: str | None = None  # create is always followed by unlink of what it made
    in_full_run: bool = True  # False: only with --only (bench/roundtrip.py uses it)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("version_attach", "Tversion+Tattach (session setup on an open connection)", "ops/s",
             connections="per_task"),
    Workload("getattr", "Tgetattr of an open fid (one round trip)", "ops/s", raw="getattr", in_full_run=False),
    Workload("metadata", "Twalk+Tgetattr+Tclunk of an existing file", "ops/s", raw="metadata"),
    Workload("create", "walk+Tlcreate+Twrite 4 KiB+Tclunk (create, write, close)", "ops/s", raw="create",
             pairs_with="unlink"),
    Workload("unlink", "Tunlinkat of the files create made", "ops/s", raw="unlink"),
    Workload("readdir", "walk+Tlopen+Treaddir of a 10 000-entry directory+Tclunk", "entries/s", depths=(1, 8),
             raw="readdir"),
    Workload("randread", "4 KiB Tread at random offsets", "MiB/s", raw="randread"),
    Workload("seqread-512k", "1 MiB sequential Tread, msize 512 KiB", "MiB/s", msize=512 * KiB, raw="seqread"),
    Workload("seqread-1m", "1 MiB sequential Tread, msize 1 MiB", "MiB/s", msize=MiB + 4 * KiB, raw="seqread"),
    Workload("seqwrite-512k", "1 MiB sequential Twrite, msize 512 KiB", "MiB/s", msize=512 * KiB, raw="seqwrite"),
    Workload("seqwrite-1m", "1 MiB sequential Twrite, msize 1 MiB", "MiB/s", msize=MiB + 4 * KiB, raw="seqwrite"),
    Workload("conn64", "64 connections, each Twalk+Tgetattr+Tclunk one at a time", "ops/s", depths=(64,),
             connections="64", raw="metadata"),
]}
#: The workloads the raw baseline runs, keyed by Workload.raw.
RAW_WORKLOADS = ("getattr", "metadata", "create", "unlink", "readdir", "randread", "seqread", "seqwrite")
#: Extra step of a full run: server RSS with many fids and connections (issue 8's memory target).
RSS_CONNECTIONS, RSS_FIDS = 256, 10_000


@dataclass
class Cell:
    target: Target
    workload: str
    depth: int
    procs: int = 1
    proc_index: int = 0
    duration: float = 0.3
    cell_id: str = "c"
    big_size: int = 64 * MiB
    dir_entries: int = 10_000
    profile: str = ""  # write a cProfile of this worker here
    reps: int = 1  # timed repetitions, on the same connections
    then: str = ""  # a second workload timed after each repetition (unlink after create)

    def phases(self) -> list[str]:
        return [self.workload, self.then] if self.then else [self.workload]


@dataclass
class Counters:
    ops: int = 0
    nbytes: int = 0
    errors: int = 0
    first_error: str = ""


# --- data set --------------------------------------------------------------------------------


def populate_host(export: str, big_size: int, dir_entries: int) -> None:
    os.makedirs(os.path.join(export, "dir10k"), exist_ok=True)
    os.makedirs(os.path.join(export, "cw"), exist_ok=True)
    with open(os.path.join(export, "meta.txt"), "wb") as f:
        f.write(b"metadata round trip\n")
    d = os.path.join(export, "dir10k")
    for i in range(dir_entries):
        fd = os.open(os.path.join(d, f"entry-{i:05d}"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    chunk = bytes(random.Random(1).randbytes(MiB))
    for name, size in (("big.bin", big_size), ("wbig.bin", big_size)):
        with open(os.path.join(export, name), "wb") as f:
            for _ in range(size // MiB):
                f.write(chunk)


async def populate_9p(target: Target, big_size: int, dir_entries: int) -> None:
    """The same data set made through 9P (a ninep server with the in-memory backend)."""
    import trio

    from ninep.protocol import messages as m
    from ninep.protocol.numbers import L_O_WRONLY

    async with _connect(target, 512 * KiB) as c:
        await _attach(c, target)
        for d in ("dir10k", "cw"):
            with contextlib.suppress(OSError):
                await c.mkdir(ROOT, d)
        chunk = random.Random(1).randbytes(MiB)
        for name, size in (("meta.txt", 0), ("big.bin", big_size), ("wbig.bin", big_size)):
            fid = 10
            await c.rpc(m.Twalk(ROOT, fid, []))
            await c.rpc(m.Tlcreate(fid, name, L_O_WRONLY, 0o644, 0))
            if name == "meta.txt":
                await c.rpc(m.Twrite(fid, 0, b"metadata round trip\n"))
            off = 0
            while off < size:
                r = await c.rpc(m.Twrite(fid, off, memoryview(chunk)[: c.msize - 24]))
                off += r.count
            await c.rpc(m.Tclunk(fid))
        dfid = 11
        await c.rpc(m.Twalk(ROOT, dfid, ["dir10k"]))
        todo = iter(range(dir_entries))

        async def maker(fid: int) -> None:
            for i in todo:
                await c.rpc(m.Twalk(dfid, fid, []))
                await c.rpc(m.Tlcreate(fid, f"entry-{i:05d}", L_O_WRONLY, 0o644, 0))
                await c.rpc(m.Tclunk(fid))

        async with trio.open_nursery() as n:
            for k in range(32):
                n.start_soon(maker, 100 + k)
        await c.rpc(m.Tclunk(dfid))


# --- 9P side -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connect(target: Target, msize: int) -> AsyncIterator[Any]:
    from ninep.client import Client
    from transports.address import connect_address
    from transports.options import ConnectOptions
    from transports.stream import FdPairChannel

    if target.transport == "fd":
        channel: Any = FdPairChannel(target.fd, target.fd)
    else:
        channel = await connect_address(target.address, ConnectOptions(max_msize=max(msize, 8192)))
    async with Client.connect(channel, msize=msize) as c:
        yield c


async def _attach(c: Any, target: Target) -> None:
    from ninep.protocol import messages as m
    from ninep.protocol.numbers import NOFID

    await c.rpc(m.Tattach(ROOT, NOFID, "root", target.aname, 0))


async def _walk_fresh(c: Any, fid: int, newfid: int, names: list[str]) -> None:
    """Twalk to `newfid`, clunking it first: setups repeat on one connection (one per repetition)."""
    from ninep.protocol import messages as m

    with contextlib.suppress(OSError):
        await c.rpc(m.Tclunk(newfid))
    await c.rpc(m.Twalk(fid, newfid, names))


TaskFn = Callable[[Any, int, float, Counters], Awaitable[None]]


async def _setup_9p(cell: Cell, clients: list[Any]) -> tuple[TaskFn, list[tuple[Any, int]]]:
    """The task function of the cell's workload and its (client, task index) pairs; opens what the
    tasks need (untimed)."""
    from ninep.protocol import messages as m
    from ninep.protocol.codec import unpack_dirents
    from ninep.protocol.numbers import GETATTR_BASIC, IOHDRSZ, L_O_RDONLY, L_O_WRONLY, NOFID

    wl = WORKLOADS[cell.workload]
    ntasks = max(1, cell.depth // cell.procs) if wl.connections == "one" else 1
    slots = [(c, i) for c in clients for i in range(ntasks)]
    perf = time.perf_counter

    def fid_of(i: int) -> int:
        return 100 + 8 * i

    if cell.workload == "version_attach":
        async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
            while perf() < deadline:
                await c.version(c.msize, "9P2000.L")
                await c.rpc(m.Tattach(ROOT, NOFID, "root", cell.target.aname, 0))
                k.ops += 1
        return task, slots

    if cell.workload == "getattr":
        for c, i in slots:
            await _walk_fresh(c, ROOT, fid_of(i), ["meta.txt"])

        async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
            fid = fid_of(i)
            while perf() < deadline:
                await c.rpc(m.Tgetattr(fid, GETATTR_BASIC))
                k.ops += 1
        return task, slots

    if cell.workload in ("metadata", "conn64"):
        names = ["meta.txt"]

        async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
            fid = fid_of(i)
            while perf() < deadline:
                await c.rpc(m.Twalk(ROOT, fid, names))
                await c.rpc(m.Tgetattr(fid, GETATTR_BASIC))
                await c.rpc(m.Tclunk(fid))
                k.ops += 1
        return task, slots

    if cell.workload in ("create", "unlink"):
        cw = 7
        for c in clients:
            await _walk_fresh(c, ROOT, cw, ["cw"])
        if cell.workload == "create":
            payload = b"x" * 4096

            async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
                fid, n = fid_of(i), 0
                while perf() < deadline:
                    await c.rpc(m.Twalk(cw, fid, []))
                    await c.rpc(m.Tlcreate(fid, f"{cell.cell_id}-{cell.proc_index}-{i}-{n}", L_O_WRONLY, 0o644, 0))
                    await c.rpc(m.Twrite(fid, 0, payload))
                    await c.rpc(m.Tclunk(fid))
                    n += 1
                    k.ops += 1
            return task, slots
        # unlink: list cw (untimed), share its files out between processes and tasks
        c0 = clients[0]
        await _walk_fresh(c0, cw, 8, [])
        await c0.rpc(m.Tlopen(8, L_O_RDONLY))
        names, off = [], 0
        while True:
            r = await c0.rpc(m.Treaddir(8, off, c0.msize - IOHDRSZ))
            ents = unpack_dirents(r.data)
            if not ents:
                break
            names += [e[3] for e in ents if e[3] not in (".", "..")]
            off = ents[-1][1]
        await c0.rpc(m.Tclunk(8))
        names.sort()
        mine = names[cell.proc_index::cell.procs]
        shares = [mine[j::len(slots)] for j in range(len(slots))]

        use_remove: set[int] = set()

        async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
            fid = fid_of(i)
            for name in shares[i]:
                if perf() >= deadline:
                    break
                if id(c) not in use_remove:
                    try:
                        await c.rpc(m.Tunlinkat(cw, name, 0))
                        k.ops += 1
                        continue
                    except OSError as e:
                        if e.errno != errno.EOPNOTSUPP:
                            raise
                        # Like Linux: a server without Tunlinkat (diod 1.0.24) gets walk + Tremove.
                        use_remove.add(id(c))
                await c.rpc(m.Twalk(cw, fid, [name]))
                await c.rpc(m.Tremove(fid))
                k.ops += 1
        return task, slots

    if cell.workload == "readdir":
        dfid = 7
        for c in clients:
            await _walk_fresh(c, ROOT, dfid, ["dir10k"])

        async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
            fid = fid_of(i)
            count = c.msize - IOHDRSZ  # what Linux asks; diod refuses more (EIO)
            while perf() < deadline:
                await c.rpc(m.Twalk(dfid, fid, []))
                await c.rpc(m.Tlopen(fid, L_O_RDONLY))
                off = 0
                while True:
                    r = await c.rpc(m.Treaddir(fid, off, count))
                    ents = unpack_dirents(r.data)
                    if not ents:
                        break
                    k.ops += len(ents)
                    k.nbytes += len(r.data)
                    off = ents[-1][1]
                await c.rpc(m.Tclunk(fid))
        return task, slots

    # reads and writes: every task opens its own fid on the file
    write = cell.workload.startswith("seqwrite")
    fname = "wbig.bin" if write else "big.bin"
    for c, i in slots:
        await _walk_fresh(c, ROOT, fid_of(i), [fname])
        await c.rpc(m.Tlopen(fid_of(i), L_O_WRONLY if write else L_O_RDONLY))

    if cell.workload == "randread":
        blocks = cell.big_size // 4096

        async def task(c: Any, i: int, deadline: float, k: Counters) -> None:
            fid, rnd = fid_of(i), random.Random(i * 7919 + cell.proc_index)
            while perf() < deadline:
                r = await c.rpc(m.Tread(fid, rnd.randrange(blocks) * 4096, 4096))
                k.nbytes += len(r.data)
                k.ops += 1
        return task, slots

    # sequential: the tasks of a connection share one advancing offset, like readahead does
    state = {id(c): 0 for c in clients}
    zeros = memoryview(bytes(MiB))

    async def seq_task(c: Any, i: int, deadline: float, k: Counters) -> None:
        fid = fid_of(i)
        chunk = min(MiB, c.msize - 24)  # IOHDRSZ: what Linux and diod leave for the header
        limit = cell.big_size - cell.big_size % chunk
        key = id(c)
        while perf() < deadline:
            off = state[key]
            state[key] = off + chunk if off + chunk < limit else 0
            if write:
                r = await c.rpc(m.Twrite(fid, off, zeros[:chunk]))
                k.nbytes += r.count
            else:
                r = await c.rpc(m.Tread(fid, off, chunk))
                k.nbytes += len(r.data)
            k.ops += 1
    return seq_task, slots


async def run_9p_cell(cell: Cell, start: Callable[[], None], report: Callable[[dict[str, Any]], None]) -> None:
    import trio

    wl = WORKLOADS[cell.workload]
    if wl.connections == "per_task":
        nconn = max(1, cell.depth // cell.procs)
    elif wl.connections == "64":
        nconn = max(1, 64 // cell.procs)
    else:
        nconn = 1
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for _ in range(nconn):
            c = await stack.enter_async_context(_connect(cell.target, wl.msize))
            await _attach(c, cell.target)
            clients.append(c)
        for rep in range(cell.reps):
            for k, phase in enumerate(cell.phases()):
                if k:
                    start()  # everyone is done with the previous phase (unlink lists what create made)
                pcell = replace(cell, workload=phase, cell_id=f"{cell.cell_id}r{rep}")
                task, slots = await _setup_9p(pcell, clients)
                counters = [Counters() for _ in slots]
                start()
                ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                deadline = t0 + cell.duration

                async def guarded(c: Any, i: int, k: Counters, task: TaskFn = task, deadline: float = deadline) -> None:
                    try:
                        await task(c, i, deadline, k)
                    except OSError as e:
                        k.errors += 1
                        k.first_error = k.first_error or f"{type(e).__name__}: {e}"

                async with trio.open_nursery() as n:
                    for (c, i), kk in zip(slots, counters, strict=True):
                        n.start_soon(guarded, c, i, kk)
                t1, ru1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                report(_result(pcell, counters, t1 - t0, ru0, ru1, msize=clients[0].msize))


def _result(cell: Cell, counters: list[Counters], wall: float, ru0: Any, ru1: Any, msize: int = 0) -> dict[str, Any]:
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "ops": sum(k.ops for k in counters), "bytes": sum(k.nbytes for k in counters), "wall": wall, "cpu": cpu,
        "errors": sum(k.errors for k in counters),
        "first_error": next((k.first_error for k in counters if k.first_error), ""), "msize": msize,
    }


# --- raw side ----------------------------------------------------------------------------------


def run_raw_cell(cell: Cell, start: Callable[[], None], report: Callable[[dict[str, Any]], None]) -> None:
    for rep in range(cell.reps):
        for k, phase in enumerate(cell.phases()):
            if k:
                start()
            _raw_phase(replace(cell, workload=phase, cell_id=f"{cell.cell_id}r{rep}"), start, report)


def _raw_phase(cell: Cell, start: Callable[[], None], report: Callable[[dict[str, Any]], None]) -> None:
    wl = WORKLOADS[cell.workload]
    kind = wl.raw
    ex = cell.target.export
    nthreads = max(1, cell.depth // cell.procs)
    perf = time.perf_counter
    fds: list[int] = []
    meta = os.path.join(ex, "meta.txt")
    cw = os.path.join(ex, "cw")
    shares: list[list[str]] = []
    if kind == "unlink":
        names = sorted(os.listdir(cw))[cell.proc_index::cell.procs]
        shares = [names[j::nthreads] for j in range(nthreads)]
    if kind in ("randread", "seqread", "seqwrite"):
        path = os.path.join(ex, "wbig.bin" if kind == "seqwrite" else "big.bin")
        fds = [os.open(path, os.O_WRONLY if kind == "seqwrite" else os.O_RDONLY) for _ in range(nthreads)]
    lock = threading.Lock()
    shared = {"off": 0}
    limit = cell.big_size - cell.big_size % MiB

    def next_off() -> int:
        with lock:
            off = shared["off"]
            shared["off"] = off + MiB if off + MiB < limit else 0
            return off

    def body(i: int, deadline: float, k: Counters) -> None:
        if kind == "getattr":
            fd = os.open(meta, os.O_PATH | os.O_NOFOLLOW)
            while perf() < deadline:
                os.fstat(fd)
                k.ops += 1
            os.close(fd)
        elif kind == "metadata":
            while perf() < deadline:
                fd = os.open(meta, os.O_PATH | os.O_NOFOLLOW)
                os.fstat(fd)
                os.close(fd)
                k.ops += 1
        elif kind == "create":
            data, n = b"x" * 4096, 0
            while perf() < deadline:
                fd = os.open(os.path.join(cw, f"{cell.cell_id}-{cell.proc_index}-{i}-{n}"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.close(fd)
                n += 1
                k.ops += 1
        elif kind == "unlink":
            for name in shares[i]:
                if perf() >= deadline:
                    break
                os.unlink(os.path.join(cw, name))
                k.ops += 1
        elif kind == "readdir":
            d = os.path.join(ex, "dir10k")
            while perf() < deadline:
                with os.scandir(d) as it:
                    for _ in it:
                        k.ops += 1
                k.ops += 2  # "." and "..", which scandir leaves out and 9P returns
        elif kind == "randread":
            rnd, blocks = random.Random(i), cell.big_size // 4096
            while perf() < deadline:
                k.nbytes += len(os.pread(fds[i], 4096, rnd.randrange(blocks) * 4096))
                k.ops += 1
        elif kind == "seqread":
            buf = bytearray(MiB)
            while perf() < deadline:
                k.nbytes += os.preadv(fds[i], [buf], next_off())
                k.ops += 1
        elif kind == "seqwrite":
            data = bytes(MiB)
            while perf() < deadline:
                k.nbytes += os.pwrite(fds[i], data, next_off())
                k.ops += 1

    counters = [Counters() for _ in range(nthreads)]
    start()
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), perf()
    deadline = t0 + cell.duration

    def guarded(i: int) -> None:
        try:
            body(i, deadline, counters[i])
        except OSError as e:
            counters[i].errors += 1
            counters[i].first_error = counters[i].first_error or f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1, ru1 = perf(), resource.getrusage(resource.RUSAGE_SELF)
    for fd in fds:
        os.close(fd)
    report(_result(cell, counters, t1 - t0, ru0, ru1))


# --- worker process --------------------------------------------------------------------------


@dataclass
class WorkerLink:
    """What a forked worker uses to line up with the others and hand back its numbers."""

    barrier: Any
    queue: Any
    reported: list[bool] = field(default_factory=lambda: [False])


def worker_main(cell: Cell, link: WorkerLink) -> None:
    """Entry point of a forked worker process."""
    prof = None
    if cell.profile:
        import cProfile

        # CPU time, not wall time: waiting, and preemption on a busy machine, are not charged.
        prof = cProfile.Profile(time.thread_time)

    def start() -> None:
        link.barrier.wait(timeout=90)
        if prof is not None:
            prof.enable()

    def report(res: dict[str, Any]) -> None:
        if prof is not None:
            prof.disable()
            prof.dump_stats(cell.profile)
        link.reported[0] = True
        link.queue.put(res)

    try:
        if cell.target.kind == "raw":
            run_raw_cell(cell, start, report)
        else:
            import trio

            trio.run(run_9p_cell, cell, start, report)
    except BaseException as e:  # noqa: BLE001 - anything here is reported back, not raised
        with contextlib.suppress(Exception):
            link.barrier.abort()
        # The orchestrator may be waiting for the next repetition's numbers: always answer.
        link.queue.put({"error": f"{type(e).__name__}: {_flatten(e)}"})
    finally:
        # os._exit skips the queue's feeder thread: flush it first or the result is lost.
        with contextlib.suppress(Exception):
            link.queue.close()
            link.queue.join_thread()
        os._exit(0)


def _flatten(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_flatten(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}"


async def rss_hold(target: Target, start: Callable[[], None], done: Any, dir_entries: int) -> dict[str, Any]:
    """Opens RSS_CONNECTIONS connections holding RSS_FIDS fids between them, signals `start`, and
    holds them until `done` (a multiprocessing Event) is set."""
    import trio

    from ninep.protocol import messages as m

    per = -(-RSS_FIDS // RSS_CONNECTIONS)
    opened = 0
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(RSS_CONNECTIONS):
            c = await stack.enter_async_context(_connect(target, 64 * KiB))
            await _attach(c, target)
            for j in range(per):
                if opened >= RSS_FIDS:
                    break
                # distinct files, as a guest's dentry cache would hold them
                await c.rpc(m.Twalk(ROOT, 1000 + j, ["dir10k", f"entry-{opened % dir_entries:05d}"]))
                opened += 1
        start()
        while not done.is_set():
            await trio.sleep(0.05)
    return {"connections": RSS_CONNECTIONS, "fids": opened, "distinct_files": min(opened, dir_entries)}
