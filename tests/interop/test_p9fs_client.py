"""PyPI's p9fs (an fsspec filesystem over its own `py9p` client) against our server, speaking
9P2000.L, 9P2000.u and plain 9P2000 over loopback TCP, from its own venv."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.interop.conftest import Served

SCRIPT = r'''
import json, sys
import p9fs
port, version = int(sys.argv[1]), sys.argv[2]
fs = p9fs.P9FileSystem(host="127.0.0.1", port=port, username="root", version=version)
out = {}
with fs.open("hello.txt", "rb") as f:
    out["hello"] = f.read().decode()
with fs.open("sub/deeper/big.bin", "rb") as f:
    out["big_len"] = len(f.read())
out["root"] = sorted(e["name"].strip("/") for e in fs.ls("", detail=True))
out["sub"] = sorted(fs.ls("sub", detail=False))
out["isdir_sub"] = fs.isdir("sub")
out["isfile_hello"] = fs.isfile("hello.txt")
out["hello_size"] = fs.info("hello.txt")["size"]
fs.mkdir("made")
with fs.open("made/written.txt", "wb") as f:
    f.write(b"written through p9fs " * 2000)
with fs.open("made/written.txt", "rb") as f:
    f.seek(21 * 1000)
    out["seeked"] = f.read(21).decode()
out["written_size"] = fs.info("made/written.txt")["size"]
fs.mv("made/written.txt", "made/moved.txt")
out["made"] = sorted(fs.ls("made", detail=False))
with fs.open("made/scratch", "wb") as f:
    f.write(b"x")
fs.rm("made/scratch")
out["made_after_rm"] = sorted(fs.ls("made", detail=False))
try:
    fs.info("no/such/file")
    out["missing"] = "found?"
except Exception as e:
    out["missing"] = f"{type(e).__name__}: {e} / {e.__cause__ or e.__context__}"
print(json.dumps(out))
'''


@pytest.mark.parametrize("version", ["9P2000.L", "9P2000.u", "9P2000"])
def test_p9fs_reads_writes_lists_moves(ninep_server: Served, p9fs_python: Path, version: str) -> None:
    r = subprocess.run([str(p9fs_python), "-c", SCRIPT, str(ninep_server.port), version],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert out["hello"] == "hello, 9P world\n"
    assert out["big_len"] == 256 * 1024
    assert {"hello.txt", "sub", "link"} <= set(out["root"])
    assert sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in out["sub"]) == ["deeper", "inner.txt"]
    assert out["isdir_sub"] and out["isfile_hello"] and out["hello_size"] == 16
    assert out["seeked"] == "written through p9fs "
    assert out["written_size"] == 21 * 2000
    assert [p.rsplit("/", 1)[-1] for p in out["made"]] == ["moved.txt"]
    assert [p.rsplit("/", 1)[-1] for p in out["made_after_rm"]] == ["moved.txt"]
    # .L reports errno 2; 9P2000/.u report the Rerror string, which must be the standard one.
    assert "FileNotFound" in out["missing"] or "No such file or directory" in out["missing"], out["missing"]
    if version != "9P2000.L":
        assert "No such file or directory" in out["missing"], out["missing"]
    # What p9fs did is what the host directory now holds.
    made = ninep_server.export / "made"
    assert sorted(p.name for p in made.iterdir()) == ["moved.txt"]
    assert (made / "moved.txt").read_bytes() == b"written through p9fs " * 2000
