#!/usr/bin/env python3
"""Codec micro-benchmark: decode + encode time per hot 9P2000.L message, fast vs construct codec.

    .venv/bin/python bench/codec.py [--quick] [--out DIR]

For each hot message (Twalk/Rwalk, Tgetattr/Rgetattr, Tlopen/Rlopen, Tread/Rread, Twrite/Rwrite,
Tclunk/Rclunk) it times one decode of the wire bytes plus one encode of the decoded object, with
the generated fast codec (`ninep.protocol.codec.Codec`) and the construct reference codec
(`reference_decode`/`reference_encode`), prints a table against the 2 µs target and writes
bench/results/codec-<date>-<host>.json.

This script must never change the codec; it only measures it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, host, machine, stamp, write_json  # noqa: E402
from ninep.protocol import messages as m  # noqa: E402
from ninep.protocol.codec import codec_for, reference_decode, reference_encode  # noqa: E402
from ninep.protocol.numbers import GETATTR_ALL, V9P2000_L  # noqa: E402
from ninep.protocol.types import Qid  # noqa: E402

TARGET_US = 2.0
PAYLOAD = 4096  # Tread/Rread/Twrite payload of the samples: a page, the common small-I/O size


def samples() -> list[m.Message]:
    q = Qid(0, 1, 123456789)
    return [
        m.Twalk(1, 2, ["usr", "share"], tag=1), m.Rwalk([q, Qid(0x80, 0, 42)], tag=1),
        m.Tgetattr(2, GETATTR_ALL, tag=2),
        m.Rgetattr(GETATTR_ALL, q, 0o100644, 1000, 1000, 1, 0, 4096, 4096, 8,
                   1_700_000_000, 1, 1_700_000_000, 2, 1_700_000_000, 3, 0, 0, 0, 0, tag=2),
        m.Tlopen(2, 0, tag=3), m.Rlopen(q, 524288 - 24, tag=3),
        m.Tread(2, 1 << 20, PAYLOAD, tag=4), m.Rread(memoryview(bytes(PAYLOAD)), tag=4),
        m.Twrite(2, 1 << 20, memoryview(bytes(PAYLOAD)), tag=5), m.Rwrite(PAYLOAD, tag=5),
        m.Tclunk(2, tag=6), m.Rclunk(tag=6),
    ]


def per_call_us(fn: Callable[[], Any], budget: float) -> tuple[float, float]:
    """(best, median) µs per call of `fn` over repeats filling about `budget` seconds. Timed in
    thread CPU time, so that other work on a busy machine does not count."""
    n, t = 1, 0.0
    while True:  # calibrate: a batch of about 20 ms
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        t = time.thread_time() - t0
        if t > 0.02:
            break
        n *= 2
    repeats = max(3, int(budget / t))
    per = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        per.append((time.thread_time() - t0) / n * 1e6)
    return min(per), statistics.median(per)


def measure(budget: float) -> list[dict[str, Any]]:
    fast = codec_for(V9P2000_L)
    rows = []
    for msg in samples():
        wire = fast.encode_bytes(msg)
        mv = memoryview(wire)

        def fast_rt(mv: memoryview = mv) -> None:
            fast.encode(fast.decode(mv))

        def ref_rt(wire: bytes = wire) -> None:
            reference_encode(reference_decode(wire, V9P2000_L), V9P2000_L)

        assert reference_encode(reference_decode(wire, V9P2000_L), V9P2000_L) == wire
        assert b"".join(bytes(p) for p in fast.encode(fast.decode(mv))) == wire
        fb, fm = per_call_us(fast_rt, budget)
        rb, rm = per_call_us(ref_rt, budget)
        decoded = fast.decode(mv)

        def dec(mv: memoryview = mv) -> None:
            fast.decode(mv)

        def enc(d: m.Message = decoded) -> None:
            fast.encode(d)

        dec_b, _ = per_call_us(dec, budget / 2)
        enc_b, _ = per_call_us(enc, budget / 2)
        rows.append({
            "message": type(msg).__name__, "bytes": len(wire),
            "fast_us": fb, "fast_median_us": fm, "fast_decode_us": dec_b, "fast_encode_us": enc_b,
            "construct_us": rb, "construct_median_us": rm, "speedup": rb / fb,
            "meets_target": fb <= TARGET_US,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter timing (about 2 s in all)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the result file")
    args = ap.parse_args(argv)
    rows = measure(0.05 if args.quick else 0.3)
    print(f"decode+encode per message (CPU time), 9P2000.L, payload {PAYLOAD} B; best of repeats "
          f"(target fast ≤ {TARGET_US} µs)")
    print(f"{'message':<10} {'bytes':>6} {'fast µs':>8} {'(dec':>6} {'enc)':>6} {'construct µs':>13} {'speedup':>8}  target")
    for r in rows:
        print(f"{r['message']:<10} {r['bytes']:>6} {r['fast_us']:>8.2f} {r['fast_decode_us']:>6.2f} "
              f"{r['fast_encode_us']:>6.2f} {r['construct_us']:>13.2f} {r['speedup']:>7.1f}x  "
              f"{'≤2 µs' if r['meets_target'] else 'OVER'}")
    path = write_json(args.out / f"codec-{stamp()}-{host()}.json",
                      {"benchmark": "codec", "machine": machine(), "target_us": TARGET_US,
                       "payload_bytes": PAYLOAD, "quick": args.quick, "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
