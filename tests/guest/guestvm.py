"""Build and boot a small Linux guest whose kernel 9p client mounts a server under test.

What it does: builds, once per cache directory, a bootable guest from Debian packages (the
`linux-image-amd64` kernel as an uncompressed ELF for PVH direct boot, the 9p/virtio modules in
load order, busybox-static, two static C helpers compiled here, an /init) and boots it with QEMU.
A job (a busybox sh script plus an environment file) travels as a second cpio appended to the
initrd for each run; the guest prints its results between markers on the serial console.

Used by tests/guest/test_guest.py and bench/guest.py. Must never touch the host's own kernel,
modules or /boot (everything is unpacked into the cache), never reach the network except through
apt, and never leave a QEMU process behind (a run that times out is killed and reported with the
console tail).

The cache root is $NINEP_CACHE (default ~/.cache/ninep); guest files live in its `guest/`
subdirectory, keyed by the kernel and busybox package versions and a hash of the sources here.

Two kernels (`KERNELS`): "bookworm" (the host's apt, Linux 6.1) and "sid" (Debian sid's
`linux-image-amd64`, Linux 7.x, fetched through a private apt configuration under
`guest/sid-apt` like tests/kits/sidqemu.py does for QEMU; its image is split into
`linux-binary-*` and `linux-modules-*`, its vmlinuz payload is zstd, its modules .ko.xz).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN = "=== NINEP-JOB BEGIN ==="
END_RE = re.compile(r"=== NINEP-JOB END rc=(\d+) ===")
# Bump when the image layout changes in a way the source hashes below do not capture.
LAYOUT_VERSION = "2"
KERNEL_META = "linux-image-amd64"
#: Guest kernels build_image knows: "bookworm" (host apt, 6.1) and "sid" (private sid apt, 7.x).
KERNELS = ("bookworm", "sid")
MODULES = ("virtio_pci", "virtio_console", "9p", "9pnet_virtio", "9pnet_fd")
HOST_PACKAGES = {
    # command or file that must exist -> Debian package that provides it
    "qemu-system-x86_64": "qemu-system-x86",
    "/bin/busybox": "busybox-static",
    "gcc": "gcc",
    "/usr/lib/x86_64-linux-gnu/libc.a": "libc6-dev",
    "depmod": "kmod",
    "modprobe": "kmod",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "zstd": "zstd",  # sid's vmlinuz payload
}


class GuestError(RuntimeError):
    """The guest could not be built or booted, or it did not finish its job."""


def cache_root() -> Path:
    return Path(os.environ.get("NINEP_CACHE") or Path.home() / ".cache" / "ninep")


def _run(cmd: Sequence[str], **kw: object) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


# ---------------------------------------------------------------------------------------------
# host tools


def _missing_host_packages() -> list[str]:
    missing = []
    for what, pkg in HOST_PACKAGES.items():
        present = Path(what).exists() if what.startswith("/") else shutil.which(what) is not None
        if not present and pkg not in missing:
            missing.append(pkg)
    return missing


def ensure_host_tools() -> None:
    """Install (with apt) what building and booting the guest needs; idempotent."""
    missing = _missing_host_packages()
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
        _run(["apt-get", "update"], env=env)
        _run(cmd, env=env)
    still = _missing_host_packages()
    if still:
        raise GuestError(f"could not install host packages: {still}")


# ---------------------------------------------------------------------------------------------
# accelerator


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    qemu_args: tuple[str, ...]
    kernel_args: tuple[str, ...]
    why: str


def detect_accel() -> Accel:
    """KVM only where a stock kernel really boots on it; TCG otherwise.

    The /dev/kvm seen on these machines is PVM (no vmx/svm flags, kvm_pvm loaded): stock Debian
    kernels hang there, so the presence of /dev/kvm alone proves nothing. NINEP_GUEST_ACCEL=tcg|kvm
    overrides the detection.
    """
    forced = os.environ.get("NINEP_GUEST_ACCEL")
    tcg = Accel(
        "tcg",
        ("-accel", "tcg,thread=multi", "-cpu", "max,monitor=off", "-smp", "1"),
        ("idle=halt",),
        "",
    )
    kvm = Accel("kvm", ("-enable-kvm", "-cpu", "host", "-smp", "2"), (), "")
    if forced == "tcg":
        return Accel(tcg.name, tcg.qemu_args, tcg.kernel_args, "forced by NINEP_GUEST_ACCEL")
    if forced == "kvm":
        return Accel(kvm.name, kvm.qemu_args, kvm.kernel_args, "forced by NINEP_GUEST_ACCEL")
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    pvm = Path("/sys/module/kvm_pvm").exists()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        why = "no usable /dev/kvm"
    elif pvm:
        why = "/dev/kvm is PVM (kvm_pvm): stock kernels do not boot on it"
    elif not flags & {"vmx", "svm"}:
        why = "/dev/kvm present but the CPU shows no vmx/svm (PVM or nested without VT)"
    else:
        return Accel(kvm.name, kvm.qemu_args, kvm.kernel_args, "vmx/svm and /dev/kvm")
    return Accel(tcg.name, tcg.qemu_args, tcg.kernel_args, why)


# ---------------------------------------------------------------------------------------------
# cpio (newc), written here so the host needs no cpio binary and device nodes need no mknod


class Cpio:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        out = hdr + name_b
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
        self._parts.append(out)

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def bytes(self) -> bytes:
        trailer = Cpio()
        trailer._entry("TRAILER!!!", 0)
        data = b"".join(self._parts) + trailer._parts[0]
        return data + b"\0" * (-len(data) % 512)


# ---------------------------------------------------------------------------------------------
# the guest image


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # uncompressed ELF vmlinux (PVH boot)
    initrd: Path  # base initrd without a job
    kernel_version: str
    key: str


def _sid_apt(gdir: Path) -> list[str]:
    """apt options of a private sid configuration under gdir/sid-apt (lists fetched once)."""
    from tests.kits.sidqemu import KEYRING, MIRROR, _apt_options

    base = gdir / "sid-apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} sid main\n")
    if not (base / "status").exists():
        (base / "status").write_text("")
    opts = _apt_options(base)
    if not any((base / "lists").glob("*_Packages*")):
        _run(["apt-get", *opts, "update"])
    return opts


def _apt_show(pkg: str, field_name: str, opts: Sequence[str] = ()) -> str:
    out = _run(["apt-cache", *opts, "show", "--no-all-versions", pkg])
    m = re.search(rf"^{field_name}: (.*)$", out, re.M)
    if not m:
        raise GuestError(f"apt-cache show {pkg}: no {field_name}")
    return m.group(1).strip()


def _kernel_package(opts: Sequence[str] = ()) -> tuple[str, str]:
    """(package, version) of the kernel image linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64."""
    try:
        depends = _apt_show(KERNEL_META, "Depends", opts)
    except GuestError:
        if opts:
            raise
        _run(["apt-get", "update"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        depends = _apt_show(KERNEL_META, "Depends")
    m = re.search(r"(linux-image-[0-9][^\s,(]*)", depends)
    if not m:
        raise GuestError(f"{KERNEL_META} depends on no linux-image-*: {depends}")
    pkg = m.group(1)
    return pkg, _apt_show(pkg, "Version", opts)


def _kernel_debs(debs: Path, kpkg: str, version: str, opts: Sequence[str]) -> list[Path]:
    """The .deb files holding the kernel and its modules (downloaded into `debs` once): the
    image package itself, or (sid) the linux-base-*/linux-binary-*/linux-modules-* packages it depends on."""
    pkgs = [kpkg]
    if opts:
        depends = _apt_show(kpkg, "Depends", opts)
        pkgs = re.findall(r"(linux-(?:base|binary|modules)-[0-9][^\s,(]*)", depends) or pkgs
    out = []
    for pkg in pkgs:
        deb = next(debs.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"), None)
        if deb is None:
            _run(["apt-get", *opts, "download", f"{pkg}={version}"], cwd=debs)
            deb = next(debs.glob(f"{pkg}_*.deb"), None)
            if deb is None:
                raise GuestError(f"apt-get download {pkg} left no .deb in {debs}")
        out.append(deb)
    return out


def _sources_hash() -> str:
    h = hashlib.sha256(LAYOUT_VERSION.encode())
    for name in ("relay.c", "t9tool.c", "init.sh"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz (bookworm) or zstd (sid) compressed."""
    # The setup header names the payload (offset from the protected-mode code, which follows
    # setup_sects + 1 sectors); its last 4 bytes are the uncompressed size, not compressed data.
    setup_sects = vmlinuz[0x1F1] or 4
    off, length = struct.unpack_from("<II", vmlinuz, 0x248)
    start = (setup_sects + 1) * 512 + off
    payload = vmlinuz[start : start + length - 4]
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        elf = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    else:
        start = vmlinuz.find(b"\xfd7zXZ\x00")
        if start < 0:
            raise GuestError("vmlinuz has no xz or zstd payload")
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[start:])
    if not elf.startswith(b"\x7fELF"):
        raise GuestError("xz payload of vmlinuz is not an ELF file")
    return elf


