"""In-guest speed of trans=virtio: ninep's vhost-user back-end against QEMU's own virtio-9p server
(`-fsdev local`), both mounted in the same guest with the same msize and cache mode, one run.

Measures sequential 1 MiB write (into a new file, and over the same file again: no allocation)
and read MB/s, 4 KiB random-read IOPS and create/stat/unlink
ops/s on each mount. Each server's new file replaces its own file of the previous rep right before
the write: on these VMs free memory is handed back to the hypervisor within seconds (free page
reporting), and a page it has to fault back in makes the write ~10x slower (~2,500 against ~250
µs/MiB, host pwritev of new files, measured in pairs: the second writer after a removal was the
slow one in 5 pairs of 6). Removing both files at the end of a rep handed the pages just freed to
whichever server wrote first in the next rep, so the order weighed on that number. Under TCG (no usable KVM here) the guest's own cost dominates, so compare
the two columns with each other, not with host numbers.

    PYTHONPATH=. python bench/virtio_guest.py [--size-mb 64] [--files 300] [--reps 3] [--pyspy OUT]

Needs the guest harness (tests/guest) and sid's QEMU (tests/transports/virtio/sidqemu.py, downloaded into
the cache on first use). This script must never run as part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOB = r"""
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.1f", n / (b - a) }'; }
# Marks in ninep's export let the host read the server's CPU time at each phase boundary.
mark() { if [ "$name" = ninep ]; then : > $M/.mark-$1-$rep; fi; }
one() {  # one() NAME MOUNT METRIC
	name=$1; M=$2
	case $3 in
	seq_write_MBps) rm -f $M/seq; mark b-$3; t0=$(t9tool now); dd if=/dev/zero of=$M/seq bs=1M count=$SIZE_MB 2>/dev/null; t1=$(t9tool now); mark e-$3; n=$SIZE_MB;;
	seq_overwrite_MBps) mark b-$3; t0=$(t9tool now); dd if=/dev/zero of=$M/seq bs=1M count=$SIZE_MB conv=notrunc 2>/dev/null; t1=$(t9tool now); mark e-$3; n=$SIZE_MB;;
	seq_read_MBps) mark b-$3; t0=$(t9tool now); dd if=$M/seq of=/dev/null bs=1M 2>/dev/null; t1=$(t9tool now); mark e-$3; n=$SIZE_MB;;
	randread_4k_iops) mark b-$3; t0=$(t9tool now); t9tool randread $M/seq $READS 4096; t1=$(t9tool now); mark e-$3; n=$READS;;
	*_per_s) op=${3%_per_s}; mkdir -p $M/meta
		mark b-$3; t0=$(t9tool now); t9tool many $op $M/meta $FILES; t1=$(t9tool now); mark e-$3; n=$FILES;;
	esac
	echo "info bench $name $3 $(rate $n $t0 $t1)"
}
for rep in $(seq $REPS); do
	# Each metric on both servers back to back, the order alternating, so load drifts hit both.
	for metric in $METRICS; do
		if [ $((rep % 2)) = 1 ]; then one ninep /mnt $metric; one qemu /mnt2 $metric
		else one qemu /mnt2 $metric; one ninep /mnt $metric; fi
	done
	rm -rf /mnt/meta /mnt2/meta
	echo "info rep $rep done"
done
echo "ok bench"
"""

#: Metric groups `--only` selects; each in the order the job needs (reads need the written file,
#: stat and unlink the created files).
GROUPS = {"io": ["seq_write_MBps", "seq_overwrite_MBps", "seq_read_MBps", "randread_4k_iops"],
          "meta": ["create_per_s", "stat_per_s", "unlink_per_s"]}
GROUPS["all"] = GROUPS["io"] + GROUPS["meta"]
GROUPS["write"] = GROUPS["io"][:2]

#: Operations per phase, to turn a phase's server CPU time into CPU per operation.
UNITS = {"seq_write_MBps": "MiB", "seq_overwrite_MBps": "MiB", "seq_read_MBps": "MiB", "randread_4k_iops": "read",
         "create_per_s": "file", "stat_per_s": "file", "unlink_per_s": "file"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch_marks(export: Path, pid: int, stop: threading.Event, seen: list[tuple[str, float]]) -> None:
    """Records the server's CPU time when each phase mark appears in the export (polled)."""
    known: set[str] = set()
    while not stop.is_set():
        try:
            names = [n for n in os.listdir(export) if n.startswith(".mark-")]
            cpu = cpu_seconds(pid)
        except OSError:
            break
        for n in names:
            if n not in known:
                known.add(n)
                # Left in place: the guest walks to a file it just created (removing it races).
                seen.append((n[len(".mark-"):].rsplit("-", 1)[0], cpu))
        time.sleep(0.005)


