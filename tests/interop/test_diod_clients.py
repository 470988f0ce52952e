"""diod's own 9P2000.L clients (`diodls`, `diodcat`, from Debian's diod package) against our
server, started through the CLI and serving a host directory over loopback TCP."""

from __future__ import annotations

import subprocess

from tests.interop.conftest import Served, diod_tool


def run(tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([diod_tool(tool), "-t", "10", *args], capture_output=True, timeout=30)


def test_diodls_lists_the_export_and_subdirectories(ninep_server: Served) -> None:
    r = run("diodls", "-s", ninep_server.address, "-a", "/", "/")
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.decode().split()) >= {"hello.txt", "sub", "link"}
    r = run("diodls", "-s", ninep_server.address, "-a", "/", "sub")
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.decode().split()) >= {"inner.txt", "deeper"}


def test_diodls_long_listing_through_an_aname(ninep_server: Served) -> None:
    # -l walks and stats every entry ('.' and '..' included) and prints sizes and modes.
    r = run("diodls", "-l", "-s", ninep_server.address, "-a", "/sub", "/")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[-1]: line.split() for line in r.stdout.decode().splitlines()}
    assert lines["inner.txt"][0].startswith("-rw") and "11" in lines["inner.txt"]
    assert lines["deeper"][0].startswith("d")
    assert {".", ".."} <= set(lines)


def test_diodls_many_entries(ninep_server: Served) -> None:
    many = ninep_server.export / "many"
    many.mkdir()
    names = {f"file-{i:04d}-{'n' * 40}" for i in range(400)}  # several Treaddir calls at msize 8192
    for n in names:
        (many / n).write_bytes(b"")
    r = run("diodls", "-m", "8192", "-s", ninep_server.address, "-a", "/", "many")
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.decode().split()) == names


def test_diodcat_reads_files(ninep_server: Served) -> None:
    r = run("diodcat", "-s", ninep_server.address, "-a", "/", "hello.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello, 9P world\n"
    r = run("diodcat", "-s", ninep_server.address, "-a", "/sub", "deeper/big.bin")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ninep_server.export / "sub" / "deeper" / "big.bin").read_bytes()
    r = run("diodcat", "-m", "4096", "-s", ninep_server.address, "-a", "/", "sub/inner.txt", "hello.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"inner file\nhello, 9P world\n"


def test_diod_clients_get_errors_for_missing_things(ninep_server: Served) -> None:
    r = run("diodcat", "-s", ninep_server.address, "-a", "/", "missing.txt")
    assert r.returncode != 0 and b"No such file" in r.stderr
    r = run("diodls", "-s", ninep_server.address, "-a", "/nonexistent", "/")
    assert r.returncode != 0 and r.stderr
    # ...and the server keeps serving.
    r = run("diodcat", "-s", ninep_server.address, "-a", "/", "hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello, 9P world\n"


def test_readonly_cli_serves_reads_and_refuses_writes(ninep_readonly_server: Served) -> None:
    import errno

    import trio

    from ninep.client import Client, ClientError
    from ninep.protocol.numbers import L_O_CREAT, L_O_WRONLY

    r = run("diodcat", "-s", ninep_readonly_server.address, "-a", "/", "hello.txt")
    assert r.returncode == 0 and r.stdout == b"hello, 9P world\n"

    async def main() -> None:
        async with Client.connect(f"tcp:{ninep_readonly_server.address}") as c:
            root = await c.attach()
            for attempt in (c.mkdir(root, "x"), c.open_file(root, "new", L_O_WRONLY | L_O_CREAT),
                            c.open_file(root, "hello.txt", L_O_WRONLY), c.unlinkat(root, "hello.txt")):
                try:
                    await attempt
                    raise AssertionError("a change succeeded on a --readonly server")
                except ClientError as e:
                    assert e.errno == errno.EROFS

    trio.run(main)
    assert sorted(p.name for p in ninep_readonly_server.export.iterdir()) == ["hello.txt", "link", "sub"]