def _compile_static(src: Path, out: Path) -> None:
    _run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src)])


def build_image(cache: Path | None = None, kernel: str = "bookworm") -> GuestImage:
    """Build the guest once per cache directory, kernel (see KERNELS) and key; later calls
    return the cached files."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    ensure_host_tools()
    gdir = (cache or cache_root()) / "guest"
    gdir.mkdir(parents=True, exist_ok=True)
    opts = _sid_apt(gdir) if kernel == "sid" else []
    kpkg, kver_pkg = _kernel_package(opts)
    bb_version = _run(["dpkg-query", "-W", "-f", "${Version}", "busybox-static"]).strip()
    key = hashlib.sha256(f"{kpkg} {kver_pkg} {bb_version} {_sources_hash()}".encode()).hexdigest()[:16]
    idir = gdir / f"image-{key}"
    manifest = idir / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        return GuestImage(idir / "vmlinux", idir / "initrd.cpio", m["kernel_version"], key)

    debs = gdir / "debs"
    debs.mkdir(exist_ok=True)
    kdebs = _kernel_debs(debs, kpkg, kver_pkg, opts)

    with tempfile.TemporaryDirectory(dir=gdir) as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "root"
        for deb in kdebs:
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        if not (root / "lib/modules").is_dir() and (root / "usr/lib/modules").is_dir():
            # sid installs to /usr/lib/modules; the host's depmod/modprobe -d look in lib/modules
            (root / "lib").mkdir(exist_ok=True)
            (root / "usr/lib/modules").rename(root / "lib/modules")
        kvers = [p.name for p in (root / "lib/modules").iterdir()]
        if len(kvers) != 1:
            raise GuestError(f"expected one kernel in {kdebs}, found {kvers}")
        kver = kvers[0]
        _run(["depmod", "-b", str(root), kver])
        order: list[Path] = []
        for mod in MODULES:
            out = _run(["modprobe", "-d", str(root), "-S", kver, "--show-depends", mod])
            for line in out.splitlines():
                parts = line.split()
                if parts[:1] == ["insmod"] and Path(parts[1]) not in order:
                    order.append(Path(parts[1]))
                elif parts[:1] == ["builtin"]:
                    continue
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "mnt2", "job", "lib", "lib/modules", "root"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        names = []
        for ko in order:
            data = ko.read_bytes()
            if ko.suffix == ".xz":  # sid ships .ko.xz; busybox insmod wants them plain
                data = lzma.decompress(data)
            name = ko.name.removesuffix(".xz")
            names.append(name)
            cpio.file(f"lib/modules/{name}", data)
        cpio.file("lib/modules/order", ("\n".join(names) + "\n").encode())
        for tool in ("relay", "t9tool"):
            _compile_static(HERE / f"{tool}.c", tmp / tool)
            cpio.file(f"bin/{tool}", (tmp / tool).read_bytes(), 0o755)
        cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)

        vmlinuz = root / "boot" / f"vmlinuz-{kver}"
        if not vmlinuz.exists():  # sid: next to the modules
            vmlinuz = root / "lib/modules" / kver / "vmlinuz"
        stage = tmp / "image"
        stage.mkdir()
        (stage / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        (stage / "initrd.cpio").write_bytes(cpio.bytes())
        (stage / "manifest.json").write_text(
            json.dumps(
                {"kernel_package": kpkg, "kernel_package_version": kver_pkg,
                 "kernel_version": kver, "busybox": bb_version, "modules": names},
                indent=1,
            )
        )
        try:
            os.rename(stage, idir)  # atomic: a reader sees a whole image or none
        except OSError:
            if not manifest.exists():  # not a concurrent build that finished first
                raise
    # Each image is ~70 MB (the uncompressed kernel): keep only the few newest.
    images = sorted(gdir.glob("image-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[6:]:  # (several worktrees and both KERNELS share the cache)
        shutil.rmtree(old, ignore_errors=True)
    return build_image(cache, kernel)


# ---------------------------------------------------------------------------------------------
# what the guest mounts and how QEMU presents it


@dataclass
class Mount:
    """One 9p mount in the guest.

    kind "virtio": `source` is the mount tag (QEMU's virtio-9p-pci or a vhost-user device).
    kind "fd": `source` is the name of a virtserialport; the guest relays that port through a
    socketpair (the kernel cannot write to a virtio console port itself) and mounts trans=fd.
    """

    kind: str
    source: str
    target: str
    options: str


@dataclass
class Setup:
    """A server as the guest sees it: QEMU arguments (devices) plus the mounts to make.

    `qemu_cmd` replaces the QEMU binary (and any wrapper such as a private loader or
    `unshare`); None means the system's qemu-system-x86_64. `memory_args` replaces the plain
    `-m` option (vhost-user needs shared memory).
    """

    name: str
    devices: list[str]
    mounts: list[Mount]
    qemu_cmd: list[str] | None = None
    memory_args: list[str] | None = None


L_OPTS = "version=9p2000.L"


def qemu_local(export: Path, security_model: str = "passthrough", msize: int = 512000) -> Setup:
    """QEMU's own 9p server (the control): main mount cache=none, second mount cache=mmap."""
    devices: list[str] = []
    for i in (0, 1):
        devices += [
            "-fsdev", f"local,id=fs{i},path={export},security_model={security_model}",
            "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag=t{i}",
        ]
    return Setup(
        f"qemu-{security_model}",
        devices,
        [
            Mount("virtio", "t0", "/mnt", f"trans=virtio,{L_OPTS},msize={msize},cache=none"),
            Mount("virtio", "t1", "/mnt2", f"trans=virtio,{L_OPTS},msize={msize},cache=mmap"),
        ],
    )


def virtio_serial_fd(name: str, sockets: Sequence[Path], msize: int = 512000) -> Setup:
    """A server listening on unix sockets, reached by trans=fd over virtio-serial ports.

    QEMU connects to each socket (one 9p connection per port); the first port carries the
    cache=none mount, the second (if given) the cache=mmap mount.
    """
    devices = ["-device", "virtio-serial-pci"]
    mounts = []
    caches = ("none", "mmap")
    for i, sock in enumerate(sockets):
        devices += [
            "-chardev", f"socket,id=c9p{i},path={sock}",
            "-device", f"virtserialport,chardev=c9p{i},name=ninep{i}",
        ]
        target = "/mnt" if i == 0 else f"/mnt{i + 1}"
        mounts.append(Mount("fd", f"ninep{i}", target,
                            f"trans=fd,{L_OPTS},msize={msize},cache={caches[min(i, 1)]}"))
    return Setup(name, devices, mounts)


def vhost_user_9p(name: str, sockets: Sequence[Path], tags: Sequence[str], qemu_cmd: list[str],
                  msize: int = 512000, mem: str = "1G") -> Setup:
    """trans=virtio through vhost-user back-ends (ninep as the device), QEMU >= 10.2.

    Hook for the vhost-user work: `qemu_cmd` is how to run a QEMU new enough to have
    vhost-user-test-device-pci (e.g. sid's, through its own loader under `unshare --mount`),
    `sockets` are the back-end sockets (one device each), `tags` the mount tags the back-ends
    report in their config space.
    """
    devices: list[str] = []
    mounts = []
    caches = ("none", "mmap")
    for i, (sock, tag) in enumerate(zip(sockets, tags, strict=True)):
        devices += [
            "-chardev", f"socket,id=vu9p{i},path={sock}",
            "-device", f"vhost-user-test-device-pci,chardev=vu9p{i},virtio-id=9,num_vqs=1,config_size=64",
        ]
        target = "/mnt" if i == 0 else f"/mnt{i + 1}"
        mounts.append(Mount("virtio", tag, target,
                            f"trans=virtio,{L_OPTS},msize={msize},cache={caches[min(i, 1)]}"))
    return Setup(
        name, devices, mounts, qemu_cmd=qemu_cmd,
        memory_args=["-m", mem, "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                     "-numa", "node,memdev=mem"],
    )


# ---------------------------------------------------------------------------------------------
# running a job


@dataclass
class GuestRun:
    setup: str
    accel: str
    console: str
    lines: list[str]  # the job's output between the markers
    rc: int | None
    boot_seconds: float  # QEMU start to the BEGIN marker
    job_seconds: float  # BEGIN marker to END marker
    oks: list[str] = field(default_factory=list)
    fails: list[str] = field(default_factory=list)

    def console_tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])