def cpu_per_op(seen: list[tuple[str, float]], counts: dict[str, int]) -> dict[str, list[float]]:
    """Server CPU µs per operation of every ninep phase, from the begin/end marks."""
    out: dict[str, list[float]] = {}
    begin: dict[str, float] = {}
    for mark, cpu in seen:
        kind, metric = mark.split("-", 1)
        if kind == "b":
            begin[metric] = cpu
        elif metric in begin:
            out.setdefault(metric, []).append((cpu - begin.pop(metric)) * 1e6 / counts[metric])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--msize", type=int, default=512000)
    ap.add_argument("--model", default="passthrough")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--only", choices=sorted(GROUPS), default="all",
                    help="run one group of metrics (io: write, read, random read; meta: create, stat, unlink; "
                         "write: new-file write and overwrite)")
    ap.add_argument("--pyspy", type=Path, help="sample the server with py-spy into this raw file")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra `ninep serve` argument (repeatable), e.g. --server-arg=--inline-metadata")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from bench._common import RESULTS, machine, stamp, write_json
    guestvm = importlib.import_module("tests.guest.guestvm")  # the guest harness (tests/guest)
    from tests.kits.sidqemu import ensure_sid_qemu, qemu_command

    guestvm.ensure_host_tools()
    image = guestvm.build_image()
    qemu = qemu_command(ensure_sid_qemu())
    with tempfile.TemporaryDirectory(prefix="ninep-vbench-") as tmp_s:
        tmp = Path(tmp_s)
        ours, theirs = tmp / "ninep", tmp / "qemu"
        ours.mkdir()
        theirs.mkdir()
        sock = tmp / "vu.sock"
        log = tmp / "server.log"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        server = subprocess.Popen(
            [sys.executable, "-m", "ninep", "serve", str(ours), "--listen", f"vhost-user:{sock}", "--tag", "vt0",
             "--security-model", args.model, "--msize", str(args.msize), *args.server_arg],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        stop = threading.Event()
        seen: list[tuple[str, float]] = []
        spy = None
        try:
            while not sock.exists():
                if server.poll() is not None:
                    raise SystemExit(log.read_text())
                time.sleep(0.05)
            watcher = threading.Thread(target=watch_marks, args=(ours, server.pid, stop, seen), daemon=True)
            watcher.start()
            if args.pyspy:
                pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen([pyspy, "record", "-p", str(server.pid), "-f", "raw", "-r", "1000",
                                        "-o", str(args.pyspy), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            setup = guestvm.vhost_user_9p("virtio-bench", [sock], ["vt0"], qemu, msize=args.msize)
            setup.devices += [
                "-fsdev", f"local,id=q0,path={theirs},security_model={args.model}",
                "-device", "virtio-9p-pci,fsdev=q0,mount_tag=q0",
            ]
            opts = f"trans=virtio,version=9p2000.L,msize={args.msize},cache=none"
            setup.mounts.append(guestvm.Mount("virtio", "q0", "/mnt2", opts))
            env_vars = {"SIZE_MB": str(args.size_mb), "READS": str(args.reads), "FILES": str(args.files),
                        "REPS": str(args.reps), "METRICS": " ".join(GROUPS[args.only])}
            run = guestvm.run_job(image, setup, JOB, env_vars, timeout=1800 * args.reps)
        finally:
            stop.set()
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            server.terminate()
            server.wait(10)
            server_log = log.read_text(errors="replace")
    if run.fails or run.rc != 0:
        raise SystemExit(f"guest job failed: {run.fails}\n{run.console_tail()}\nserver log tail:\n{server_log[-3000:]}")
    # What the server said beyond the routine (a backed-off inline call, a broken queue, errors).
    for line in server_log.splitlines():
        if " WARNING " in line or " ERROR " in line or "blocked the event loop" in line:
            print("server:", line)
    samples: dict[str, dict[str, list[float]]] = {}
    for line in run.lines:
        parts = line.split()
        if parts[:2] == ["info", "bench"]:
            samples.setdefault(parts[3], {}).setdefault(parts[2], []).append(float(parts[4]))
    counts = {"seq_write_MBps": args.size_mb, "seq_overwrite_MBps": args.size_mb, "seq_read_MBps": args.size_mb,
              "randread_4k_iops": args.reads}
    counts |= {m: args.files for m in ("create_per_s", "stat_per_s", "unlink_per_s")}
    cpu = cpu_per_op(seen, counts)
    print(f"accel {run.accel}, msize {args.msize}, cache=none, model {args.model}, {args.reps} reps (medians), "
          f"server args {args.server_arg}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'metric':20s} {'ninep':>9s} {'qemu':>9s} {'ratio':>6s}  {'ninep server CPU/op':>20s}")
    table: dict[str, dict[str, object]] = {}
    for metric, row in samples.items():
        ours_m = statistics.median(row.get("ninep", [0.0]))
        theirs_m = statistics.median(row.get("qemu", [0.0]))
        ratio = ours_m / theirs_m if theirs_m else float("nan")
        us = statistics.median(cpu[metric]) if cpu.get(metric) else float("nan")
        print(f"{metric:20s} {ours_m:9.1f} {theirs_m:9.1f} {ratio:6.2f}  {us:13.0f} µs/{UNITS[metric]}")
        table[metric] = {"ninep": row.get("ninep", []), "qemu": row.get("qemu", []), "ratio_of_medians": ratio,
                         "ninep_server_cpu_us_per_op": cpu.get(metric, [])}
    if not args.no_save:
        out = write_json(RESULTS / f"virtio-guest-{stamp()}.json", {
            "what": "in-guest trans=virtio: ninep vhost-user back-end vs QEMU -fsdev local (virtio-9p-pci)",
            "server_args": args.server_arg, "accel": run.accel, "msize": args.msize, "model": args.model, "size_mb": args.size_mb,
            "reads": args.reads, "files": args.files, "reps": args.reps, "machine": machine(), "metrics": table,
        })
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
