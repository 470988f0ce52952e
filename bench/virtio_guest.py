"""In-guest speed of trans=virtio: ninep's vhost-user back-end against QEMU's own virtio-9p server
(`-fsdev local`), both mounted in the same guest with the same msize and cache mode, one run.

Measures sequential 1 MiB write and read MB/s, 4 KiB random-read IOPS and create/stat/unlink
ops/s on each mount. Under TCG (no usable KVM here) the guest's own cost dominates, so compare
the two columns with each other, not with host numbers.

    PYTHONPATH=. python bench/virtio_guest.py [--size-mb 64] [--files 300] [--model passthrough]

Needs the guest harness (tests/guest) and sid's QEMU (tests/virtio/sidqemu.py, downloaded into
the cache on first use). This script must never run as part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOB = r"""
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.1f", n / (b - a) }'; }
for spec in "ninep /mnt" "qemu /mnt2"; do
	set -- $spec
	name=$1; M=$2
	t0=$(t9tool now); dd if=/dev/zero of=$M/seq bs=1M count=$SIZE_MB 2>/dev/null; t1=$(t9tool now)
	echo "info bench $name seq_write_MBps $(rate $SIZE_MB $t0 $t1)"
	t0=$(t9tool now); dd if=$M/seq of=/dev/null bs=1M 2>/dev/null; t1=$(t9tool now)
	echo "info bench $name seq_read_MBps $(rate $SIZE_MB $t0 $t1)"
	t0=$(t9tool now); t9tool randread $M/seq $READS 4096; t1=$(t9tool now)
	echo "info bench $name randread_4k_iops $(rate $READS $t0 $t1)"
	mkdir -p $M/meta
	for op in create stat unlink; do
		t0=$(t9tool now); t9tool many $op $M/meta $FILES; t1=$(t9tool now)
		echo "info bench $name ${op}_per_s $(rate $FILES $t0 $t1)"
	done
	rm -f $M/seq; rmdir $M/meta
	echo "ok $name"
done
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--msize", type=int, default=512000)
    ap.add_argument("--model", default="passthrough")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    guestvm = importlib.import_module("tests.guest.guestvm")  # the guest harness (tests/guest)
    from tests.virtio.sidqemu import ensure_sid_qemu, qemu_command

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
             "--security-model", args.model, "--msize", str(args.msize)],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        try:
            while not sock.exists():
                if server.poll() is not None:
                    raise SystemExit(log.read_text())
                time.sleep(0.05)
            setup = guestvm.vhost_user_9p("virtio-bench", [sock], ["vt0"], qemu, msize=args.msize)
            setup.devices += [
                "-fsdev", f"local,id=q0,path={theirs},security_model={args.model}",
                "-device", "virtio-9p-pci,fsdev=q0,mount_tag=q0",
            ]
            opts = f"trans=virtio,version=9p2000.L,msize={args.msize},cache=none"
            setup.mounts.append(guestvm.Mount("virtio", "q0", "/mnt2", opts))
            env_vars = {"SIZE_MB": str(args.size_mb), "READS": str(args.reads), "FILES": str(args.files)}
            run = guestvm.run_job(image, setup, JOB, env_vars, timeout=1800)
        finally:
            server.terminate()
            server.wait(10)
    if run.fails or run.rc != 0:
        raise SystemExit(f"guest job failed: {run.fails}\n{run.console_tail()}")
    results: dict[str, dict[str, float]] = {}
    for line in run.lines:
        parts = line.split()
        if parts[:2] == ["info", "bench"]:
            results.setdefault(parts[3], {})[parts[2]] = float(parts[4])
    print(f"accel {run.accel}, msize {args.msize}, cache=none, model {args.model}")
    print(f"{'metric':22s} {'ninep':>10s} {'qemu':>10s} {'ratio':>7s}")
    for metric, row in results.items():
        ratio = row.get("ninep", 0) / row["qemu"] if row.get("qemu") else float("nan")
        print(f"{metric:22s} {row.get('ninep', 0):10.1f} {row.get('qemu', 0):10.1f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