def _job_cpio(script: str, env: dict[str, str], mounts: Sequence[Mount], files: dict[str, bytes]) -> bytes:
    cpio = Cpio()
    lines = [f"export {k}='{v}'" for k, v in env.items()]
    # init reads MOUNT_n as "kind source target options"
    lines += [f"MOUNT_{i}='{m.kind} {m.source} {m.target} {m.options}'" for i, m in enumerate(mounts)]
    lines.append(f"NMOUNTS={len(mounts)}")
    cpio.file("job/env", ("\n".join(lines) + "\n").encode())
    cpio.file("job/run.sh", script.encode(), 0o755)
    for name, data in files.items():
        cpio.file(f"job/{name}", data, 0o755)
    return cpio.bytes()


def run_job(
    image: GuestImage,
    setup: Setup,
    script: str,
    env: dict[str, str] | None = None,
    *,
    timeout: float = 300.0,
    accel: Accel | None = None,
    memory: str = "512M",
    files: dict[str, bytes] | None = None,
    log: Path | None = None,
) -> GuestRun:
    """Boot the guest with `setup`, run `script` on its mounts, return what it printed.

    Raises GuestError (with the console tail) when QEMU fails, the guest does not reach the
    end marker, or the timeout expires; FAIL lines of a finished job are not errors here.
    """
    accel = accel or detect_accel()
    cmdline = ["console=ttyS0", "panic=-1", "loglevel=4", "rdinit=/init", *accel.kernel_args]
    with tempfile.TemporaryDirectory(prefix="ninep-guest-") as tmp_s:
        initrd = Path(tmp_s) / "initrd"
        with initrd.open("wb") as f:
            f.write(image.initrd.read_bytes())
            f.write(_job_cpio(script, env or {}, setup.mounts, files or {}))
        qemu = setup.qemu_cmd or ["qemu-system-x86_64"]
        cmd = [
            *qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            *accel.qemu_args,
            *(setup.memory_args or ["-m", memory]),
            "-kernel", str(image.kernel), "-initrd", str(initrd),
            "-append", " ".join(cmdline),
            *setup.devices,
        ]
        return _boot(cmd, setup.name, accel.name, timeout, log)


