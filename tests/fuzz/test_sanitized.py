"""The ring fuzzers against transports._ring built with AddressSanitizer and UBSan.

scripts/build_sanitized.sh compiles the extension with -fsanitize=address,undefined
-fno-sanitize-recover=undefined into a directory of its own; the ring fuzzers (and the ring unit
tests with their hostile cases) then run in a subprocess that preloads libasan and imports that
build first. Any sanitizer report fails the job: ASan and UBSan abort the process, and their
report is looked for in the output as well. A canary compiled with the same flags and a known
out-of-bounds read proves, every run, that a report would be noticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.budget import scale

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (scripts/setup.sh installs it)")


def _libasan() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path), f"gcc has no libasan ({path!r}): install libasan8 / gcc"
    return path


def sanitized_env(build: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=_libasan(),
        # Leaks: CPython keeps objects alive at exit by design. abort_on_error: a hard failure.
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        # Every allocation through malloc, so ASan sees Python objects and PyMem buffers too
        # (pymalloc's arenas would hide an overflow of a small bytes object).
        PYTHONMALLOC="malloc",
        PYTHONPATH=f"{build}{os.pathsep}{ROOT}",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sanitized")
    subprocess.run(["bash", str(ROOT / "scripts/build_sanitized.sh"), str(out), sys.executable],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return out


def _run(code: str, build: Path, cwd: Path, timeout: float = 900, scale: float = 1.0) -> subprocess.CompletedProcess[str]:
    # Started outside the repository, and importing the extension before pytest puts the
    # repository on sys.path: `transports` must come from the sanitized build.
    env = sanitized_env(build)
    env["NINEP_FUZZ_SCALE"] = str(scale)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _reports(out: str) -> list[str]:
    return [line for line in out.splitlines() if any(r in line for r in REPORTS)]


def test_ring_fuzzers_under_asan_and_ubsan(sanitized_build: Path, tmp_path: Path) -> None:
    tests = [
        str(ROOT / "tests/fuzz/test_virtq_fuzz.py"),
        str(ROOT / "tests/fuzz/test_xenring_fuzz.py"),
        str(ROOT / "tests/transports/virtio/test_ring.py"),
        str(ROOT / "tests/transports/xen/test_datapath.py") + "::test_fuzz_hostile_indices_and_bytes",
    ]
    # --capture=sys: a sanitizer writes its report to fd 2 and aborts; fd-level capture would
    # swallow the report with the process.
    code = (
        "import sys, transports._ring as r\n"
        f"assert r.__file__.startswith({str(sanitized_build)!r}), r.__file__\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--capture=sys', '--rootdir', {str(ROOT)!r}, *{tests!r}]))\n"
    )
    # ASan makes everything slower: the CI budget of this job is a quarter of the plain run's.
    p = _run(code, sanitized_build, tmp_path, scale=scale() / 4)
    out = p.stdout + p.stderr
    assert not _reports(out), "sanitizer report:\n" + out[-8000:]
    assert p.returncode == 0, out[-8000:]
    assert " passed" in p.stdout


CANARY = r"""
#include <Python.h>
static PyObject *oob(PyObject *self, PyObject *arg) {
    volatile char *p = PyMem_RawMalloc(8);
    long i = PyLong_AsLong(arg);
    char c = p[i];             /* heap-buffer-overflow for i >= 8 */
    PyMem_RawFree((void *)p);
    return PyLong_FromLong(c);
}
static PyMethodDef methods[] = {{"oob", oob, METH_O, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "canary", NULL, -1, methods};
PyMODINIT_FUNC PyInit_canary(void) { return PyModule_Create(&mod); }
"""


def test_a_sanitizer_report_fails_the_job(sanitized_build: Path, tmp_path: Path) -> None:
    """The harness above would notice: an out-of-bounds read built with the same flags, loaded
    the same way, aborts the process with a report."""
    import sysconfig

    src = tmp_path / "canary.c"
    src.write_text(CANARY)
    so = tmp_path / ("canary" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                    "-fno-sanitize-recover=undefined", "-g", f"-I{sysconfig.get_paths()['include']}",
                    str(src), "-o", str(so)], check=True)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import canary; canary.oob(3); canary.oob(8)"
    p = _run(code, sanitized_build, tmp_path, timeout=120)
    assert p.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in p.stderr, p.stderr[-4000:]
