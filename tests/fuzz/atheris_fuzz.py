"""Long-run coverage-guided fuzzing with atheris (libFuzzer for Python); not collected by pytest.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python tests/fuzz/atheris_fuzz.py TARGET [CORPUS_DIR] [libFuzzer options]

TARGET is one of:
  codec    raw bytes (first byte picks the dialect) through `check_decode` of test_codec_fuzz:
           only DecodeError, canonical re-encoding, agreement with the construct reference.
           An empty CORPUS_DIR is seeded with every message type of every dialect.
  session  a script of frames against a fresh server (tests/kits/session.py), memory backend
  session-local  the same against the local backend in a temporary directory
  virtq    a hostile driver of the compiled virtqueue (test_virtq_fuzz.drive)
  xen      a hostile frontend of the compiled Xen ring (test_xenring_fuzz.drive)

The structured targets decode libFuzzer's bytes with the same hypothesis strategies as the CI
fuzzers (`fuzz_one_input`), so libFuzzer mutates scripts and ring images, not noise. The Python
code of ninep, fs_backends, transports and tests/fuzz is instrumented for coverage, the generated
codec included; the C ring code is exercised but not instrumented (that would need clang's
-fsanitize=fuzzer-no-link; gcc has no equivalent), so for the ring targets coverage comes from
the Python drivers' branches only.
To run the ring targets under AddressSanitizer, build with scripts/build_sanitized.sh and run as
tests/fuzz/README.md shows. A crash leaves crash-* files; each becomes a regression test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["ninep", "fs_backends", "transports", "tests.fuzz"]):
    import fs_backends.local  # noqa: F401
    import fs_backends.memory  # noqa: F401
    import ninep.protocol.codec
    import ninep.server.handlers.tables  # noqa: F401  (every dialect's handlers)
    import ninep.server.session  # noqa: F401
    import tests.fuzz.test_codec_fuzz  # noqa: F401
    import tests.fuzz.test_virtq_fuzz  # noqa: F401
    import tests.fuzz.test_xenring_fuzz  # noqa: F401
    import tests.kits.session  # noqa: F401

from hypothesis import HealthCheck, given, settings  # noqa: E402


def _instrument_generated_codec() -> None:
    """The fast codec is compiled from a string at run time, so import hooks never see it."""
    from ninep.protocol.numbers import DIALECTS

    for dialect in DIALECTS:
        c = ninep.protocol.codec.codec_for(dialect)
        for table in (c._decoders, c._encoders):
            for fn in table.values():
                atheris.instrument_func(fn)

_settings = settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))


def _seed(corpus: Path) -> None:
    from ninep.protocol import messages as m
    from ninep.protocol.numbers import DIALECTS
    from tests.protocol.test_codec import _sample

    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for d, dialect in enumerate(DIALECTS):
        for _, cls in sorted(m.MESSAGES.items()):
            for big in (False, True):
                wire = ninep.protocol.codec.codec_for(dialect).encode_bytes(_sample(cls, dialect, big))
                (corpus / f"{dialect}-{cls.__name__}-{int(big)}").write_bytes(bytes([d]) + wire)


def codec_target() -> object:
    from ninep.protocol.numbers import DIALECTS
    from tests.fuzz.test_codec_fuzz import check_decode

    def one(data: bytes) -> None:
        if data:
            check_decode(DIALECTS[data[0] % len(DIALECTS)], data[1:])

    return one


def session_target(kind: str) -> object:
    from tests.fuzz.test_session_fuzz import backend_factory, scripts
    from tests.kits.session import run_script

    @_settings
    @given(scripts)
    def one(batches: list) -> None:  # type: ignore[type-arg]
        with backend_factory(kind) as make:
            run_script(make, batches)

    return one.hypothesis.fuzz_one_input


def virtq_target() -> object:
    from tests.fuzz.test_virtq_fuzz import drive, drivers

    @_settings
    @given(drivers())
    def one(d: dict) -> None:  # type: ignore[type-arg]
        drive(d)

    return one.hypothesis.fuzz_one_input


def xen_target() -> object:
    from hypothesis import strategies as hs

    from tests.fuzz.test_xenring_fuzz import _op, drive

    @_settings
    @given(hs.integers(1, 9), hs.sampled_from([0, 2**32 - 8, 2**32 - 4096, 12345]), hs.lists(_op, max_size=40))
    def one(order: int, start: int, ops: list) -> None:  # type: ignore[type-arg]
        drive(order, start, ops)

    return one.hypothesis.fuzz_one_input


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("codec", "session", "session-local", "virtq", "xen"):
        sys.exit(__doc__)
    target = sys.argv.pop(1)
    import logging

    # Quiet (dropped connections are expected), yet still emitted: the session checks its logs.
    logging.getLogger("ninep").addHandler(logging.NullHandler())
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if target == "codec":
        if corpus is not None:
            _seed(corpus)
        fn = codec_target()
    elif target.startswith("session"):
        fn = session_target("local" if target == "session-local" else "memory")
    elif target == "virtq":
        fn = virtq_target()
    else:
        fn = xen_target()
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    if target != "codec":
        # Room for hypothesis to draw whole scripts and ring images from one input.
        for opt, default in (("-max_len=", "8192"), ("-len_control=", "0")):
            if not any(a.startswith(opt) for a in sys.argv):
                sys.argv.append(opt + default)
    _instrument_generated_codec()
    atheris.Setup(sys.argv, fn)  # type: ignore[arg-type]
    atheris.Fuzz()


if __name__ == "__main__":
    main()