def _boot(cmd: list[str], name: str, accel: str, timeout: float, log: Path | None) -> GuestRun:
    start = time.monotonic()
    marks: dict[str, float] = {}
    chunks: list[str] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def reader() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").replace("\r", "")
            chunks.append(line)
            if BEGIN in line and "begin" not in marks:
                marks["begin"] = time.monotonic()
            elif END_RE.search(line):
                marks["end"] = time.monotonic()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    t.join(5)
    console = "".join(chunks)
    if log is not None:
        log.write_text(console)
    run = _parse(console, name, accel, start, marks)
    tail = run.console_tail()
    if timed_out:
        raise GuestError(f"{name}: guest timed out after {timeout:.0f}s; console tail:\n{tail}")
    if run.rc is None:
        raise GuestError(f"{name}: QEMU exited ({proc.returncode}) before the job ended; "
                         f"command: {' '.join(cmd)}\nconsole tail:\n{tail}")
    return run


def _parse(console: str, name: str, accel: str, start: float, marks: dict[str, float]) -> GuestRun:
    lines: list[str] = []
    rc = None
    inside = False
    for line in console.splitlines():
        if BEGIN in line:
            inside = True
            continue
        m = END_RE.search(line)
        if m:
            rc = int(m.group(1))
            break
        if inside:
            lines.append(line)
    run = GuestRun(
        name, accel, console, lines, rc,
        boot_seconds=marks.get("begin", start) - start,
        job_seconds=marks.get("end", marks.get("begin", start)) - marks.get("begin", start),
    )
    for line in lines:
        if line.startswith("ok "):
            run.oks.append(line[3:].strip())
        elif line.startswith("FAIL "):
            run.fails.append(line[5:].strip())
    return run


