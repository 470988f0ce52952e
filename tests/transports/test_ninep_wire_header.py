"""transports/ring/ninep_wire.h, the 9P numbers of the compiled ring extension, agrees with their
source: `ninep.protocol` (message types, header sizes, the codec's encoding) and Python's errno.

The header is parsed as text (no compiler needed); every define in it must be checked here, so a
number added to the C side without a Python source fails this test.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from ninep.protocol import messages as m
from ninep.protocol.codec import codec_for
from ninep.protocol.numbers import HEADER_SIZE, READ_HEADER, V9P2000, V9P2000_L, V9P2000_U, T

HEADER = Path(__file__).resolve().parents[2] / "transports" / "ring" / "ninep_wire.h"
DEFINE = re.compile(r"^#define\s+(NINEP_\w+)\s+(\d+)u?\s*$", re.MULTILINE)


def _defines() -> dict[str, int]:
    text = HEADER.read_text()
    found = {name: int(value) for name, value in DEFINE.findall(text)}
    others = [ln for ln in re.findall(r"^#define\s+(\w+).*$", text, re.MULTILINE)
              if ln not in found and ln != "NINEP_WIRE_H"]
    assert not others, f"defines this test cannot read: {others}"
    return found


def _encoded_sizes(msg: m.Message) -> set[int]:
    """The encoded size of `msg` in every dialect (they must agree for the fast paths)."""
    return {len(codec_for(d).encode_bytes(msg)) for d in (V9P2000, V9P2000_U, V9P2000_L)}


def _expected() -> dict[str, int]:
    io_header = _encoded_sizes(m.Tread(fid=0, offset=0, count=0)) | _encoded_sizes(
        m.Twrite(fid=0, offset=0, data=b""))
    reply_header = _encoded_sizes(m.Rread(data=b"")) | _encoded_sizes(m.Rwrite(count=0)) | {READ_HEADER}
    assert len(io_header) == 1 and len(reply_header) == 1, (io_header, reply_header)
    return {
        "NINEP_HEADER": HEADER_SIZE,
        "NINEP_IO_HEADER": io_header.pop(),
        "NINEP_IO_REPLY_HEADER": reply_header.pop(),
        "NINEP_TREAD": T.Tread,
        "NINEP_RREAD": T.Rread,
        "NINEP_TWRITE": T.Twrite,
        "NINEP_RWRITE": T.Rwrite,
    }


def test_every_define_matches_its_python_source() -> None:
    defines = _defines()
    expected = _expected()
    for name, value in defines.items():
        if name.startswith("NINEP_E"):
            assert value == getattr(errno, name.removeprefix("NINEP_")), name
        else:
            assert name in expected, f"{name} has no Python source checked here"
            assert value == expected[name], name
    assert set(expected) <= set(defines), set(expected) - set(defines)


def test_no_c_file_defines_its_own_9p_numbers() -> None:
    """The ring sources take 9P numbers from ninep_wire.h only (none of their old local names)."""
    ring = HEADER.parent
    local = re.compile(r"^#define\s+(T_READ|R_READ|T_WRITE|R_WRITE|IO_HEADER|REPLY_HEADER|P9_\w+)\b",
                       re.MULTILINE)
    for path in sorted([*ring.glob("*.c"), *ring.glob("*.h")]):
        assert not local.findall(path.read_text()), path.name
