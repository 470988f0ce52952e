"""Timing workloads in a Linux guest against ninep and QEMU's own 9p server, in one run.

    python bench/guest.py [--size-mb 64] [--files 2000] [--model passthrough] [--vhost-user auto|yes|no]

Boots the test guest (tests/guest/guestvm.py) once per server, runs the same workloads on the
cache=none mount — sequential 1 MiB writes and reads (dd), 4 KiB random reads, create/stat/unlink
of N files, `ls -lR` of 5 000 entries — and prints each server's seconds and ninep's ratio to
QEMU's. ninep runs over trans=fd (virtio-serial port + guest relay) and, when sid's QEMU and the
compiled ring extension are available, also as a vhost-user virtio-9p device (trans=virtio, the
same guest transport as QEMU's server: the fair comparison). Under TCG (no usable KVM) the guest's emulation dominates: read the ratios, not the
absolute numbers, and compare servers with host-side protocol benchmarks. Writes a JSON result
under bench/results/. Never touches anything outside its temporary exports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.guest import guestvm  # noqa: E402

WORKLOADS = ("seq_write", "seq_read", "rand_read_4k", "create", "stat", "unlink", "ls_lR")

BENCH_SH = r"""
M=/mnt
B=$M/bench
mkdir -p $B/many
T=/tmp
t() {  # name command...
	name=$1; shift
	t0=$(t9tool now)
	if out=$("$@" 2>&1); then
		t1=$(t9tool now)
		echo "time $name $(echo "$t0 $t1" | awk '{printf "%.4f", $2 - $1}')"
	else
		echo "FAIL $name: $out"
	fi
}
if [ ! -d "$M/seed/tree" ]; then  # a memory: export has no host seed: make the tree here
	for d in $(seq 0 $((TREE_DIRS - 1))); do mkdir -p $M/seed/tree/d$d; t9tool many create $M/seed/tree/d$d $TREE_FILES; done