# ---------------------------------------------------------------------------------------------
# the ninep server on the host


@contextlib.contextmanager
def ninep_server(root: Path, export: Path | str, sock: Path, security_model: str | None = None,
                 msize: int | None = None, log: Path | None = None,
                 python: str | None = None, verbose: bool = False, listen: str | None = None,
                 extra: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m ninep serve EXPORT --listen unix:SOCK` from the source tree `root` until
    the block ends; `listen` replaces the address (e.g. vhost-user:SOCK), `extra` adds options."""
    import sys

    cmd = [python or sys.executable, "-m", "ninep", "serve", str(export), "--listen",
           listen or f"unix:{sock}", *extra]
    if security_model:
        cmd += ["--security-model", security_model]
    if msize:
        cmd += ["--msize", str(msize)]
    if verbose:
        cmd += ["-v", "--trace"]
    out = log.open("wb") if log else subprocess.DEVNULL
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                raise GuestError(f"ninep server exited ({proc.returncode}) before listening: "
                                 f"{' '.join(cmd)}" + (f"\n{log.read_text()[-3000:]}" if log else ""))
            if time.monotonic() > deadline:
                raise GuestError(f"ninep server did not create {sock} within 20 s")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log and out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]


def seed_export(export: Path, big: int = 10000, tree_dirs: int = 0, tree_files: int = 0) -> None:
    """Host-side fixtures the job reads: a directory of `big` files (creating 10 000 files from
    an emulated guest would take minutes), a file with nanosecond times (the guest kernel can
    only set whole seconds) and an optional tree of tree_dirs x tree_files."""
    seed = export / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    timed = seed / "timed"
    timed.write_bytes(b"timed\n")
    os.utime(timed, ns=(1234567890_123456789, 1234567891_987654321))
    (seed / "big").mkdir(parents=True, exist_ok=True)
    for i in range(big):
        (seed / "big" / f"f{i:05d}").touch()
    for d in range(tree_dirs):
        sub = seed / "tree" / f"d{d:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(tree_files):
            (sub / f"f{i:04d}").write_bytes(b"x" * (i % 7))
