"""A QEMU new enough for vhost-user virtio-9p (>= 10.2, `vhost-user-test-device-pci`), unpacked
from Debian sid's packages into a cache directory and run through sid's own dynamic loader.

Bookworm ships QEMU 7.2 (10.0 in backports, where the device is not user-creatable). Nothing is
installed on the host: a private apt configuration (own sources list, lists, cache, empty status)
downloads `qemu-system-x86` and its Depends closure, `dpkg-deb -x` unpacks them into one root,
and `qemu_command()` returns the argv prefix that runs that QEMU: `unshare --mount` with sid's
module directory bind-mounted over the system's (QEMU refuses modules from another build), then
sid's `ld-linux-x86-64.so.2 --library-path ... qemu-system-x86_64 -L ...`.

Used by the real-guest test and the guest benchmark. Must never modify the host's packages or
its /usr (the bind mount lives only in the private mount namespace of the QEMU process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios", "ipxe-qemu", "libc6")
SUITE = "sid"
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SYSTEM_MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"
LAYOUT = "1"


class SidQemuError(RuntimeError):
    """sid's QEMU could not be downloaded or unpacked."""


def cache_dir() -> Path:
    base = Path(os.environ.get("NINEP_CACHE") or Path.home() / ".cache" / "ninep")
    return base / "qemu-sid"


def _run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SidQemuError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return str(proc.stdout)


def _apt_options(base: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::sourcelist={base / 'sources.list'}",
        "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::State::status={base / 'status'}",
        "-o", f"Dir::Cache={base / 'cache'}",
        "-o", "Dir::Etc::Preferences=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=-",
        "-o", "APT::Architecture=amd64",
        "-o", "APT::Architectures::=amd64",
        "-o", "Debug::NoLocking=1",
    ]


def _closure(opts: list[str]) -> list[str]:
    out = _run(
        ["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *ROOT_PACKAGES]
    )
    names: set[str] = set()
    for line in out.splitlines():
        name = line.split(":", 1)[-1].strip() if ":" in line else line.strip()
        if not name or name.startswith("<") or " " in name:
            continue
        names.add(name)
    return sorted(names)


def ensure_sid_qemu() -> Path:
    """Downloads and unpacks sid's QEMU once; returns the unpacked root."""
    base = cache_dir()
    root = base / "root"
    done = base / f"done-{LAYOUT}"
    if done.exists() and (root / "usr/bin/qemu-system-x86_64").exists():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SidQemuError("apt-get and dpkg-deb are needed to fetch sid's QEMU")
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n")
    (base / "status").write_text("")
    opts = _apt_options(base)
    _run(["apt-get", *opts, "update"])
    packages = _closure(opts)
    debs = base / "debs"
    for old in debs.glob("*.deb"):
        old.unlink()
    _run(["apt-get", *opts, "download", *packages], cwd=debs)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    if not (root / "usr/bin/qemu-system-x86_64").exists():
        raise SidQemuError("qemu-system-x86_64 missing after unpacking sid's packages")
    done.write_text("\n".join(packages) + "\n")
    for bulky in ("debs", "lists", "cache"):  # only the unpacked root is needed from now on
        shutil.rmtree(base / bulky, ignore_errors=True)
    return root


def qemu_command(root: Path, *, allow_reboot: bool = False) -> list[str]:
    """The argv prefix running sid's qemu-system-x86_64 (append the usual QEMU arguments).
    `allow_reboot` drops a `-no-reboot` given later, so a guest reboot resets the machine (and
    the vhost-user device) instead of ending QEMU."""
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    loader = root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    if not loader.exists():
        loader = root / "lib64/ld-linux-x86-64.so.2"
    modules = root / SYSTEM_MODULE_DIR.lstrip("/")
    run = [str(loader), "--library-path", libs, str(root / "usr/bin/qemu-system-x86_64"),
           "-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")]
    filter_args = 'for a do shift; [ "$a" = -no-reboot ] || set -- "$@" "$a"; done; ' if allow_reboot else ""
    if not Path(SYSTEM_MODULE_DIR).is_dir() or not modules.is_dir():
        return ["sh", "-c", filter_args + 'exec "$@"', "sh", *run]
    # The host's QEMU modules (another build) sit at the path QEMU also searches: hide them.
    script = f'mount --bind "{modules}" "{SYSTEM_MODULE_DIR}" && {filter_args}exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", *run]


def qemu_version(cmd: list[str]) -> tuple[int, int]:
    out = _run([*cmd, "--version"], env={**os.environ, "QEMU_MODULE_DIR": ""})
    first = out.split("version", 1)[1].split()[0]
    major, minor = first.split(".")[:2]
    return int(major), int(minor)