fi
sync
t seq_write dd if=/dev/zero of=$B/seq bs=1048576 count=$SIZE_MB conv=fsync
t seq_read dd if=$B/seq of=/dev/null bs=1048576
t rand_read_4k t9tool randread $B/seq $RAND_COUNT 4096
t create t9tool many create $B/many $FILES
t stat t9tool many stat $B/many $FILES
t unlink t9tool many unlink $B/many $FILES
t ls_lR sh -c "ls -lR $M/seed/tree > /dev/null"
rm -rf $B
"""


def parse_times(run: guestvm.GuestRun) -> dict[str, float]:
    out = {}
    for line in run.lines:
        parts = line.split()
        if parts[:1] == ["time"] and len(parts) == 3:
            out[parts[1]] = float(parts[2])
    return out


def qemu_version() -> str:
    try:
        return subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def vhost_user_qemu(mode: str) -> list[str] | None:
    """The argv prefix of a QEMU with vhost-user virtio-9p, or None (mode auto: when it can be had)."""
    if mode == "no":
        return None
    try:
        import transports.virtio  # noqa: F401  (needs the compiled extension; says how to build it)
        from tests.kits.sidqemu import ensure_sid_qemu, qemu_command

        return qemu_command(ensure_sid_qemu())
    except Exception as e:
        if mode == "yes":
            raise
        print(f"(no vhost-user run: {e})", file=sys.stderr)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=64, help="sequential file size (MiB)")
    ap.add_argument("--files", type=int, default=2000, help="files to create/stat/unlink")
    ap.add_argument("--rand", type=int, default=2000, help="number of 4 KiB random reads")
    ap.add_argument("--model", default="passthrough", help="security model for both servers")
    ap.add_argument("--msize", type=int, default=512000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--vhost-user", choices=("auto", "yes", "no"), default="auto",
                    help="also run ninep as a vhost-user device (needs sid's QEMU, downloaded on first use)")
    args = ap.parse_args()

    image = guestvm.build_image()
    accel = guestvm.detect_accel()
    tree_dirs, tree_files = 50, 100  # 5 000 entries for ls -lR
    env = {"SIZE_MB": str(args.size_mb), "FILES": str(args.files), "RAND_COUNT": str(args.rand),
           "TREE_DIRS": str(tree_dirs), "TREE_FILES": str(tree_files)}
    have_local = importlib.util.find_spec("fs_backends.local") is not None
    results: dict[str, dict[str, float]] = {}
    meta: dict[str, object] = {}
    servers = ["qemu", "ninep"]
    vhost_qemu = vhost_user_qemu(args.vhost_user) if have_local else None
    if vhost_qemu:
        servers.append("ninep-vhost")
    with tempfile.TemporaryDirectory(prefix="ninep-bench-guest-") as tmp_s:
        tmp = Path(tmp_s)
        for server in servers:
            export = tmp / f"export-{server}"
            export.mkdir()
            guestvm.seed_export(export, big=0, tree_dirs=tree_dirs, tree_files=tree_files)
            t0 = time.monotonic()
            if server == "qemu":
                setup = guestvm.qemu_local(export, args.model, args.msize)
                setup.mounts = setup.mounts[:1]
                run = guestvm.run_job(image, setup, BENCH_SH, env, timeout=args.timeout, accel=accel)
            elif server == "ninep-vhost":
                assert vhost_qemu is not None
                sock = tmp / "vhost.sock"
                with guestvm.ninep_server(ROOT, export, sock, args.model, args.msize,
                                          log=tmp / "vhost.log", python=sys.executable,
                                          listen=f"vhost-user:{sock}", extra=["--tag", "vt0"]):
                    setup = guestvm.vhost_user_9p("ninep-vhost", [sock], ["vt0"], vhost_qemu, args.msize)
                    run = guestvm.run_job(image, setup, BENCH_SH, env, timeout=args.timeout, accel=accel)
            else:
                sock = tmp / "ninep.sock"
                target = str(export) if have_local else "memory:"
                meta["ninep_export"] = "local" if have_local else "memory: (fs_backends.local absent)"
                with guestvm.ninep_server(ROOT, target, sock, args.model if have_local else None,
                                          args.msize, log=tmp / "server.log", python=sys.executable):
                    run = guestvm.run_job(image, guestvm.virtio_serial_fd("ninep", [sock], args.msize),
                                          BENCH_SH, env, timeout=args.timeout, accel=accel)
            if run.fails:
                print(f"{server}: FAIL lines:\n  " + "\n  ".join(run.fails), file=sys.stderr)
                return 1
            results[server] = parse_times(run)
            meta[f"{server}_boot_s"] = round(run.boot_seconds, 2)
            meta[f"{server}_wall_s"] = round(time.monotonic() - t0, 2)

    print(f"guest on {accel.name.upper()}" + (f" ({accel.why})" if accel.why else "")
          + f"; kernel {image.kernel_version}; {qemu_version()}")
    print("transports: qemu = virtio-9p-pci; ninep = trans=fd over a virtio-serial port and the "
          "guest relay (ratios include that path); ninep-vhost = virtio-9p via vhost-user, the "
          "same guest transport as qemu")
    if accel.name == "tcg":
        print("TCG: times are dominated by emulating the guest; compare the ratios only")
    ninep_runs = [s for s in servers if s != "qemu"]
    head = f"{'workload':<14}{'qemu s':>10}"
    for s_ in ninep_runs:
        head += f"{s_ + ' s':>15}{'ratio':>7}"
    print(head)
    ratios: dict[str, dict[str, float | None]] = {s_: {} for s_ in ninep_runs}
    nan = float("nan")
    for w in WORKLOADS:
        q = results["qemu"].get(w)
        row = f"{w:<14}{q if q is not None else nan:>10.3f}"
        for s_ in ninep_runs:
            n = results[s_].get(w)
            ratio = n / q if q and n else None
            ratios[s_][w] = ratio
            row += f"{n if n is not None else nan:>15.3f}{ratio if ratio is not None else nan:>7.2f}"
        print(row)
    for s_ in servers:
        for w in ("seq_write", "seq_read"):
            if results[s_].get(w):
                meta[f"{s_}_{w}_MiBps"] = round(args.size_mb / results[s_][w], 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = args.out / f"guest-{stamp}.json"
    path.write_text(json.dumps({
        "when": stamp, "accel": accel.name, "accel_why": accel.why, "host": platform.node(),
        "kernel": image.kernel_version, "qemu": qemu_version(), "model": args.model,
        "msize": args.msize, "size_mb": args.size_mb, "files": args.files, "rand": args.rand,
        "ls_entries": tree_dirs * tree_files,
        "transports": {"qemu": "virtio-9p-pci", "ninep": "trans=fd via virtio-serial + guest relay",
                       "ninep-vhost": "vhost-user virtio-9p (sid QEMU)"}, "seconds": results, "ratio_over_qemu": ratios,
        **meta,
    }, indent=1))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
